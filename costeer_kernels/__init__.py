"""costeer_kernels: fused CoSteer steering ops (Triton, C++/CUDA, PyTorch) registered as torch ops.

Public API:
    SteerConfig, steer_coefficient   the update's settings and its closed-form coefficient c_T
    reference_steer                  the literal T-step loop (ground truth of every test)
    steer                            the fused op (torch.ops.costeer.steer / steer_out)
    steer_from_hidden                steer from the small model's hidden states (W read once, fused)
    steer_sample                     next token ids + steered log-probs, no [B, V] output
                                     (greedy, Gumbel-max, top-k/top-p/min-p)
    available_backends               which backends run in this process
"""
from .config import SteerConfig, steer_coefficient
from .dispatch import available_backends
from .ops import steer
from .reference import closed_form_steer, reference_steer
from .projection import steer_from_hidden
from .sampling import register_sampler, steer_sample

__all__ = [
    "SteerConfig",
    "steer_coefficient",
    "reference_steer",
    "closed_form_steer",
    "steer",
    "available_backends",
    "steer_sample",
    "register_sampler",
    "steer_from_hidden",
]
__version__ = "0.1.0"
