"""The public op ``steer`` and its registration as ``torch.ops.costeer.steer`` / ``steer_out``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import dispatch
from .config import SteerConfig
from .status import raise_for_status

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("closed_form", "iterative")


# ---------------------------------------------------------------------------------------------
# torch.library registration: the functional op (for torch.compile) and the out= variant.


@torch.library.custom_op("costeer::steer", mutates_args=())
def steer_op(
    llm_logits: torch.Tensor,
    slm_ctx_logits: torch.Tensor,
    slm_noctx_logits: Optional[torch.Tensor],
    hparams: torch.Tensor,
    update: str = "closed_form",
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Steered float32 log-probs [B, V] and int32 status [B]. Inputs already validated 2-D."""
    B, V = llm_logits.shape
    out = torch.empty(B, V, dtype=torch.float32, device=llm_logits.device)
    name = dispatch.resolve_backend(backend, llm_logits.device)
    status = dispatch.get_backend(name)(llm_logits, slm_ctx_logits, slm_noctx_logits, hparams, out, update)
    return out, status


@steer_op.register_fake
def _steer_fake(llm_logits, slm_ctx_logits, slm_noctx_logits, hparams, update="closed_form", backend="auto"):
    B, V = llm_logits.shape
    return (
        llm_logits.new_empty((B, V), dtype=torch.float32),
        llm_logits.new_empty((B,), dtype=torch.int32),
    )


@torch.library.custom_op("costeer::steer_out", mutates_args=("out",))
def steer_out_op(
    llm_logits: torch.Tensor,
    slm_ctx_logits: torch.Tensor,
    slm_noctx_logits: Optional[torch.Tensor],
    hparams: torch.Tensor,
    out: torch.Tensor,
    update: str = "closed_form",
    backend: str = "auto",
) -> torch.Tensor:
    """Writes steered log-probs into ``out`` (float32 [B, V]); returns int32 status [B]."""
    name = dispatch.resolve_backend(backend, llm_logits.device)
    return dispatch.get_backend(name)(llm_logits, slm_ctx_logits, slm_noctx_logits, hparams, out, update)


@steer_out_op.register_fake
def _steer_out_fake(llm_logits, slm_ctx_logits, slm_noctx_logits, hparams, out, update="closed_form", backend="auto"):
    return llm_logits.new_empty((llm_logits.shape[0],), dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# Argument checks (shapes, dtypes, devices: metadata only, never a host sync).


def _as_rows(name: str, t, dim: Optional[int]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() not in (1, 2):
        raise ValueError(f"{name} must be [B, V] or [V], got shape {tuple(t.shape)}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} has {t.dim()} dimensions but llm_logits has {dim}; give all inputs the same rank")
    t2 = t.unsqueeze(0) if t.dim() == 1 else t
    if t2.shape[1] > 1 and t2.stride(1) != 1:
        # The kernels need unit stride along the vocabulary; any row stride is fine.
        t2 = t2.contiguous()
    return t2


def prepare(llm_logits, slm_ctx_logits, slm_noctx_logits, cfg, out, mode, backend):
    """Validate metadata and normalize to 2-D views. Returns (zl, zc, zn, hp, out2, squeeze, backend)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if cfg is None:
        cfg = SteerConfig()
    elif not isinstance(cfg, SteerConfig):
        raise TypeError(f"cfg must be a SteerConfig or None, got {type(cfg).__name__}")
    zl = _as_rows("llm_logits", llm_logits, None)
    rank = llm_logits.dim()
    zc = _as_rows("slm_ctx_logits", slm_ctx_logits, rank)
    zn = None if slm_noctx_logits is None else _as_rows("slm_noctx_logits", slm_noctx_logits, rank)
    B, V = zl.shape
    for name, t in (("slm_ctx_logits", zc), ("slm_noctx_logits", zn)):
        if t is None:
            continue
        if t.shape != zl.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but llm_logits has {tuple(zl.shape)}; they must match")
        if t.device != zl.device:
            raise ValueError(f"{name} is on {t.device} but llm_logits is on {zl.device}; put all inputs on one device")
    if V == 0:
        raise ValueError("llm_logits has an empty vocabulary dimension (V = 0)")
    hp = cfg.packed(B if cfg.per_row else None, zl.device)
    name = dispatch.resolve_backend(backend, zl.device)
    if out is None:
        out2 = None
    else:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if out.dtype != torch.float32:
            raise TypeError(f"out must be float32, got {out.dtype}")
        if tuple(out.shape) != tuple(llm_logits.shape):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(llm_logits.shape)}")
        if out.device != zl.device:
            raise ValueError(f"out is on {out.device} but the inputs are on {zl.device}")
        out2 = out.unsqueeze(0) if out.dim() == 1 else out
        if V > 1 and out2.stride(1) != 1:
            raise ValueError("out must have unit stride along the vocabulary dimension")
    return zl, zc, zn, hp, out2, rank == 1, name


def steer(
    llm_logits: torch.Tensor,
    slm_ctx_logits: torch.Tensor,
    slm_noctx_logits: Optional[torch.Tensor],
    cfg: Optional[SteerConfig] = None,
    *,
    mode: str = "closed_form",
    backend: Optional[str] = None,
    out: Optional[torch.Tensor] = None,
    validate: bool = True,
) -> torch.Tensor:
    """CoSteer: steer the LLM's next-token distribution with the small model's context delta.

    Computes ``log_softmax(z_L + c_T (z_c - z_n))``, which equals the paper's T-step update
    exactly (``docs/closed_form.md``), in one fused pass.

    Args:
        llm_logits: cloud LLM logits z_L, [B, V] or [V]; float32, float16 or bfloat16.
        slm_ctx_logits: small-model logits with the private context z_c, same shape.
        slm_noctx_logits: small-model logits without the context z_n, same shape; ``None`` means
            ``slm_ctx_logits`` already holds the delta z_c - z_n.
        cfg: :class:`SteerConfig`; fields may be 1-D tensors of length B (per-row settings).
        mode: ``"closed_form"`` (one streaming pass) or ``"iterative"`` (the literal T-step loop,
            inside the kernel; a check, and the base for non-affine variants).
        backend: ``"triton"``, ``"torch"``, ``"cpu"`` / ``"cuda"`` (C++, when built) or ``None``
            (the fastest available for the device).
        out: optional float32 output of the result's shape (any row stride).
        validate: raise ValueError for rows with NaN/+inf inputs, no finite LLM logit or invalid
            per-row settings (one host sync, reading the kernel's own statistics). With
            ``validate=False`` nothing is read back (CUDA-graph safe) and such rows are all-NaN.

    -inf: in ``llm_logits`` bans a token; in both small-model rows it is a shared mask (no delta);
    in ``slm_ctx_logits`` alone it bans the token (c_T > 0); in ``slm_noctx_logits`` alone the row
    is invalid.

    Returns:
        float32 log-probs of the inputs' shape (``out`` when given).
    """
    zl, zc, zn, hp, out2, squeeze, name = prepare(
        llm_logits, slm_ctx_logits, slm_noctx_logits, cfg, out, mode, backend
    )
    if out2 is None:
        res, status = torch.ops.costeer.steer(zl, zc, zn, hp, mode, name)
    else:
        status = torch.ops.costeer.steer_out(zl, zc, zn, hp, out2, mode, name)
        res = out2
    if validate:
        raise_for_status(status)
    if out is not None:
        return out
    return res.squeeze(0) if squeeze else res
