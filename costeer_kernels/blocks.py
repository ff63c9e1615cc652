"""The GGML block formats ``linear_rows`` reads in place of a float weight, in one table.

Each is a uint8 tensor [N, K / 32 * bytes-per-block] holding the weights as a GGUF file stores
them, and each de-quantizes to float32 exactly as gguf-py does, with products exact in float32,
so the C++ kernel, forming the weights in registers and summing in the float32 path's order,
returns the de-quantized matrix's result bit for bit:

====== ================ ===================================== ==================================
format bytes / 32       weight                                where
====== ================ ===================================== ==================================
Q8_0   34               d * q, q int8                         vocabulary heads (``q8_0.py``)
Q5_0   22               d * (q - 16), q in [0, 31]            most Gemma 3 270M layers (``q5_0.py``)
Q4_1   20               (d * q) + m, q in [0, 15]             all SmolLM2-135M layers (``q4_1.py``)
====== ================ ===================================== ==================================

The byte counts differ, so the K of the rows multiplied tells the formats apart
(``block_format``); only for the right K: 220 bytes a row are Q4_1 of K = 352 or Q5_0 of K = 320,
so a caller that may pass rows of another K names the format (``linear_rows(weight_format=)``).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from ._ggml import BLOCK  # weights per block, every format
from .q4_1 import dequantize_q4_1, exact_q4_1
from .q5_0 import dequantize_q5_0, exact_q5_0
from .q8_0 import dequantize_q8_0, exact_q8_0

__all__ = ["FORMATS", "BLOCK", "block_format", "dequantize_blocks", "exact_blocks"]

# name -> (bytes per block, de-quantize, exact recovery from float32 values)
FORMATS: Dict[str, Tuple[int, Callable, Callable]] = {
    "q4_1": (20, dequantize_q4_1, exact_q4_1),
    "q5_0": (22, dequantize_q5_0, exact_q5_0),
    "q8_0": (34, dequantize_q8_0, exact_q8_0),
}


def block_format(weight: torch.Tensor, K: int, name: str = "weight") -> str:
    """The format ("q8_0", "q5_0" or "q4_1") of a uint8 weight whose rows hold K weights, from its
    bytes per row; ValueError naming ``name`` when it is none of them.

    Examples
    --------
    >>> import torch
    >>> from costeer_kernels.blocks import block_format
    >>> [block_format(torch.zeros(4, n, dtype=torch.uint8), 64) for n in (68, 44, 40)]
    ['q8_0', 'q5_0', 'q4_1']
    """
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
    if K <= 0 or K % BLOCK != 0:
        raise ValueError(f"{name}: GGML block weights need K a multiple of {BLOCK} (and > 0) weights a "
                         f"row, got K = {K} (weight shape {shape})")
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        for fmt, (nbytes, _, _) in FORMATS.items():
            if weight.shape[1] == K // BLOCK * nbytes:
                return fmt
    raise ValueError(f"{name}: a uint8 weight for rows of K = {K} is GGML Q8_0 [N, {K // BLOCK * 34}], Q5_0 "
                     f"[N, {K // BLOCK * 22}] or Q4_1 [N, {K // BLOCK * 20}] (K a multiple of {BLOCK}), got shape {shape}")


def dequantize_blocks(weight: torch.Tensor, K: int) -> torch.Tensor:
    """The float32 [N, K] matrix of a uint8 weight in any of the formats (exact)."""
    return FORMATS[block_format(weight, K)][1](weight)


def exact_blocks(weight: torch.Tensor, formats=("q4_1", "q5_0", "q8_0")) -> Optional[Tuple[str, torch.Tensor]]:
    """``(format, blocks)`` of the first of ``formats`` whose blocks hold exactly ``weight``'s
    float32 values (a GGUF weight de-quantized by transformers: the file's own blocks), or None.

    Examples
    --------
    >>> import torch
    >>> from costeer_kernels.blocks import exact_blocks
    >>> from costeer_kernels.q5_0 import dequantize_q5_0, quantize_q5_0
    >>> exact_blocks(dequantize_q5_0(quantize_q5_0(torch.randn(8, 64))))[0]
    'q5_0'
    >>> exact_blocks(torch.randn(8, 64)) is None
    True
    """
    for fmt in formats:
        blocks = FORMATS[fmt][2](weight)
        if blocks is not None:
            return fmt, blocks
    return None
