"""Argument checks of the public ops: metadata only (shapes, dtypes, devices, Python scalars),
never a host sync, except the documented value checks of ``validate=True`` in eager mode.

Every failure is a TypeError (wrong kind of value) or ValueError (wrong value) that names the
argument and what was expected.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .config import SteerConfig

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("closed_form", "iterative")
UNMAPPED = ("keep", "drop")
INT32_MAX = 2**31 - 1
FLT_MAX = 3.4028234663852886e38
# Draws per call: num_samples * B token ids (and their log-probs) are allocated up front.
MAX_DRAWS = 1 << 26

_DEFAULT_CFG = SteerConfig()


def host_checks(validate: bool) -> bool:
    """Whether value checks that read device data back may run: eager mode with ``validate``
    (torch.compile cannot trace a host read; there ``validate`` becomes an in-graph assert)."""
    return bool(validate) and not torch.compiler.is_compiling()


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def check_cfg(cfg) -> SteerConfig:
    if cfg is None:
        return _DEFAULT_CFG  # built once: validating a config costs more than the B=1 kernel
    if not isinstance(cfg, SteerConfig):
        raise TypeError(f"cfg must be a SteerConfig or None, got {type(cfg).__name__}")
    return cfg


def check_unmapped(unmapped) -> bool:
    """True for "drop"."""
    if unmapped not in UNMAPPED:
        raise ValueError(f"unmapped must be one of {UNMAPPED}, got {unmapped!r}")
    return unmapped == "drop"


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def as_rows(name: str, t, rank: Optional[int] = None) -> torch.Tensor:
    """``t`` as a 2-D [B, V] view with unit stride along V; ``rank``: the rank it must have."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() not in (1, 2):
        raise ValueError(f"{name} must be [B, V] or [V], got shape {tuple(t.shape)}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} has {t.dim()} dimensions but llm_logits has {rank}; give all inputs the same rank")
    t2 = t.unsqueeze(0) if t.dim() == 1 else t
    if t2.shape[1] > 1 and t2.stride(1) != 1:
        # The kernels need unit stride along the vocabulary; any row stride is fine.
        t2 = t2.contiguous()
    return t2


class Rows(NamedTuple):
    zl: torch.Tensor
    zc: torch.Tensor
    zn: Optional[torch.Tensor]
    rank: int


def logit_rows(llm_logits, slm_ctx_logits, slm_noctx_logits, *, same_width: bool) -> Rows:
    """The three logit inputs as [B, *] rows on one device with one batch size.

    ``same_width``: the small-model rows must have the LLM's width (no vocab_map, no vocab_size).
    """
    zl = as_rows("llm_logits", llm_logits)
    rank = llm_logits.dim()
    zc = as_rows("slm_ctx_logits", slm_ctx_logits, rank)
    zn = None if slm_noctx_logits is None else as_rows("slm_noctx_logits", slm_noctx_logits, rank)
    B, V = zl.shape
    for name, t in (("slm_ctx_logits", zc), ("slm_noctx_logits", zn)):
        if t is None:
            continue
        if same_width and t.shape != zl.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but llm_logits has {tuple(zl.shape)}; they must match")
        if t.shape[0] != B:
            raise ValueError(f"{name} has {t.shape[0]} rows but llm_logits has {B}; they must match")
        if t.device != zl.device:
            raise ValueError(f"{name} is on {t.device} but llm_logits is on {zl.device}; put all inputs on one device")
    if zn is not None and zn.shape[1] != zc.shape[1]:
        raise ValueError(f"slm_noctx_logits has width {zn.shape[1]} but slm_ctx_logits has {zc.shape[1]}; "
                         "the small-model rows must match")
    if V == 0:
        raise ValueError("llm_logits has an empty vocabulary dimension (V = 0)")
    if zc.shape[1] == 0:
        raise ValueError("slm_ctx_logits has an empty vocabulary dimension")
    return Rows(zl, zc, zn, rank)


def packed_hparams(cfg: SteerConfig, B: int, device: torch.device) -> torch.Tensor:
    return cfg.packed(B if cfg.per_row else None, device)


def check_out(out, llm_logits: torch.Tensor, zl: torch.Tensor) -> Optional[torch.Tensor]:
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
    B, V = out2.shape
    if V > 1 and out2.stride(1) != 1:
        raise ValueError("out must have unit stride along the vocabulary dimension")
    if B > 1 and V > 0 and out2.stride(0) < V:
        # An expanded or otherwise overlapping out: rows would overwrite each other.
        raise ValueError(f"out has overlapping rows (row stride {out2.stride(0)} < V={V}); pass a tensor whose "
                         "rows do not alias, e.g. torch.empty(B, V)")
    return out2


