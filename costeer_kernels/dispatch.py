"""Backend registry and the default choice per device.

A backend is ``fn(zl, zc, zn_or_None, hparams, out, mode) -> int32 status [B]``: it reads [B, V]
inputs with unit column stride (any row stride, fp32/fp16/bf16), writes float32 log-probs into
``out`` and never syncs with the host.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

BackendFn = Callable[..., torch.Tensor]
_BACKENDS: Dict[str, BackendFn] = {}
_UNAVAILABLE: Dict[str, str] = {}
# Backends that also gather the small-model rows through a vocabulary map (steer(vocab_map=...)):
# ``fn(zl, zc, zn_or_None, hp, slm_index, drop, out, mode) -> int32 status [B]`` where
# ``slm_index`` is int32 [V_llm] (-1 or out of range: no small-model counterpart) and ``drop``
# says whether such LLM tokens are excluded (-inf) or keep their LLM logit.
_VOCAB_MAP_BACKENDS: Dict[str, BackendFn] = {}

# backend=None picks the first available name in this order. CUDA: Triton until the CUDA C++
# kernel is measured to beat it (bench/RESULTS.md). CPU: the C++ kernel when it is built; the
# Triton interpreter is never a default (it is a test vehicle, thousands of times slower).
DEFAULT_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


def register_backend(name: str, fn: BackendFn) -> None:
    _BACKENDS[name] = fn
    _UNAVAILABLE.pop(name, None)


def register_vocab_map_backend(name: str, fn: BackendFn) -> None:
    """Declare that backend ``name`` supports ``vocab_map`` (see ``_VOCAB_MAP_BACKENDS``)."""
    _VOCAB_MAP_BACKENDS[name] = fn


def supports_vocab_map(name: str) -> bool:
    return name in _VOCAB_MAP_BACKENDS


def get_vocab_map_backend(name: str) -> BackendFn:
    return _VOCAB_MAP_BACKENDS[name]


def mark_unavailable(name: str, reason: str) -> None:
    if name not in _BACKENDS:
        _UNAVAILABLE[name] = reason


def available_backends() -> tuple:
    _load_optional()
    return tuple(_BACKENDS)


_LOADED = False


def _load_optional() -> None:
    # Importing registers what can run here; failures are remembered with their reason. Once per
    # process, and never while torch.compile traces (imports and try/except do not trace).
    global _LOADED
    if _LOADED or torch.compiler.is_compiling():
        return
    _LOADED = True
    if "triton" not in _BACKENDS and "triton" not in _UNAVAILABLE:
        try:
            from .triton import steer as _tsteer

            register_backend("triton", _tsteer.steer_triton)
            register_vocab_map_backend("triton", _tsteer.steer_triton_mapped)
        except Exception as exc:  # pragma: no cover - depends on the install
            mark_unavailable("triton", f"triton could not be imported: {exc}")
    try:
        from . import _extension

        _extension.register_backends()
    except ImportError:
        pass


def resolve_backend(backend, device: torch.device, *, vocab_map: bool = False) -> str:
    """The backend to run: ``backend`` checked, or the default for ``device`` when None/"auto".

    ``vocab_map=True``: only backends that gather through a vocabulary map qualify; the default
    skips the others, and naming one raises ValueError.
    """
    _load_optional()
    if backend is None or backend == "auto":
        for name in DEFAULT_ORDER.get(device.type, ("torch",)):
            if name in _BACKENDS and _supports(name, device) and (not vocab_map or name in _VOCAB_MAP_BACKENDS):
                return name
        return "torch"
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
    if backend not in _BACKENDS:
        why = _UNAVAILABLE.get(backend)
        known = sorted(set(_BACKENDS) | set(_UNAVAILABLE))
        if why:
            raise ValueError(f"backend={backend!r} is not available here: {why}")
        raise ValueError(f"backend must be one of {known} or None, got {backend!r}")
    if not _supports(backend, device):
        if backend == "triton":
            raise ValueError(
                "backend='triton' got CPU tensors: run on a GPU, or set TRITON_INTERPRET=1 before "
                "importing triton to run the kernel in Triton's CPU interpreter (slow; for testing)"
            )
        raise ValueError(f"backend={backend!r} cannot run on {device.type} tensors")
    if vocab_map and backend not in _VOCAB_MAP_BACKENDS:
        raise ValueError(
            f"backend={backend!r} does not support vocab_map; use one of {sorted(_VOCAB_MAP_BACKENDS)} "
            "or backend=None (picks a supporting backend)"
        )
    return backend


def _supports(name: str, device: torch.device) -> bool:
    if name == "cuda":
        return device.type == "cuda"
    if name == "cpu":
        return device.type == "cpu"
    if name == "triton":
        if device.type == "cuda":
            return True
        from .triton.steer import INTERPRET

        return device.type == "cpu" and INTERPRET
    return True


def get_backend(name: str) -> BackendFn:
    return _BACKENDS[name]


def _torch_backend(zl, zc, zn, hp, out, mode):
    from .torch_backend import steer_torch

    return steer_torch(zl, zc, zn, hp, out, mode)


def _torch_mapped_backend(zl, zc, zn, hp, slm_index, drop, out, mode):
    from .torch_backend import steer_torch_mapped

    return steer_torch_mapped(zl, zc, zn, hp, slm_index, drop, out, mode)


register_backend("torch", _torch_backend)
register_vocab_map_backend("torch", _torch_mapped_backend)
