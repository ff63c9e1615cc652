"""``linear_rows``: ``x @ weight.T + bias`` for a few rows, the weight read once for all of them.

A decode step multiplies a handful of rows (the LLM's row and the small model's two passes,
co-batched; a few requests) by every weight matrix of a model, so on a CPU the step is bound by
streaming the weights from memory. BLAS libraries tune for large M: measured on a 2-core AMD EPYC
(Zen 5, MKL in torch 2.13), ``F.linear`` of 2-3 rows takes 1.5-3.3x the time of one row, and one
row reads a 49152 x 576 head at 8 GB/s; this op keeps each block of four weight rows in registers
for all M rows (the projection loop of the steering kernels, ``csrc/linear_cpu.cpp``), so 1-8 rows
cost about one pass over the weights (numbers: bench/bench_linear.py, bench/RESULTS.md).

Backends (the ``linear`` kernel of the one registry): "cpu" (the C++ kernel; float32 rows,
fp32/fp16/bf16 weights, accumulation in float32) and "torch" (``F.linear``; any device, the
fallback). Registered as ``torch.ops.costeer.linear_rows`` with a fake implementation, so
``torch.compile`` traces through it. ``costeer.fast_linear`` routes a transformers model's
``nn.Linear`` layers through it for small batches.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import registry
from .blocks import FORMATS, block_format, dequantize_blocks

__all__ = ["linear_rows", "linear_rows_torch"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def linear_rows_torch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The "torch" backend: ``F.linear`` in float32 for float32 rows, else in the rows' dtype (a
    GGML block weight is de-quantized first: exact, but the whole float32 matrix)."""
    if weight.dtype == torch.uint8:
        weight = dequantize_blocks(weight, x.shape[-1])
    w = weight if weight.dtype == x.dtype else weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    return F.linear(x, w, b)


registry.register_backend("torch", registry.anywhere, linear=linear_rows_torch)


