"""The public op ``steer`` and its registration as ``torch.ops.costeer.steer`` / ``steer_out``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import dispatch
from .config import SteerConfig
from .status import raise_for_status

_DEFAULT_CFG = SteerConfig()
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("closed_form", "iterative")
UNMAPPED = ("keep", "drop")


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


@torch.library.custom_op("costeer::steer_mapped_out", mutates_args=("out",))
def steer_mapped_out_op(
    llm_logits: torch.Tensor,
    slm_ctx_logits: torch.Tensor,
    slm_noctx_logits: Optional[torch.Tensor],
    hparams: torch.Tensor,
    slm_index: torch.Tensor,
    out: torch.Tensor,
    drop_unmapped: bool = False,
    update: str = "closed_form",
    backend: str = "auto",
) -> torch.Tensor:
    """Different vocabularies: LLM token v reads the small-model rows at ``slm_index[v]`` (int32
    [V_llm]; -1 or out of range: no counterpart, LLM logit kept or, with ``drop_unmapped``, -inf).
    Writes ``out`` (float32 [B, V_llm]); returns int32 status [B]."""
    name = dispatch.resolve_backend(backend, llm_logits.device, vocab_map=True)
    fn = dispatch.get_vocab_map_backend(name)
    return fn(llm_logits, slm_ctx_logits, slm_noctx_logits, hparams, slm_index, drop_unmapped, out, update)


@steer_mapped_out_op.register_fake
def _steer_mapped_out_fake(llm_logits, slm_ctx_logits, slm_noctx_logits, hparams, slm_index, out,
                           drop_unmapped=False, update="closed_form", backend="auto"):
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
        cfg = _DEFAULT_CFG  # built once: validating a config costs more than the B=1 kernel
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
    vocab_map=None,
    unmapped: str = "keep",
    vocab_size: Optional[int] = None,
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

        vocab_map: the models have different vocabularies: a ``costeer.vocab.VocabMap`` or an
            integer tensor [V_llm] giving, for each LLM token, its index in the small model's
            vocabulary (-1: none). The small-model rows are then [B, V_slm] (any V_slm) and are
            gathered inside the kernel. Backends without support are skipped by ``backend=None``;
            naming one raises ValueError. Entries outside [-1, V_slm) raise ValueError with
            ``validate=True`` (one host sync for a raw tensor) and count as unmapped otherwise.
        unmapped: LLM tokens without a counterpart: ``"keep"`` (their LLM logit, no delta) or
            ``"drop"`` (excluded, -inf: the paper's intersection variant).
        vocab_size: the tokenizer's size N when logit widths are padded past it (e.g. 152064
            and 151936): inputs of any widths >= N are accepted and ids >= N come out -inf. The
            result has the LLM's width. Without it, all widths must match (or, with
            ``vocab_map``, the map's length must equal the LLM's width).

    -inf: in ``llm_logits`` bans a token; in both small-model rows it is a shared mask (no delta);
    in ``slm_ctx_logits`` alone it bans the token (c_T > 0); in ``slm_noctx_logits`` alone the row
    is invalid.

    Returns:
        float32 log-probs of the inputs' shape (``out`` when given).
    """
    if unmapped not in UNMAPPED:
        raise ValueError(f"unmapped must be one of {UNMAPPED}, got {unmapped!r}")
    if vocab_map is not None or vocab_size is not None:
        return _steer_general(llm_logits, slm_ctx_logits, slm_noctx_logits, cfg, mode, backend, out, validate,
                              vocab_map, unmapped, vocab_size)
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


# ---------------------------------------------------------------------------------------------
# Different vocabularies (vocab_map) and padded logit rows (vocab_size). Shared with
# projection.steer_from_hidden.


def check_mode_cfg(mode, cfg) -> SteerConfig:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if cfg is None:
        return SteerConfig()
    if not isinstance(cfg, SteerConfig):
        raise TypeError(f"cfg must be a SteerConfig or None, got {type(cfg).__name__}")
    return cfg


def check_vocab_size(vocab_size, widths) -> Optional[int]:
    """None, or N after checking 1 <= N <= every width in ``widths`` ({name: width})."""
    if vocab_size is None:
        return None
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        if isinstance(vocab_size, torch.Tensor) or not hasattr(vocab_size, "__index__"):
            raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
        vocab_size = int(vocab_size)
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    for name, width in widths.items():
        if width < vocab_size:
            raise ValueError(f"{name} has width {width} < vocab_size={vocab_size}; every width must be >= vocab_size")
    return vocab_size


