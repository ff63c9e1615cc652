"""Few-row matrix products for a model's decode steps on CPU.

A decode step of the embedded pair multiplies 1-3 rows per request by every weight matrix, and
BLAS handles those shapes badly here: on a 2-core AMD EPYC, MKL's product of 2-3 rows takes
1.5-3.3x one row's time and reads the vocabulary head at 3-8 GB/s (bench/bench_linear.py).
``use_linear_rows(model)`` routes each ``nn.Linear`` of a model through
``costeer_kernels.linear_rows`` (every weight read once for all rows) whenever the call has at
most ``max_rows`` rows, on CPU, in float32, without autograd; anything else (prefill, training,
GPU, half precision) keeps ``F.linear``. Results equal ``F.linear`` up to float32 rounding of the
dot products (the summation order differs).

A layer given the GGML blocks of its own weight (``attach_blocks``: the model cache does it for a
GGUF model's vocabulary head stored as Q8_0 and its layers stored as Q4_1, Q5_0, Q8_0, Q4_K or
Q6_K) reads those instead: 18-34 bytes per 32 weights instead of 128, the float32 weight's result bit for bit
(``costeer_kernels.blocks``). Such a layer also takes the kernel for calls of up to ``block_rows``
rows (prefill included): on the 2-core AMD Zen 5 measured, SmolLM2's 210 Q4_1 products from
their blocks beat MKL's float32 GEMM at every row count tried (37 rows 33 against 77 ms, 74 rows
58 against 121, 1024 rows 0.92 against 1.15 s), so there the default is every call; on Intel CPUs
(MKL's own, not compared at prefill sizes) the default stays ``max_rows``. ``COSTEER_BLOCK_ROWS``
(an int, or "all") sets it.
"""
from __future__ import annotations

import os
import platform
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["use_linear_rows", "attach_blocks", "detach_blocks", "attach_q8_0", "attached_blocks", "q8_0_weight",
           "DEFAULT_MAX_ROWS", "default_block_rows"]

# Up to 32-64 rows the kernel beat MKL at every shape of SmolLM2 and Gemma 3 270M measured
# (bench/bench_linear.py); beyond, the product becomes compute-bound and BLAS's blocking wins.
DEFAULT_MAX_ROWS = 32


def default_block_rows(max_rows: int = DEFAULT_MAX_ROWS) -> Optional[int]:
    """The row limit of the kernel for layers with GGUF blocks attached: ``COSTEER_BLOCK_ROWS``
    (an int >= 1, or "all": None, no limit), else None on x86-64 CPUs other than Intel's (measured
    faster than BLAS at every row count on the AMD Zen 5), else ``max_rows``."""
    env = os.environ.get("COSTEER_BLOCK_ROWS", "").strip()
    if env:
        if env.lower() == "all":
            return None
        try:
            rows = int(env)
        except ValueError:
            rows = 0
        if rows < 1:
            raise ValueError(f"COSTEER_BLOCK_ROWS must be an int >= 1 or \"all\", got {env!r}")
        return rows
    from costeer_kernels._extension import cpu_vendor

    if platform.machine().lower() in ("x86_64", "amd64") and cpu_vendor() not in ("", "GenuineIntel"):
        return None
    return max_rows


def _kernel():
    # The C++ library only: resolving through the registry would also import the Triton backend,
    # which a CPU process does not need before its first steering call (start-up time, issue 21).
    from costeer_kernels import _extension

    return _extension.linear_cpp if _extension.load_extension() else None


def attach_blocks(module: nn.Linear, blocks: torch.Tensor) -> str:
    """Give ``module`` the GGML blocks (Q8_0, Q5_0, Q4_1, Q4_K or Q6_K, a uint8 tensor) of its float32
    weight (exactly its values, the caller's guarantee: the model cache checks it at the build), for
    the few-row kernel to read instead; returns the format ("q8_0", "q5_0", "q4_1", "q4_k", "q6_k").

    They are used while the weight is the one they were attached to, unchanged: a weight written
    in place (its version counter moves), replaced or converted to another dtype or device drops
    them (``attached_blocks`` returns None). A write through ``weight.data`` (``.data.mul_(2)``,
    ``.data += delta``) does not move the weight's version counter and is NOT seen: call
    ``detach_blocks(module)`` after one.
    """
    from costeer_kernels.blocks import block_format

    if type(module) is not nn.Linear or not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8:
        raise TypeError("attach_blocks needs an nn.Linear and its GGML blocks (Q8_0, Q5_0, Q4_1, Q4_K, Q6_K) as a "
                        "uint8 tensor")
    fmt = block_format(blocks, module.in_features, "blocks")
    if blocks.shape[0] != module.out_features:
        raise ValueError(f"blocks hold {blocks.shape[0]} rows but the layer has {module.out_features} outputs")
    w = module.weight
    module._costeer_blocks = (blocks.contiguous(), w._version, w.data_ptr(), w.dtype, w.device, fmt)
    return fmt


