"""Few-row matrix products for a model's decode steps on CPU.

A decode step of the embedded pair multiplies 1-3 rows per request by every weight matrix, and
BLAS handles those shapes badly here: on a 2-core AMD EPYC, MKL's product of 2-3 rows takes
1.5-3.3x one row's time and reads the vocabulary head at 3-8 GB/s (bench/bench_linear.py).
``use_linear_rows(model)`` routes each ``nn.Linear`` of a model through
``costeer_kernels.linear_rows`` (every weight read once for all rows) whenever the call has at
most ``max_rows`` rows, on CPU, in float32, without autograd; anything else (prefill, training,
GPU, half precision) keeps ``F.linear``. Results equal ``F.linear`` up to float32 rounding of the
dot products (the summation order differs).

A layer given the Q8_0 blocks of its own weight (``attach_q8_0``: the model cache does it for a
GGUF model's vocabulary head stored as Q8_0) reads those instead: a quarter of the bytes, the
float32 weight's result bit for bit (``costeer_kernels.q8_0``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["use_linear_rows", "attach_q8_0", "q8_0_weight", "DEFAULT_MAX_ROWS"]

# Up to 32-64 rows the kernel beat MKL at every shape of SmolLM2 and Gemma 3 270M measured
# (bench/bench_linear.py); beyond, the product becomes compute-bound and BLAS's blocking wins.
DEFAULT_MAX_ROWS = 32


def _kernel():
    # The C++ library only: resolving through the registry would also import the Triton backend,
    # which a CPU process does not need before its first steering call (start-up time, issue 21).
    from costeer_kernels import _extension

    return _extension.linear_cpp if _extension.load_extension() else None


def attach_q8_0(module: nn.Linear, blocks: torch.Tensor) -> None:
    """Give ``module`` the Q8_0 blocks of its float32 weight (exactly its values, the caller's
    guarantee: the model cache checks it at the build), for the few-row kernel to read instead.

    They are used while the weight is the one they were attached to, unchanged: a weight written
    in place (its version counter moves), replaced or converted to another dtype or device drops
    them (``q8_0_weight`` returns None).
    """
    from costeer_kernels.q8_0 import q8_0_shape

    if type(module) is not nn.Linear or not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8:
        raise TypeError("attach_q8_0 needs an nn.Linear and its Q8_0 blocks as a uint8 tensor")
    if q8_0_shape(blocks, "blocks") != tuple(module.weight.shape):
        raise ValueError(f"blocks hold a {q8_0_shape(blocks)} weight but the layer's is {tuple(module.weight.shape)}")
    w = module.weight
    module._costeer_q8_0 = (blocks.contiguous(), w._version, w.data_ptr(), w.dtype, w.device)


def q8_0_weight(module: nn.Module):
    """The Q8_0 blocks attached to ``module`` (``attach_q8_0``) if its weight is still the float32
    CPU tensor they came from, else None."""
    rec = getattr(module, "_costeer_q8_0", None)
    if rec is None:
        return None
    blocks, version, ptr, dtype, device = rec
    w = module.weight
    if w._version != version or w.data_ptr() != ptr or w.dtype != dtype or w.device != device or dtype != torch.float32:
        return None
    return blocks


class _FewRowForward:
    """The replacement ``forward`` of one ``nn.Linear`` (an instance attribute, so the module's
    class, parameters, state dict and hooks are untouched). Written for the per-call cost: a
    SmolLM2 decode step makes 210 of these calls, and each microsecond here is 0.2 ms a step
    (parameters read from ``_parameters``, not through ``nn.Module.__getattr__``)."""

    __slots__ = ("module", "max_rows", "kernel", "limit")

    def __init__(self, module: nn.Linear, max_rows: int, kernel):
        self.module = module
        self.max_rows = max_rows
        self.kernel = kernel
        self.limit = max_rows * module.in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        params = m._parameters
        w, b = params["weight"], params["bias"]
        n = x.numel()
        if (0 < n <= self.limit and x.dtype is torch.float32 and x.is_cpu and w.is_cpu
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
                and not torch.compiler.is_compiling()):
            rec = m.__dict__.get("_costeer_q8_0")
            if rec is not None and rec[1] == w._version and rec[2] == w.data_ptr() and w.dtype is torch.float32:
                w = rec[0]
            y = self.kernel(x.view(-1, x.shape[-1]) if x.is_contiguous() else x.reshape(-1, x.shape[-1]), w, b)
            return y.view(x.shape[:-1] + (y.shape[1],))
        return F.linear(x, w, b)


def use_linear_rows(model: nn.Module, max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Route ``model``'s ``nn.Linear`` layers through the few-row kernel; returns how many.

    Parameters
    ----------
    model : torch.nn.Module
        Any module; only layers whose type is exactly ``nn.Linear`` are changed (quantized or
        otherwise specialized subclasses keep their own forward). Calling it again updates
        ``max_rows``.
    max_rows : int
        Calls with at most this many rows (the product of the leading dimensions) use the kernel.

    Returns
    -------
    int
        The number of layers routed; 0 when the C++ kernel is not available here (nothing changes).

    Examples
    --------
    >>> import torch
    >>> from costeer.fast_linear import use_linear_rows
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    >>> x = torch.randn(3, 64)
    >>> with torch.no_grad():
    ...     before = net(x)
    ...     n = use_linear_rows(net)
    ...     after = net(x)
    >>> n in (0, 2), bool(torch.allclose(before, after, atol=1e-5))
    (True, True)
    """
    if isinstance(max_rows, bool) or not isinstance(max_rows, int):
        raise TypeError(f"max_rows must be an int, got {type(max_rows).__name__}")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    kernel = _kernel()
    if kernel is None:
        return 0
    n = 0
    for mod in model.modules():
        if type(mod) is nn.Linear:
            mod.forward = _FewRowForward(mod, max_rows, kernel)
            n += 1
    return n