def map_index(vocab_map, n_llm: int, slm_width: int, device: torch.device, validate: bool,
              exact: bool) -> torch.Tensor:
    """The int32 [n_llm] index of ``vocab_map`` (a VocabMap or an integer tensor) on ``device``.

    ``exact``: the map's length must be ``n_llm``; otherwise it must be >= n_llm (vocab_size
    given) and is narrowed. Raw tensors are range-checked against ``slm_width`` when
    ``validate`` (one host sync); a VocabMap was checked when built (its ``slm_size`` is
    compared with ``slm_width`` here, metadata only).
    """
    checked = False
    if isinstance(vocab_map, torch.Tensor):
        idx = vocab_map
    elif isinstance(getattr(vocab_map, "slm_index", None), torch.Tensor):
        slm_size = getattr(vocab_map, "slm_size", None)
        if slm_size is not None and int(slm_size) > slm_width:
            raise ValueError(
                f"vocab_map is for a small-model vocabulary of {int(slm_size)} tokens but the small-model "
                f"rows have width {slm_width}"
            )
        checked = slm_size is not None
        idx = vocab_map.index_on(device) if hasattr(vocab_map, "index_on") else vocab_map.slm_index
    else:
        raise TypeError(f"vocab_map must be a VocabMap, an integer tensor or None, got {type(vocab_map).__name__}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex():
        raise TypeError(f"vocab_map must hold integer indices, got {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"vocab_map must be 1-D [V_llm], got shape {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"vocab_map is on {idx.device} but the inputs are on {device}")
    if exact and idx.shape[0] != n_llm:
        raise ValueError(f"vocab_map has {idx.shape[0]} entries but llm_logits has width {n_llm}; they must match "
                         "(or pass vocab_size)")
    if not exact and idx.shape[0] < n_llm:
        raise ValueError(f"vocab_map has {idx.shape[0]} entries, fewer than vocab_size={n_llm}")
    idx = idx[:n_llm]
    if idx.dtype != torch.int32:
        if validate and idx.numel() and (int(idx.max()) >= 2**31 or int(idx.min()) < -(2**31)):
            raise ValueError("vocab_map has entries outside the int32 range")
        idx = idx.to(torch.int32)
    if validate and not checked and idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1 or hi >= slm_width:
            bad = lo if lo < -1 else hi
            raise ValueError(
                f"vocab_map has an out-of-range entry {bad}: entries must be -1 (no counterpart) or in "
                f"[0, {slm_width}) (the small model's width)"
            )
    return idx.contiguous()


def prepare_out(out, llm_logits, zl: torch.Tensor) -> Optional[torch.Tensor]:
    """``out`` checked against the LLM logits and viewed as 2-D, or None."""
    if out is None:
        return None
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.dtype != torch.float32:
        raise TypeError(f"out must be float32, got {out.dtype}")
    if tuple(out.shape) != tuple(llm_logits.shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(llm_logits.shape)}")
    if out.device != zl.device:
        raise ValueError(f"out is on {out.device} but the inputs are on {zl.device}")
    out2 = out.unsqueeze(0) if out.dim() == 1 else out
    if zl.shape[1] > 1 and out2.stride(1) != 1:
        raise ValueError("out must have unit stride along the vocabulary dimension")
    return out2


def fill_tail(out2: torch.Tensor, n: int, status: torch.Tensor) -> None:
    """Ids >= n (padding past the tokenizer) are -inf; all-NaN for invalid rows, like the rest."""
    if n < out2.shape[1]:
        tail = out2[:, n:]
        fill = torch.where((status != 0)[:, None], float("nan"), float("-inf")).to(torch.float32)
        tail.copy_(fill.expand_as(tail))


def _steer_general(llm_logits, slm_ctx_logits, slm_noctx_logits, cfg, mode, backend, out, validate,
                   vocab_map, unmapped, vocab_size):
    cfg = check_mode_cfg(mode, cfg)
    zl = _as_rows("llm_logits", llm_logits, None)
    rank = llm_logits.dim()
    zc = _as_rows("slm_ctx_logits", slm_ctx_logits, rank)
    zn = None if slm_noctx_logits is None else _as_rows("slm_noctx_logits", slm_noctx_logits, rank)
    B, V = zl.shape
    for name, t in (("slm_ctx_logits", zc), ("slm_noctx_logits", zn)):
        if t is None:
            continue
        if t.shape[0] != B:
            raise ValueError(f"{name} has {t.shape[0]} rows but llm_logits has {B}; they must match")
        if t.device != zl.device:
            raise ValueError(f"{name} is on {t.device} but llm_logits is on {zl.device}; put all inputs on one device")
    if V == 0:
        raise ValueError("llm_logits has an empty vocabulary dimension (V = 0)")
    if vocab_map is not None:
        if zn is not None and zn.shape[1] != zc.shape[1]:
            raise ValueError(f"slm_noctx_logits has width {zn.shape[1]} but slm_ctx_logits has {zc.shape[1]}; "
                             "the small-model rows must match")
        if zc.shape[1] == 0:
            raise ValueError("slm_ctx_logits has an empty vocabulary dimension")
        n = check_vocab_size(vocab_size, {"llm_logits": V})
    else:
        widths = {"llm_logits": V, "slm_ctx_logits": zc.shape[1]}
        if zn is not None:
            widths["slm_noctx_logits"] = zn.shape[1]
        n = check_vocab_size(vocab_size, widths)
    N = V if n is None else n
    idx = None
    if vocab_map is not None:
        idx = map_index(vocab_map, N, zc.shape[1], zl.device, validate, exact=n is None)
    hp = cfg.packed(B if cfg.per_row else None, zl.device)
    name = dispatch.resolve_backend(backend, zl.device, vocab_map=idx is not None)
    out2 = prepare_out(out, llm_logits, zl)
    if out2 is None:
        out2 = torch.empty(B, V, dtype=torch.float32, device=zl.device)
    zl_n, out_n = zl[:, :N], out2[:, :N]
    if idx is None:
        zc_n = zc[:, :N]
        zn_n = None if zn is None else zn[:, :N]
        status = torch.ops.costeer.steer_out(zl_n, zc_n, zn_n, hp, out_n, mode, name)
    else:
        status = torch.ops.costeer.steer_mapped_out(zl_n, zc, zn, hp, idx, out_n, unmapped == "drop", mode, name)
    fill_tail(out2, N, status)
    if validate:
        raise_for_status(status)
    if out is not None:
        return out
    return out2.squeeze(0) if rank == 1 else out2
