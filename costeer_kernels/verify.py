"""``speculative_verify``: the verification step of speculative steering as one op.

A draft of k tokens d_1..d_k was proposed by a local distribution q (drawn with ``steer_sample``
from the proposal's logits); the LLM scored the k+1 positions in one forward. This op steers the
k+1 scored rows (x_i = z_L,i + c_T (z_c,i - z_n,i), ``steer``'s closed form) and decides:

- greedy (``temperature == 0``): accept d_i while d_i == argmax x_i (the lowest index on ties,
  as ``steer_sample``); emit argmax x_j at the first mismatch j (or the bonus row k);
- sampling: p_i and q_i are the tempered, filtered distributions ``steer_sample`` draws from
  (same temperature / top_k / top_p / min_p rules, see ``costeer_kernels.sampling``) of x_i and of
  the proposal's logits y_i. d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); on the
  first rejection the emitted token is drawn from normalize(max(0, p_i - q_i)); when all k are
  accepted it is drawn from p_k (the bonus row). The emitted tokens are then distributed exactly
  as tokens drawn from p one by one (the standard speculative-sampling argument).

Random numbers: the RNG contract of ``steer_sample``: Philox4x32-10 keyed by the 64-bit ``seed``
with counter (v >> 2, r, offset low, offset high) for row r; the residual / bonus draw of row r is
Gumbel-max with exactly ``steer_sample``'s noise for (seed, offset, row r); the acceptance uniform
of row r is word 0 of the block at v >> 2 = 2^32 - 1 (beyond every vocabulary's token blocks).
Same inputs, seed and offset give the same result.

Backend: torch (the distributions are built with a sort over V per row, k+1 rows per round).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .config import SteerConfig
from .rng import _M32, gumbel_noise, philox4x32
from .sampling import steer_sample

__all__ = ["speculative_verify", "filtered_logprobs"]


def filtered_logprobs(x: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                      min_p: float = 0.0) -> torch.Tensor:
    """float64 [R, V] log-probs of the distribution ``steer_sample`` samples from logits ``x``
    (temperature > 0): exp(x / temperature) on the allowed set, -inf elsewhere.

    Each filter keeps {v : x_v >= its threshold} (ties kept); top-p's mass is measured over the
    top-k set; the allowed set is where x reaches the largest threshold.
    """
    x = x.double()
    R, V = x.shape
    y = x / temperature
    m = x.amax(1, keepdim=True)
    thr = torch.full((R, 1), float("-inf"), dtype=torch.float64, device=x.device)
    if 0 < top_k < V:
        thr = torch.maximum(thr, torch.topk(x, top_k, dim=1).values[:, -1:])
    if top_p < 1.0:
        ys = torch.where(x >= thr, y, torch.full_like(y, float("-inf")))
        vals, order = torch.sort(ys, dim=1, descending=True)
        w = torch.softmax(vals, 1)
        before = w.cumsum(1) - w  # mass of the strictly larger-ranked tokens
        keep = before < top_p  # the smallest prefix whose mass reaches top_p
        last = keep.sum(1, keepdim=True).clamp(min=1) - 1
        boundary = x.gather(1, order.gather(1, last))
        thr = torch.maximum(thr, boundary)
    if min_p > 0.0:
        thr = torch.maximum(thr, m + temperature * torch.log(torch.tensor(min_p, dtype=torch.float64)))
    y = torch.where(x >= thr, y, torch.full_like(y, float("-inf")))
    return torch.log_softmax(y, 1)


def _uniform(rows: int, seed: int, offset: int, device) -> torch.Tensor:
    """float64 [rows] acceptance uniforms in (0, 1) (word 0 of the block v >> 2 = 2^32 - 1)."""
    r = torch.arange(rows, dtype=torch.int64, device=device)
    s = seed & ((1 << 64) - 1)
    k0 = torch.full_like(r, s & _M32)
    k1 = torch.full_like(r, (s >> 32) & _M32)
    c0 = torch.full_like(r, _M32)
    o = int(offset)
    w = philox4x32(c0, r & _M32, torch.full_like(r, o & _M32), torch.full_like(r, (o >> 32) & _M32), k0, k1)[0]
    return (2 * (w >> 9) + 1).to(torch.float64) * 5.9604644775390625e-08


def speculative_verify(
    llm_logits: torch.Tensor,
    slm_ctx_logits: torch.Tensor,
    slm_noctx_logits: Optional[torch.Tensor],
    drafts: torch.Tensor,
    cfg: Optional[SteerConfig] = None,
    *,
    draft_logits: Optional[torch.Tensor] = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
) -> Tuple[int, int]:
    """Steer the k+1 scored rows and accept / reject k drafts (module docstring).

    Args:
        llm_logits, slm_ctx_logits, slm_noctx_logits: [k+1, V] rows of the k draft positions and
            the bonus position (``slm_noctx_logits=None``: ``slm_ctx_logits`` is the delta).
        drafts: int64 [k] the drafted token ids (k >= 0).
        cfg: :class:`SteerConfig` (scalar settings).
        draft_logits: [k, V] the proposal's logits the drafts were drawn from (sampling only).
        temperature, top_k, top_p, min_p: as in ``steer_sample`` (scalars); 0 = greedy.
        seed, offset: the RNG key and stream position (ints).

    Returns:
        (number of accepted drafts j, the token emitted after them).
    """
    if not isinstance(drafts, torch.Tensor) or drafts.dim() != 1:
        raise ValueError("drafts must be a 1-D int64 tensor [k]")
    if llm_logits.dim() != 2 or llm_logits.shape[0] != drafts.shape[0] + 1:
        raise ValueError(f"llm_logits must be [k+1, V] with k = {drafts.shape[0]} drafts, got {tuple(llm_logits.shape)}")
    for name, v in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    k = int(drafts.shape[0])
    dev = llm_logits.device
    if temperature == 0:
        best = steer_sample(llm_logits, slm_ctx_logits, slm_noctx_logits, cfg)[0].tolist()
        d = drafts.tolist()
        j = 0
        while j < k and d[j] == best[j]:
            j += 1
        return j, int(best[j])
    if k and (draft_logits is None or tuple(draft_logits.shape) != (k, llm_logits.shape[1])):
        raise ValueError(f"draft_logits must be [k={k}, V={llm_logits.shape[1]}] when sampling")
    from . import steer  # the steered rows, as log-probs (a shift of x: the same distributions)

    x = steer(llm_logits, slm_ctx_logits, slm_noctx_logits, cfg)
    logp = filtered_logprobs(x, float(temperature), int(top_k), float(top_p), float(min_p))
    if k:
        logq = filtered_logprobs(draft_logits.float(), float(temperature), int(top_k), float(top_p), float(min_p))
        rows = torch.arange(k, device=dev)
        lp_d, lq_d = logp[rows, drafts], logq[rows, drafts]
        u = _uniform(k, int(seed), int(offset), dev)
        accept = (torch.log(u) < lp_d - lq_d) & torch.isfinite(lq_d)  # u < p/q: probability min(1, p/q)
        rejected = (~accept).nonzero().flatten()
        if rejected.numel():
            i = int(rejected[0])
            resid = (logp[i].exp() - logq[i].exp()).clamp(min=0.0)
            if float(resid.sum()) <= 0.0:  # p == q up to rounding: the rejection had probability ~0
                resid = logp[i].exp()
            return i, _gumbel_pick(torch.log(resid), i, int(seed), int(offset))
    return k, _gumbel_pick(logp[k], k, int(seed), int(offset))


def _gumbel_pick(logw: torch.Tensor, row: int, seed: int, offset: int) -> int:
    """argmax of log w + Gumbel noise of ``steer_sample``'s stream (seed, offset, row)."""
    dev = logw.device
    s = seed & ((1 << 64) - 1)
    s = s - (1 << 64) if s >= 1 << 63 else s
    g = gumbel_noise(logw.shape[0], torch.tensor([row], dtype=torch.int64, device=dev),
                     torch.tensor([s], dtype=torch.int64, device=dev), torch.tensor([int(offset)], dtype=torch.int64, device=dev))[0]
    return int(torch.argmax(logw + g.double()))