def detach_blocks(module: nn.Module) -> bool:
    """Drop the blocks ``attach_blocks`` gave ``module`` (the layer reads its float32 weight again);
    whether there were any."""
    return module.__dict__.pop("_costeer_blocks", None) is not None


def attach_q8_0(module: nn.Linear, blocks: torch.Tensor) -> None:
    """``attach_blocks`` for Q8_0 blocks only (the vocabulary head, which ``steer_from_hidden``
    also reads: ``q8_0_weight``); ValueError for blocks of another shape."""
    from costeer_kernels.q8_0 import q8_0_shape

    if type(module) is not nn.Linear or not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8:
        raise TypeError("attach_q8_0 needs an nn.Linear and its Q8_0 blocks as a uint8 tensor")
    if q8_0_shape(blocks, "blocks") != tuple(module.weight.shape):
        raise ValueError(f"blocks hold a {q8_0_shape(blocks)} weight but the layer's is {tuple(module.weight.shape)}")
    attach_blocks(module, blocks)


def attached_blocks(module: nn.Module):
    """``(blocks, format)`` attached to ``module`` (``attach_blocks``) if its weight is still the
    float32 CPU tensor they came from, else None."""
    rec = getattr(module, "_costeer_blocks", None)
    if rec is None:
        return None
    blocks, version, ptr, dtype, device, fmt = rec
    w = module.weight
    if w._version != version or w.data_ptr() != ptr or w.dtype != dtype or w.device != device or dtype != torch.float32:
        return None
    return blocks, fmt


def q8_0_weight(module: nn.Module):
    """The Q8_0 blocks attached to ``module`` if its weight is still the float32 CPU tensor they
    came from, else None (also when the blocks attached are of another format)."""
    got = attached_blocks(module)
    return got[0] if got is not None and got[1] == "q8_0" else None


class _FewRowForward:
    """The replacement ``forward`` of one ``nn.Linear`` (an instance attribute, so the module's
    class, parameters, state dict and hooks are untouched). Written for the per-call cost: a
    SmolLM2 decode step makes 210 of these calls, and each microsecond here is 0.2 ms a step
    (parameters read from ``_parameters``, not through ``nn.Module.__getattr__``)."""

    __slots__ = ("module", "max_rows", "kernel", "limit", "block_limit")

    def __init__(self, module: nn.Linear, max_rows: int, kernel, block_rows: Optional[int] = None):
        self.module = module
        self.max_rows = max_rows
        self.kernel = kernel
        self.limit = max_rows * module.in_features
        # Elements of x (rows x in_features) up to which a layer with blocks takes the kernel.
        self.block_limit = float("inf") if block_rows is None else max(max_rows, block_rows) * module.in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        params = m._parameters
        w, b = params["weight"], params["bias"]
        n = x.numel()
        if (0 < n <= self.block_limit and x.dtype is torch.float32 and x.is_cpu and w.is_cpu
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
                and not torch.compiler.is_compiling()):
            rec = m.__dict__.get("_costeer_blocks")
            if rec is not None and rec[1] == w._version and rec[2] == w.data_ptr() and w.dtype is torch.float32:
                w = rec[0]
            elif n > self.limit:
                return F.linear(x, w, b)
            y = self.kernel(x.view(-1, x.shape[-1]) if x.is_contiguous() else x.reshape(-1, x.shape[-1]), w, b)
            return y.view(x.shape[:-1] + (y.shape[1],))
        return F.linear(x, w, b)


def use_linear_rows(model: nn.Module, max_rows: int = DEFAULT_MAX_ROWS, block_rows="default") -> int:
    """Route ``model``'s ``nn.Linear`` layers through the few-row kernel; returns how many.

    Parameters
    ----------
    model : torch.nn.Module
        Any module; only layers whose type is exactly ``nn.Linear`` are changed (quantized or
        otherwise specialized subclasses keep their own forward). Calling it again updates
        ``max_rows``.
    max_rows : int
        Calls with at most this many rows (the product of the leading dimensions) use the kernel.
    block_rows : int, None or "default"
        The same for layers with GGUF blocks attached (``attach_blocks``; never below
        ``max_rows``): None is every call, "default" is ``default_block_rows(max_rows)``.

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
    if isinstance(block_rows, str) and block_rows == "default":
        block_rows = default_block_rows(max_rows)
    elif block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1):
        raise ValueError(f"block_rows must be an int >= 1, None or \"default\", got {block_rows!r}")
    kernel = _kernel()
    if kernel is None:
        return 0
    n = 0
    for mod in model.modules():
        if type(mod) is nn.Linear:
            mod.forward = _FewRowForward(mod, max_rows, kernel, block_rows)
            n += 1
    return n
