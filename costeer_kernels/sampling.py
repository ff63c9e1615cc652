"""``steer_sample``: steer and pick the next token in one op, without writing the [B, V] log-probs.

The steered distribution is p = softmax(x), x = z_L + c_T (z_c - z_n) (``steer``'s closed form).

Sampling rule, per row (every parameter a scalar or a per-row tensor [B]):
- ``temperature == 0``: greedy, argmax of x, the lowest index on ties. Filters do not matter
  (the argmax passes all of them).
- ``temperature = tau > 0``: q(v) ∝ exp(x_v / tau) restricted to the allowed set A, drawn by
  Gumbel-max: token = argmax_{v in A} x_v + tau * G_v, G_v standard Gumbel noise.
- The allowed set A applies, in this order (the order of Hugging Face's logits processors),
  - ``top_k = k`` (0 = off): the k largest x. Ties at the k-th value are all kept (like vLLM's
    top-k), so A can exceed k tokens only on exact ties.
  - ``top_p`` (1 = off): the smallest set of largest x whose mass under q *renormalized over the
    top-k set* reaches ``top_p`` (ties at the boundary kept).
  - ``min_p`` (0 = off): tokens with q(v) >= min_p * max_v q(v), i.e. x_v >= max x + tau log(min_p).
  Each filter keeps {v : x_v >= threshold}; A = {v : x_v >= max of the thresholds}.

Thresholds without sorting: x is mapped to an int32 key whose order is the float order. For top-k
the threshold is the largest key t with #{v : key_v >= t} >= k, for top-p the largest t with
sum_{key_v >= t} exp((x_v - max x) / tau) >= top_p * (that mass over the top-k set); both counts
are non-increasing in t, so the threshold is found by bisection over the key range with extra
passes reading the row (Triton: 16 pivots per pass, the interval shrinks 17 times per pass, <= 8
passes; torch: plain bisection vectorized over rows, <= 32 passes). Then one masked Gumbel-max pass.
Exact: the result is the exact threshold, not an approximation, and A is computed from the same
fp32 x that is sampled.

Random numbers (the same definition in every backend, so backends agree draw for draw up to
float rounding of the logs): Philox4x32-10 keyed by the 64-bit ``seed`` (key words: low and high 32
bits) with counter (v >> 2, r, offset low 32 bits, offset high 32 bits); word v & 3 of the output
gives token v. r = row * n + d for draw d of n (``num_samples``) when ``seed`` is one value for the
batch; r = d when ``seed`` is a per-row tensor (each row its own stream: a request's draws do not
depend on its slot in the batch). u = (2 * (bits >> 9) + 1) / 2^24 in (0, 1), G = -log(-log u).
Noise resolution: a token whose probability relative to the whole row is below ~3e-8 is
undersampled (the Gumbel tail is cut at u's resolution).
Advance ``offset`` by one per decoding step to get fresh noise; ``seed`` and ``offset`` may be
device tensors (int64, 0-d/[1] or [B]), so a call has no host sync (``validate=False``) and can be
captured in a CUDA graph.

Returned log-prob: the steered log-prob of the chosen token under p = softmax(x), i.e. before
temperature and filters (what ``steer`` would return at that token).

Backends (the ``sample`` kernels of the one registry, ``registry.py``; registered as the torch op
``torch.ops.costeer.steer_sample``, with a fake implementation for torch.compile):
- "triton" (``triton/sample.py``): one launch, grid (B, S), the S programs of a row merged in the
  launch by the last one to finish; no host sync, CUDA-graph safe with ``validate=False`` and
  device-tensor seed/offset. The default on CUDA.
- "cpu" (``csrc/sample_cpu.cpp``, when the C++ extension is built): the CPU default. One sweep
  computes x chunk by chunk in L1 with the row's online statistics and first argmax (greedy rows
  end there); sampling rows keep x, bisect the thresholds over it and draw by Gumbel-max, computing
  noise only for tokens that can still beat the best key found (x_v + 17 tau >= best).
- "torch" (``torch_backend.py``): vectorized PyTorch, the CPU fallback. On the CPU it reads a few
  scalars back (free there); on CUDA it is correct but syncs (per-row ``cfg`` coefficients), so it
  is not the graph-safe path. Draws the same tokens as "triton" (same RNG, same thresholds) up to float
  rounding of the logs.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from . import checks, registry
from . import torch_backend  # noqa: F401 - registers backend "torch"
from .rng import gumbel_noise, ordered_key, philox4x32  # noqa: F401 - re-exported
from .status import check_status

__all__ = ["steer_sample", "register_sampler", "available_samplers", "SampleParams", "make_params"]


class SampleParams(NamedTuple):
    """Per-row sampling parameters as device tensors of length 1 (broadcast) or B."""

    temperature: torch.Tensor  # float32
    top_k: torch.Tensor  # int32
    top_p: torch.Tensor  # float32
    min_p: torch.Tensor  # float32
    seed: torch.Tensor  # int64
    offset: torch.Tensor  # int64
    row_keyed: bool  # True: the row index enters the RNG counter (seed given once for the batch)


def make_params(B, device, temperature, top_k, top_p, min_p, seed, offset, validate=True) -> SampleParams:
    """The sampling parameters checked (``checks.sample_param``) and packed for the kernels."""
    d = torch.device(device)
    p = checks.sample_param
    return SampleParams(
        temperature=p("temperature", temperature, B, d, torch.float32, validate),
        top_k=p("top_k", top_k, B, d, torch.int32, validate),
        top_p=p("top_p", top_p, B, d, torch.float32, validate),
        min_p=p("min_p", min_p, B, d, torch.float32, validate),
        seed=p("seed", seed, B, d, torch.int64, validate),
        offset=p("offset", offset, B, d, torch.int64, validate),
        # A per-row seed tensor [B] gives each row its own stream (row index not in the counter);
        # with B = 1 both readings give the same counter.
        row_keyed=not (isinstance(seed, torch.Tensor) and seed.dim() == 1 and seed.shape[0] == B and B > 1),
    )


def register_sampler(name: str, fn, runs_on=None) -> None:
    """Register ``fn`` as the ``sample`` kernel of backend ``name`` (``registry.py``'s contract)."""
    registry.register_backend(name, runs_on or registry.anywhere, sample=fn)


def available_samplers() -> tuple:
    return registry.available_backends("sample")


# ---------------------------------------------------------------------------------------------
# The torch op


@torch.library.custom_op("costeer::steer_sample", mutates_args=())
def steer_sample_op(
    llm_logits: torch.Tensor,
    slm_ctx_logits: torch.Tensor,
    slm_noctx_logits: Optional[torch.Tensor],
    hparams: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    row_keyed: bool,
    want_max_prob: bool,
    num_samples: int,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token int64 [B, n], steered log-prob float32 [B, n], LLM max prob float32 [B] (or [0]
    without ``want_max_prob``), status int32 [B]). Inputs already checked, [B, V]."""
    params = SampleParams(temperature, top_k, top_p, min_p, seed, offset, row_keyed)
    name = registry.resolve("sample", backend, llm_logits.device)
    fn = registry.kernel(name, "sample")
    return _outputs(fn(llm_logits, slm_ctx_logits, slm_noctx_logits, hparams, params, want_max_prob, num_samples),
                    llm_logits)


def _outputs(res, like):
    tok, lp, maxp, status = res
    if maxp is None:
        maxp = like.new_empty((0,), dtype=torch.float32)
    # Contiguous outputs: the torch sampler's tokens of greedy rows are an expanded view.
    return tok.contiguous(), lp.contiguous(), maxp.contiguous(), status.contiguous()


@steer_sample_op.register_fake
def _steer_sample_fake(llm_logits, slm_ctx_logits, slm_noctx_logits, hparams, temperature, top_k, top_p, min_p,
                       seed, offset, row_keyed, want_max_prob, num_samples, backend="auto"):
    return sample_fake(llm_logits, want_max_prob, num_samples)


def sample_fake(llm_logits, want_max_prob, num_samples):
    B = llm_logits.shape[0]
    return (
        llm_logits.new_empty((B, num_samples), dtype=torch.int64),
        llm_logits.new_empty((B, num_samples), dtype=torch.float32),
        llm_logits.new_empty((B if want_max_prob else 0,), dtype=torch.float32),
        llm_logits.new_empty((B,), dtype=torch.int32),
    )


# ---------------------------------------------------------------------------------------------
# Public op


def steer_sample(
    llm_logits: torch.Tensor,
    slm_ctx_logits: torch.Tensor,
    slm_noctx_logits: Optional[torch.Tensor],
    cfg=None,
    *,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    seed=0,
    offset=0,
    num_samples: Optional[int] = None,
    backend: Optional[str] = None,
    return_llm_max_prob: bool = False,
    validate: bool = True,
):
    """Steer the LLM's next-token distribution and pick the next token, in one op.

    Same inputs, masks and validation as :func:`costeer_kernels.steer`, but nothing of size
    [B, V] is written: the result is the chosen token per row. The sampling rule, the filters'
    definitions, the sort-free threshold search and the RNG are described in this module's
    docstring. ``torch.ops.costeer.steer_sample`` underneath: traceable by torch.compile.

    Parameters
    ----------
    llm_logits, slm_ctx_logits, slm_noctx_logits : torch.Tensor
        [B, V] or [V], fp32/fp16/bf16, as in :func:`costeer_kernels.steer` (``slm_noctx_logits``
        may be None: ``slm_ctx_logits`` then holds the delta).
    cfg : SteerConfig, optional
        The update's settings (scalars or per-row tensors).
    temperature : float or torch.Tensor
        0 = greedy (argmax, lowest index on ties); > 0 samples exp(x / temperature).
    top_k : int or torch.Tensor
        Keep the k largest steered logits (ties kept); 0 = off; values >= V keep every token.
    top_p : float or torch.Tensor
        Nucleus mass in (0, 1] over the top-k-renormalized tempered distribution; 1 = off.
    min_p : float or torch.Tensor
        Keep tokens with probability >= min_p * the top probability; 0 = off.
    seed, offset : int or torch.Tensor
        The RNG's key and stream position (ints, or int64 device tensors 0-d/[1]/[B]). Same
        (seed, offset) and inputs give the same tokens; advance ``offset`` per step.
    num_samples : int, optional
        ``None`` (one token per row, outputs [B]) or n >= 1 independent draws per row (outputs
        [B, n]); draws share one pass of statistics and threshold search.
    backend : str, optional
        ``"torch"``, ``"triton"``, ``"cpu"``/``"cuda"`` (C++), or ``None`` for the device's
        default (CUDA: Triton; CPU: the C++ kernel, else torch).
    return_llm_max_prob : bool
        Also return max_v softmax(llm_logits)_v per row (float32 [B]), from the online-softmax
        statistics of z_L (confidence gating, ``costeer.gating``).
    validate : bool
        Raise ValueError for invalid rows (as ``steer``) and invalid sampling parameters. With
        ``False`` nothing is read back (CUDA-graph safe), invalid rows give token -1 and NaN
        log-prob, and out-of-range parameters are clamped (temperature inf/NaN: greedy; top_k
        past int32: off). Under torch.compile the row check is an in-graph assertion
        (``status.check_status``) and parameter tensors are clamped, not read back.

    Returns
    -------
    tuple
        ``(token_ids int64 [B], token_logprobs float32 [B])``, plus ``llm_max_prob float32 [B]``
        when asked; [B, n] for the first two with ``num_samples=n``; 0-d / [n] for [V] inputs.
        ``token_logprobs`` is the steered log-prob log softmax(x)[token], before temperature and
        filters.

    Examples
    --------
    >>> import torch
    >>> from costeer_kernels import SteerConfig, steer, steer_sample
    >>> llm, ctx, noctx = torch.randn(3, 2, 1000).unbind(0)
    >>> tok, lp = steer_sample(llm, ctx, noctx, SteerConfig(T=20))  # greedy
    >>> torch.equal(tok, steer(llm, ctx, noctx, SteerConfig(T=20)).argmax(-1))
    True
    >>> tok, lp, conf = steer_sample(llm, ctx, noctx, temperature=0.7, top_p=0.9, seed=0, offset=5,
    ...                              return_llm_max_prob=True)
    >>> tok.shape, bool((conf > 0).all())
    (torch.Size([2]), True)
    """
    checks.check_bool("return_llm_max_prob", return_llm_max_prob)
    cfg = checks.check_cfg(cfg)
    zl, zc, zn, rank = checks.logit_rows(llm_logits, slm_ctx_logits, slm_noctx_logits, same_width=True)
    B, V = zl.shape
    name = registry.resolve("sample", backend, zl.device)
    n = checks.check_num_samples(num_samples, B)
    params = make_params(B, zl.device, temperature, top_k, top_p, min_p, seed, offset, validate)
    hp = checks.packed_hparams(cfg, B, zl.device)
    if B == 0:
        tok, lp, maxp, status = sample_fake(zl, return_llm_max_prob, n)
    else:
        tok, lp, maxp, status = torch.ops.costeer.steer_sample(
            zl, zc, zn, hp, params.temperature, params.top_k, params.top_p, params.min_p, params.seed,
            params.offset, params.row_keyed, return_llm_max_prob, n, name)
    return finish(tok, lp, maxp, status, validate, num_samples, rank == 1, return_llm_max_prob)


def finish(tok, lp, maxp, status, validate, num_samples, squeeze, return_llm_max_prob, rename=None):
    """The public return value of a sampler's outputs (shapes as documented in steer_sample)."""
    check_status(status, validate, rename)
    if num_samples is None:
        tok, lp = tok[:, 0], lp[:, 0]
    if squeeze:
        tok, lp = tok[0], lp[0]
        maxp = maxp[0] if return_llm_max_prob else maxp
    if return_llm_max_prob:
        return tok, lp, maxp
    return tok, lp
