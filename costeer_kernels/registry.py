"""The one backend registry of the public ops (``steer``, ``steer_sample``, ``steer_from_hidden``,
``speculative_verify``) and the resolver that picks a backend for a device.

A backend is a name plus the kernels it implements, each optional:

- ``steer(zl, zc, zn_or_None, hparams, out, mode) -> int32 status [B]``: reads [B, V] inputs with
  unit column stride (any row stride, fp32/fp16/bf16), writes float32 log-probs into ``out``;
- ``steer_mapped(zl, zc, zn_or_None, hparams, slm_index, drop, out, mode) -> status``: the same
  with the small-model rows gathered through ``slm_index`` (int32 [V_llm], -1: no counterpart);
- ``sample(zl, zc, zn_or_None, hparams, params, want_maxp, num_samples)
  -> (token int64 [B, n], logprob float32 [B, n], maxp float32 [B] or None, status int32 [B])``;
- ``steer_hidden(zl, hdiff, weight, hparams, out) -> status`` and
  ``sample_hidden(zl, hdiff, weight, hparams, params, want_maxp, num_samples) -> as sample``:
  the vocabulary projection W @ hdiff fused into the pass (``hdiff`` float32 [B, H]);
- ``verify(zl, zc, zn_or_None, hparams, drafts, draft_logits_or_None, params)
  -> (accepted int64 [B], token int64 [B], status int32 [B])``: speculative verification of B
  requests' k drafts (rows [B (k+1), V], drafts int64 [B, k], ``verify.py``);
- ``linear(x, weight, bias_or_None) -> [M, N]``: ``x @ weight.T + bias`` for a few rows ``x`` [M, K],
  in the dtype of ``x`` (``linear.py``);
- ``attention(q, k, v, mask_or_None, scale) -> [B, Hq, D]``: one query token per row against
  [B, Hkv, L, D] keys and values, grouped heads (``attention.py``).

No kernel syncs with the host. Optional backends ("triton", the C++ "cpu"/"cuda") register on first
use; one that cannot load is remembered with the reason, which ``resolve`` reports.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

KERNELS = ("steer", "steer_mapped", "sample", "steer_hidden", "sample_hidden", "verify", "linear", "attention")

# backend=None picks the first name in this order that runs on the device and has the kernel.
# CUDA: Triton until the CUDA C++ kernel is measured to beat it (bench/RESULTS.md). CPU: the C++
# kernel; the Triton interpreter is never a default (a test vehicle, thousands of times slower).
DEFAULT_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


@dataclass
class Backend:
    name: str
    runs_on: Callable[[torch.device], bool]
    kernels: Dict[str, Callable] = field(default_factory=dict)


_BACKENDS: Dict[str, Backend] = {}
_UNAVAILABLE: Dict[str, str] = {}
_LOADED = False


def register_backend(name: str, runs_on: Callable[[torch.device], bool], **kernels: Callable) -> None:
    """Register (or extend) backend ``name`` with some of the kernels in ``KERNELS``.

    ``runs_on(device) -> bool`` says which tensors it takes. Registering the same name again adds
    or replaces kernels.
    """
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        raise ValueError(f"unknown kernel names {unknown}; expected some of {list(KERNELS)}")
    entry = _BACKENDS.get(name)
    if entry is None:
        entry = _BACKENDS[name] = Backend(name, runs_on)
    else:
        entry.runs_on = runs_on
    entry.kernels.update({k: fn for k, fn in kernels.items() if fn is not None})
    _UNAVAILABLE.pop(name, None)


def mark_unavailable(name: str, reason: str) -> None:
    if name not in _BACKENDS:
        _UNAVAILABLE[name] = reason


def available_backends(kernel: str = "steer") -> Tuple[str, ...]:
    """Names of the backends loaded in this process that implement ``kernel``."""
    _load_optional()
    return tuple(n for n, b in _BACKENDS.items() if kernel in b.kernels)


def unavailable_backends() -> Dict[str, str]:
    """{name: why} for the optional backends that could not be loaded here."""
    _load_optional()
    return dict(_UNAVAILABLE)


def _load_optional() -> None:
    # Importing registers what can run here; failures are remembered with their reason. Once per
    # process, and never while torch.compile traces (imports and try/except do not trace).
    global _LOADED
    if _LOADED or torch.compiler.is_compiling():
        return
    _LOADED = True
    try:
        from .triton import register as _triton_register

        _triton_register()
    except Exception as exc:  # pragma: no cover - depends on the install
        mark_unavailable("triton", f"triton could not be imported: {type(exc).__name__}: {exc}")
    from . import _extension

    _extension.register_backends()


def kernel(name: str, kernel_name: str) -> Optional[Callable]:
    """The ``kernel_name`` function of backend ``name``, or None."""
    entry = _BACKENDS.get(name)
    return None if entry is None else entry.kernels.get(kernel_name)


def has_kernel(name: str, kernel_name: str) -> bool:
    return kernel(name, kernel_name) is not None


def resolve(kernel_name: str, backend, device: torch.device) -> str:
    """The backend that runs ``kernel_name`` on ``device``: ``backend`` checked, or the device's
    default when None/"auto". Raises TypeError/ValueError naming ``backend`` and the choices."""
    _load_optional()
    if backend is None or backend == "auto":
        for name in DEFAULT_ORDER.get(device.type, ("torch",)):
            entry = _BACKENDS.get(name)
            if entry is not None and kernel_name in entry.kernels and entry.runs_on(device):
                return name
        return "torch"
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
    entry = _BACKENDS.get(backend)
    if entry is None:
        why = _UNAVAILABLE.get(backend)
        if why:
            raise ValueError(f"backend={backend!r} is not available here: {why}")
        known = sorted(set(_BACKENDS) | set(_UNAVAILABLE))
        raise ValueError(f"backend must be one of {known} or None, got {backend!r}")
    if not entry.runs_on(device):
        if backend == "triton":
            raise ValueError(
                "backend='triton' got CPU tensors: run on a GPU, or set TRITON_INTERPRET=1 before "
                "importing triton to run the kernel in Triton's CPU interpreter (slow; for testing)"
            )
        raise ValueError(f"backend={backend!r} cannot run on {device.type} tensors")
    if kernel_name not in entry.kernels:
        have = sorted(n for n, b in _BACKENDS.items() if kernel_name in b.kernels)
        what = {"steer_mapped": "vocab_map", "sample": "sampling"}.get(kernel_name, kernel_name)
        raise ValueError(f"backend={backend!r} does not support {what}; use one of {have} or backend=None")
    return backend


def on_cpu(device: torch.device) -> bool:
    return device.type == "cpu"


def on_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def anywhere(device: torch.device) -> bool:
    return True
