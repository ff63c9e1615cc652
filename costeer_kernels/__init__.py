"""costeer_kernels: fused CoSteer steering ops (Triton, C++/CUDA, PyTorch) registered as torch ops.

Public API:
    SteerConfig, steer_coefficient   the update's settings and its closed-form coefficient c_T
    reference_steer                  the literal T-step loop (ground truth of every test)
    closed_form_steer                the closed form in eager torch, any dtype (no checks)
    steer                            the fused op (torch.ops.costeer.steer / steer_out)
    steer_sample                     next token ids + steered log-probs, no [B, V] output
                                     (greedy, Gumbel-max, top-k/top-p/min-p;
                                     torch.ops.costeer.steer_sample)
    steer_from_hidden                steer from the small model's hidden states (W read once, fused;
                                     torch.ops.costeer.steer_from_hidden / sample_from_hidden)
    speculative_verify               speculative steering's verification: steer the k+1 scored rows,
                                     accept / reject the drafts, the residual draw
                                     (torch.ops.costeer.speculative_verify; verify.py)
    linear_rows                      x @ W.T + b for a few rows, W streamed once (the small batches
                                     of decoding; torch.ops.costeer.linear_rows; linear.py)
    decode_attention                 one query token per row against its KV cache, grouped query
                                     heads read once per KV head (torch.ops.costeer.decode_attention;
                                     attention.py)
    q8_0                             GGML Q8_0 weights (uint8 blocks, a GGUF file's bytes): what
                                     linear_rows and steer_from_hidden read at 34 bytes per 32
                                     weights, with the float32 values' result (q8_0.py)
    q4_1, q5_0, blocks               GGML Q4_1 and Q5_0 weights (the embedded models' layers as
                                     stored): what linear_rows reads at 20 / 22 bytes per 32
                                     weights, with the float32 values' result; blocks.py, the
                                     table of the three formats
    available_backends               which backends run in this process (registry.py)

Layout: ``registry.py`` (the one backend registry), ``checks.py`` (argument checks), ``config.py``
(settings, c_T), ``status.py`` (status bits), ``reference.py``, ``torch_backend.py``, ``triton/``,
``_extension.py`` (the C++/CUDA loader, csrc/).
"""
from . import torch_backend  # noqa: F401 - registers backend "torch" first
from .config import MAX_T, SteerConfig, steer_coefficient
from . import blocks, q4_1, q5_0, q8_0
from .linear import linear_rows
from .attention import decode_attention
from .ops import steer
from .projection import steer_from_hidden
from .reference import closed_form_steer, reference_steer
from .registry import available_backends
from .sampling import register_sampler, steer_sample
from .verify import speculative_verify

__all__ = [
    "SteerConfig",
    "MAX_T",
    "steer_coefficient",
    "reference_steer",
    "closed_form_steer",
    "steer",
    "available_backends",
    "steer_sample",
    "register_sampler",
    "steer_from_hidden",
    "speculative_verify",
    "linear_rows",
    "decode_attention",
    "q8_0",
    "q4_1",
    "q5_0",
    "blocks",
]
__version__ = "0.1.0"
