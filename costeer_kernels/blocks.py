"""The GGML block formats ``linear_rows`` reads in place of a float weight, in one table.

Each is a uint8 tensor [N, K / per-block * bytes-per-block] holding the weights as a GGUF file
stores them, and each de-quantizes to float32 exactly as gguf-py does, with products exact in
float32, so the C++ kernel, forming the weights in registers and summing in the float32 path's
order, returns the de-quantized matrix's result bit for bit:

====== ========= ===== ===================================== =======================================
format weights   bytes weight                                where
====== ========= ===== ===================================== =======================================
Q8_0   32        34    d * q, q int8                         vocabulary heads (``q8_0.py``)
Q5_0   32        22    d * (q - 16), q in [0, 31]            most Gemma 3 270M layers (``q5_0.py``)
Q4_1   32        20    (d * q) + m, q in [0, 15]             all SmolLM2-135M layers (``q4_1.py``)
Q4_K   256       144   (d * sc) * q - dmin * m, 6-bit sc, m  Gemma's attention outputs (``k_quants.py``)
Q6_K   256       210   (d * sc) * (q - 32), int8 sc per 16   Gemma's other MLP down projections
====== ========= ===== ===================================== =======================================

The byte counts differ, so the K of the rows multiplied tells the formats apart
(``block_format``); only for the right K: 220 bytes a row are Q4_1 of K = 352 or Q5_0 of K = 320,
so a caller that may pass rows of another K names the format (``linear_rows(weight_format=)``).
The first three are recovered exactly from de-quantized float32 values (``exact_blocks``); the
K-quants are read from the GGUF file (``k_quants.py``).
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

from ._ggml import BLOCK  # weights per block of the 32-weight formats
from .k_quants import QK_K, dequantize_q4_k, dequantize_q6_k
from .q4_1 import dequantize_q4_1, exact_q4_1
from .q5_0 import dequantize_q5_0, exact_q5_0
from .q8_0 import dequantize_q8_0, exact_q8_0

__all__ = ["FORMATS", "BLOCK", "BlockFormat", "block_format", "dequantize_blocks", "exact_blocks"]


class BlockFormat(NamedTuple):
    per: int  # weights per block
    nbytes: int  # bytes per block
    dequantize: Callable[[torch.Tensor], torch.Tensor]
    exact: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]]  # recovery from float32 values, if any


FORMATS: Dict[str, BlockFormat] = {
    "q4_1": BlockFormat(BLOCK, 20, dequantize_q4_1, exact_q4_1),
    "q5_0": BlockFormat(BLOCK, 22, dequantize_q5_0, exact_q5_0),
    "q8_0": BlockFormat(BLOCK, 34, dequantize_q8_0, exact_q8_0),
    "q4_k": BlockFormat(QK_K, 144, dequantize_q4_k, None),
    "q6_k": BlockFormat(QK_K, 210, dequantize_q6_k, None),
}


def _layouts(K: int) -> str:
    shapes = [f"{fmt.upper()} [N, {K // f.per * f.nbytes}]" for fmt, f in FORMATS.items() if K % f.per == 0]
    return ", ".join(shapes[:-1]) + " or " + shapes[-1]


def block_format(weight: torch.Tensor, K: int, name: str = "weight") -> str:
    """The format ("q8_0", "q5_0", "q4_1", "q4_k" or "q6_k") of a uint8 weight whose rows hold K
    weights, from its bytes per row; ValueError naming ``name`` when it is none of them.

    Examples
    --------
    >>> import torch
    >>> from costeer_kernels.blocks import block_format
    >>> [block_format(torch.zeros(4, n, dtype=torch.uint8), 64) for n in (68, 44, 40)]
    ['q8_0', 'q5_0', 'q4_1']
    >>> [block_format(torch.zeros(4, n, dtype=torch.uint8), 512) for n in (288, 420)]
    ['q4_k', 'q6_k']
    """
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
    if K <= 0 or K % BLOCK != 0:
        raise ValueError(f"{name}: GGML block weights need K a multiple of {BLOCK} (and > 0) weights a "
                         f"row, got K = {K} (weight shape {shape})")
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        for fmt, f in FORMATS.items():
            if K % f.per == 0 and weight.shape[1] == K // f.per * f.nbytes:
                return fmt
    raise ValueError(f"{name}: a uint8 weight for rows of K = {K} is GGML {_layouts(K)} (K a multiple of "
                     f"{BLOCK}; {QK_K} for Q4_K and Q6_K), got shape {shape}")


def dequantize_blocks(weight: torch.Tensor, K: int) -> torch.Tensor:
    """The float32 [N, K] matrix of a uint8 weight in any of the formats (exact)."""
    return FORMATS[block_format(weight, K)].dequantize(weight)


def exact_blocks(weight: torch.Tensor, formats=("q4_1", "q5_0", "q8_0")) -> Optional[Tuple[str, torch.Tensor]]:
    """``(format, blocks)`` of the first of ``formats`` whose blocks hold exactly ``weight``'s
    float32 values (a GGUF weight de-quantized by transformers: the file's own blocks), or None.
    Only the formats recoverable from values (Q4_1, Q5_0, Q8_0; not the K-quants) can be asked for.

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
        if FORMATS[fmt].exact is None:
            raise ValueError(f"exact_blocks: {fmt} blocks are not recovered from values (read them from the GGUF file)")
        blocks = FORMATS[fmt].exact(weight)
        if blocks is not None:
            return fmt, blocks
    return None