def _check(x, weight, bias, weight_format=None) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"linear_rows: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS and not (name == "weight" and t.dtype == torch.uint8):
            raise TypeError(f"linear_rows: {name} must be float32, float16 or bfloat16"
                            f"{' (or uint8: GGML Q8_0, Q5_0, Q4_1, Q4_K or Q6_K blocks)' if name == 'weight' else ''}, got {t.dtype}")
    if weight_format is not None:
        if not isinstance(weight_format, str) or weight_format not in FORMATS:
            raise ValueError(f"linear_rows: weight_format must be one of {sorted(FORMATS)} or None, got {weight_format!r}")
        if weight.dtype != torch.uint8:
            raise ValueError(f"linear_rows: weight_format={weight_format!r} names GGML blocks, but weight is {weight.dtype}")
    if weight.dtype == torch.uint8:
        # The bytes per row tell the block formats apart for the K of x (for the right K: a row
        # size can hold two formats of different K, so weight_format pins the one meant).
        if x.dim() < 1:
            raise ValueError(f"linear_rows: x must be [..., K], got shape {tuple(x.shape)}")
        fmt = block_format(weight, x.shape[-1], "linear_rows: weight")
        if weight_format is not None and fmt != weight_format:
            raise ValueError(f"linear_rows: weight holds {weight.shape[1]} bytes per row: for rows of K = "
                             f"{x.shape[-1]} that is {fmt.upper()}, not the {weight_format.upper()} given as "
                             f"weight_format (x's K is not the weight's)")
        N, K = weight.shape[0], x.shape[-1]
    elif weight.dim() != 2:
        raise ValueError(f"linear_rows: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    else:
        N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"linear_rows: x must be [..., K] with K = {K} (the weight's columns), "
                         f"got shape {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"linear_rows: x is on {x.device} but weight on {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"linear_rows: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (N,):
            raise ValueError(f"linear_rows: bias must be [N] = [{N}], got shape {tuple(bias.shape)}")
        if bias.device != weight.device:
            raise ValueError(f"linear_rows: bias is on {bias.device} but weight on {weight.device}")


def _run(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    name = registry.resolve("linear", None if backend == "auto" else backend, x.device)
    fn = registry.kernel(name, "linear")
    lead = x.shape[:-1]
    rows = x.reshape(lead.numel(), x.shape[-1])
    return fn(rows, weight, bias).reshape(*lead, weight.shape[0])


@torch.library.custom_op("costeer::linear_rows", mutates_args=())
def linear_rows_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   backend: str = "auto") -> torch.Tensor:
    return _run(x, weight, bias, backend)


@linear_rows_op.register_fake
def _linear_rows_fake(x, weight, bias=None, backend="auto"):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))  # GGML block rows too: one per output


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                backend: Optional[str] = None, weight_format: Optional[str] = None) -> torch.Tensor:
    """``x @ weight.T + bias`` with the weight streamed once for all rows of ``x``.

    Parameters
    ----------
    x : torch.Tensor
        [..., K] rows (float32, float16 or bfloat16). The kernel is meant for a few rows (1-32);
        any number works.
    weight : torch.Tensor
        [N, K], as ``nn.Linear.weight`` (float32, float16 or bfloat16). On the "cpu" backend
        half-precision weights are widened in registers and accumulated in float32. Or uint8
        [N, K / 32 * 34]: GGML Q8_0 blocks (``costeer_kernels.q8_0``, a GGUF file's bytes), read at
        a quarter of float32's bytes, or uint8 [N, K / 32 * 20]: GGML Q4_1 blocks
        (``costeer_kernels.q4_1``), a sixth and a half; the "cpu" backend returns exactly what it
        returns for the de-quantized float32 matrix; or Q5_0 blocks [N, K / 32 * 22]
        (``costeer_kernels.q5_0``), or the K-quants Q4_K [N, K / 256 * 144] and Q6_K
        [N, K / 256 * 210] (``costeer_kernels.k_quants``, read from a GGUF file). The formats are told apart by the bytes per row for the K of
        ``x`` (``costeer_kernels.blocks``); for a wrong K a row size can fit another format (220
        bytes: Q4_1 of K = 352 or Q5_0 of K = 320), which ``weight_format`` rules out.
    bias : torch.Tensor, optional
        [N].
    backend : str, optional
        "cpu", "torch", or None for the device's default (the C++ kernel on CPU when it is built,
        else ``F.linear``).
    weight_format : str, optional
        "q8_0", "q5_0", "q4_1", "q4_k" or "q6_k": the format a uint8 ``weight`` must be for the K of ``x``
        (ValueError otherwise). None: told by the bytes per row alone.

    Returns
    -------
    torch.Tensor
        [..., N] in the dtype of ``x``.

    Examples
    --------
    >>> import torch
    >>> from costeer_kernels import linear_rows
    >>> x, w, b = torch.randn(3, 576), torch.randn(1536, 576), torch.randn(1536)
    >>> y = linear_rows(x, w, b)
    >>> y.shape
    torch.Size([3, 1536])
    >>> bool(torch.allclose(y, torch.nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-4))
    True
    >>> from costeer_kernels.q8_0 import dequantize_q8_0, quantize_q8_0
    >>> blocks = quantize_q8_0(w)                    # [1536, 612] uint8
    >>> y8 = linear_rows(x, blocks)
    >>> bool(torch.allclose(y8, x @ dequantize_q8_0(blocks).T, rtol=1e-4, atol=1e-4))
    True
    >>> from costeer_kernels.q4_1 import dequantize_q4_1, quantize_q4_1
    >>> blocks4 = quantize_q4_1(w)                   # [1536, 360] uint8
    >>> y4 = linear_rows(x, blocks4)
    >>> bool(torch.allclose(y4, x @ dequantize_q4_1(blocks4).T, rtol=1e-4, atol=1e-4))
    True
    """
    _check(x, weight, bias, weight_format)
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
    registry.resolve("linear", backend, x.device)  # a bad backend is a ValueError here, eagerly
    return linear_rows_op(x, weight, bias, backend or "auto")
