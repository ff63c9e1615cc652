"""Ground truth: the published T-step CoSteer update, written out literally in eager PyTorch.

Every fast path is tested against ``reference_steer(..., dtype=torch.float64)``.

Masks (-inf), the same convention as every backend:
- ``llm_logits[v] = -inf``: token v is banned; its output log-prob is -inf.
- ``slm_ctx_logits[v] = slm_noctx_logits[v] = -inf``: a mask shared by both small-model passes
  (padding, a processor applied to both) says nothing about the private context: no delta on the
  logits (z_c - z_n := 0 there; in log-prob terms, the row's constant lse(z_c) - lse(z_n), which
  keeps the closed form one pass).
- ``slm_ctx_logits[v] = -inf`` alone: the small model with context rules token v out, and the
  update drives it to -inf (for c_T > 0; with c_T = 0 there is no steering at all).
- ``slm_noctx_logits[v] = -inf`` alone would push token v to +inf: the row is invalid.
"""
from __future__ import annotations

import torch

from .config import SteerConfig, hparams_valid
from .torch_backend import masked_delta as _masked_delta, scaled as _scaled, steered_logits


def reference_steer(
    llm_logits: torch.Tensor,
    slm_ctx_logits: torch.Tensor,
    slm_noctx_logits: torch.Tensor,
    cfg: SteerConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The literal T-step FTRL update of the paper, in ``dtype`` (pass ``torch.float64`` for ground truth).

    Inputs are [B, V] or [V] (same shape); returns steered log-probs of that shape in ``dtype``.
    Per-row settings (tensor fields of ``cfg``) are honoured. Rows with NaN inputs or invalid
    settings come out as NaN: this function checks nothing, it only computes.
    """
    cfg = SteerConfig() if cfg is None else cfg
    squeeze = llm_logits.dim() == 1
    zl, zc, zn = (t.reshape(1, -1) if squeeze else t for t in (llm_logits, slm_ctx_logits, slm_noctx_logits))
    if not (zl.shape == zc.shape == zn.shape) or zl.dim() != 2:
        raise ValueError(
            f"reference_steer expects three [B, V] or [V] tensors of one shape, got "
            f"{tuple(llm_logits.shape)}, {tuple(slm_ctx_logits.shape)}, {tuple(slm_noctx_logits.shape)}"
        )
    zl, zc, zn = (t.to(dtype) for t in (zl, zc, zn))
    hp = cfg.packed(zl.shape[0] if cfg.per_row else None, zl.device).to(dtype)
    hp = hp.expand(zl.shape[0], 5)
    bad = ~hparams_valid(hp.double())
    T_rows = torch.where(bad, torch.zeros_like(hp[:, 0]), hp[:, 0]).long()
    alpha, beta, lam, eta = (hp[:, i : i + 1] for i in range(1, 5))

    b = torch.log_softmax(zl, dim=-1)
    lse_shift = torch.logsumexp(zc, dim=-1, keepdim=True) - torch.logsumexp(zn, dim=-1, keepdim=True)
    d = torch.where(zc == zn, -lse_shift, torch.log_softmax(zc, dim=-1) - torch.log_softmax(zn, dim=-1))
    p = b.clone()
    U = torch.zeros_like(b)
    t_max = int(T_rows.max().item()) if T_rows.numel() else 0
    for t in range(1, t_max + 1):
        active = (T_rows >= t)[:, None]
        U_new = U + _scaled(alpha, _masked_delta(p, b)) + _scaled(beta, d)
        pre = (t * lam * b + U_new + p / eta) / (t * lam + 1.0 / eta)
        p_new = torch.log_softmax(pre, dim=-1)
        U = torch.where(active, U_new, U)
        p = torch.where(active, p_new, p)
    p = torch.where(bad[:, None], torch.full_like(p, float("nan")), p)
    return p.reshape(-1) if squeeze else p


def closed_form_steer(
    llm_logits: torch.Tensor,
    slm_ctx_logits: torch.Tensor,
    slm_noctx_logits: torch.Tensor | None,
    cfg: SteerConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``log_softmax(z_L + c_T (z_c - z_n))`` in eager PyTorch, in ``dtype``; no checks.

    ``slm_noctx_logits=None`` means ``slm_ctx_logits`` already holds the delta z_c - z_n.
    """
    cfg = SteerConfig() if cfg is None else cfg
    squeeze = llm_logits.dim() == 1
    zl = llm_logits.reshape(1, -1) if squeeze else llm_logits
    zc = slm_ctx_logits.reshape(1, -1) if squeeze else slm_ctx_logits
    zn = None if slm_noctx_logits is None else (slm_noctx_logits.reshape(1, -1) if squeeze else slm_noctx_logits)
    hp = cfg.packed(zl.shape[0] if cfg.per_row else None, zl.device)
    x = steered_logits(zl, zc, zn, hp, dtype=dtype)[0]
    out = torch.log_softmax(x, dim=-1)
    return out.reshape(-1) if squeeze else out