def check_vocab_size(vocab_size, widths) -> Optional[int]:
    """None, or N after checking 1 <= N <= every width in ``widths`` ({name: width})."""
    if vocab_size is None:
        return None
    if isinstance(vocab_size, (bool, torch.Tensor)) or not hasattr(vocab_size, "__index__"):
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
    given) and is narrowed. Raw tensors are range-checked against ``slm_width`` with ``validate``
    in eager mode (one host sync); otherwise entries outside [0, slm_width) become -1 (no
    counterpart) on the device, so no entry can wrap around into another token's index.
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
    if checked and idx.dtype == torch.int32:
        return idx.contiguous()
    if host_checks(validate) and not checked and idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1 or hi >= slm_width:
            bad = lo if lo < -1 else hi
            raise ValueError(
                f"vocab_map has an out-of-range entry {bad}: entries must be -1 (no counterpart) or in "
                f"[0, {slm_width}) (the small model's width)"
            )
    # Range-clamp in the source dtype before narrowing: a wide entry must not wrap to a valid id.
    ok = (idx >= 0) & (idx < slm_width)
    return torch.where(ok, idx, torch.full_like(idx, -1)).to(torch.int32).contiguous()


def check_num_samples(num_samples, B: int) -> int:
    if num_samples is not None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be None or an int >= 1, got {num_samples!r}")
        if num_samples * max(B, 1) > MAX_DRAWS:
            raise ValueError(f"num_samples={num_samples} draws for {B} rows exceed {MAX_DRAWS} token ids per call; "
                             "draw in several calls (advance offset)")
    return 1 if num_samples is None else num_samples


# ---------------------------------------------------------------------------------------------
# Sampling parameters: every one a Python number or a tensor (0-d, [1] or [B]) on the inputs'
# device, turned into a [1] or [B] tensor of the kernels' dtype.

_RULES = {
    "temperature": "finite, >= 0 and within float32's range (0 = greedy)",
    "top_k": "an integer >= 0 (0 = off; values >= V keep every token)",
    "top_p": "in (0, 1] (1 = off)",
    "min_p": "in [0, 1] (0 = off)",
    "offset": "an integer in [0, 2^63)",
    "seed": "an integer",
}
_SCALAR_OK = {
    "temperature": lambda v: math.isfinite(v) and 0 <= v <= FLT_MAX,
    "top_k": lambda v: v >= 0,
    "top_p": lambda v: 0 < v <= 1,
    "min_p": lambda v: 0 <= v <= 1,
    "offset": lambda v: 0 <= v < 2**63,
}
_TENSOR_OK = {
    "temperature": lambda t: torch.isfinite(t) & (t >= 0) & (t <= FLT_MAX),
    "top_k": lambda t: t >= 0,
    "top_p": lambda t: (t > 0) & (t <= 1),
    "min_p": lambda t: (t >= 0) & (t <= 1),
    "offset": lambda t: t >= 0,
}
_PARAM_CACHE: dict = {}


def _const(value, dtype, device) -> torch.Tensor:
    # Cached so repeated calls with Python scalars copy nothing from the host again.
    key = (value, dtype, device)
    t = _PARAM_CACHE.get(key)
    if t is None:
        if len(_PARAM_CACHE) > 1024:
            _PARAM_CACHE.clear()
        t = torch.tensor([value], dtype=dtype, device=device)
        _PARAM_CACHE[key] = t
    return t


def _wrap64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def sample_param(name: str, value, B: int, device: torch.device, dtype: torch.dtype, validate: bool) -> torch.Tensor:
    """A [1] or [B] tensor of ``dtype`` on ``device``.

    Out-of-range tensor entries raise with ``validate`` in eager mode; otherwise they are clamped
    on the device to a documented value (temperature: greedy; top_k: off past int32; top_p,
    min_p: into range), so nothing wraps around (a top_k of 2**32 + 1 is not 1).
    """
    integer = dtype in (torch.int32, torch.int64)
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] not in (1, B)):
            raise ValueError(f"{name} as a tensor must be 0-d, [1] or [B={B}], got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the inputs are on {device}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real numeric tensor, got {value.dtype}")
        t = value.reshape(-1)
        if host_checks(validate):
            if integer and t.is_floating_point() and not bool((t == torch.floor(t)).all()):
                raise ValueError(f"{name} must hold integers, got {t.tolist()}")
            ok_fn = _TENSOR_OK.get(name)
            if ok_fn is not None:
                ok = ok_fn(t.double() if t.is_floating_point() else t)
                if not bool(ok.all()):
                    bad = t[~ok][0].item()
                    raise ValueError(f"{name} has an invalid value {bad}: must be {_RULES[name]}")
        if name == "top_k":
            # Wider than int32: clamp before narrowing (any k >= V means "off").
            t = t.clamp(min=0, max=INT32_MAX) if not t.is_floating_point() else t.clamp(0, INT32_MAX)
        elif name == "temperature":
            t = t.float()
            t = torch.where(torch.isfinite(t), t, torch.zeros_like(t))  # inf/NaN: greedy
        return t.to(dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if integer and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value}")
        value = int(value)
    if name == "seed":
        value = _wrap64(int(value))
    check = _SCALAR_OK.get(name)
    if check is not None and not check(value):
        raise ValueError(f"{name} must be {_RULES[name]}, got {value}")
    if name == "top_k":
        value = min(int(value), INT32_MAX)
    return _const(value, dtype, device)
