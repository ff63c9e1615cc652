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

# backend=None picks the first available name in this order. CUDA: Triton until the CUDA C++
# kernel is measured to beat it (bench/RESULTS.md). CPU: the C++ kernel when it is built; the
# Triton interpreter is never a default (it is a test vehicle, thousands of times slower).
DEFAULT_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


def register_backend(name: str, fn: BackendFn) -> None:
    _BACKENDS[name] = fn
    _UNAVAILABLE.pop(name, None)


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
        except Exception as exc:  # pragma: no cover - depends on the install
            mark_unavailable("triton", f"triton could not be imported: {exc}")
    try:
        from . import _extension

        _extension.register_backends()
    except ImportError:
        pass


def resolve_backend(backend, device: torch.device) -> str:
    _load_optional()
    if backend is None or backend == "auto":
        for name in DEFAULT_ORDER.get(device.type, ("torch",)):
            if name in _BACKENDS and _supports(name, device):
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


register_backend("torch", _torch_backend)
