"""GGML's Q4_1 weight format as a uint8 tensor: what ``linear_rows`` takes in place of a float
weight to read a sixth and a half of float32's bytes.

A Q4_1 row of K weights (K a multiple of 32) is K / 32 blocks of 20 bytes: the block's scale d and
minimum m as float16, then 16 bytes whose low nibbles are the block's weights 0-15 and high
nibbles 16-31; weight = (d * q) + m in float32, as gguf-py (and so transformers' GGUF loader)
de-quantizes it. That is how the embedded SmolLM2-135M GGUF stores every layer's linear weights
(61 MB instead of 390 MB of float32). d * q is exact in float32 (11 + 4 significant bits), so the
de-quantized float32 matrix holds exactly ``fma(q, d, m)``: the C++ kernel forms each weight vector
so in registers and, accumulating in the float32 path's order, returns that matrix's result bit
for bit.

The GGML formats are all uint8 tensors; their bytes per row for the K of the rows multiplied tell
them apart (``costeer_kernels.blocks``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._ggml import block_shape, exact_by_chunks, gguf_quantize

__all__ = ["Q4_1_BLOCK", "Q4_1_BYTES", "q4_1_shape", "dequantize_q4_1", "quantize_q4_1", "exact_q4_1"]

Q4_1_BLOCK = 32  # weights per block
Q4_1_BYTES = 20  # bytes per block: float16 d, float16 m, 16 bytes of nibbles
_CHUNK_ROWS = 4096  # rows handled at a time (bounded memory)


def q4_1_shape(weight: torch.Tensor, name: str = "weight") -> Tuple[int, int]:
    """``(N, K)`` of a Q4_1 weight [N, K / 32 * 20]; ValueError naming ``name`` for any other shape."""
    return block_shape(weight, "Q4_1", Q4_1_BYTES, name)


def dequantize_q4_1(weight: torch.Tensor) -> torch.Tensor:
    """The float32 [N, K] matrix of a Q4_1 weight [N, K / 32 * 20]: (d * q) + m, as gguf-py computes it.

    Examples
    --------
    >>> import torch
    >>> from costeer_kernels.q4_1 import dequantize_q4_1, quantize_q4_1
    >>> w = torch.randn(4, 64)
    >>> blocks = quantize_q4_1(w)
    >>> blocks.shape, blocks.dtype
    (torch.Size([4, 40]), torch.uint8)
    >>> bool((dequantize_q4_1(blocks) - w).abs().max() <= (w.amax() - w.amin()) / 15)
    True
    """
    N, K = q4_1_shape(weight)
    out = torch.empty(N, K, dtype=torch.float32, device=weight.device)
    nb = K // Q4_1_BLOCK
    for r in range(0, N, _CHUNK_ROWS):
        blk = weight[r:r + _CHUNK_ROWS].reshape(-1, nb, Q4_1_BYTES)
        d = blk[..., 0:2].contiguous().view(torch.float16).float()
        m = blk[..., 2:4].contiguous().view(torch.float16).float()
        qs = blk[..., 4:]
        q = torch.cat([qs & 0xF, qs >> 4], dim=-1).float()  # low nibbles: weights 0-15, high: 16-31
        out[r:r + _CHUNK_ROWS] = ((d * q) + m).reshape(-1, K)
    return out


def quantize_q4_1(weight: torch.Tensor) -> torch.Tensor:
    """Q4_1 blocks [N, K / 32 * 20] of a float [N, K] weight (K a multiple of 32), as llama.cpp and
    the ``gguf`` package quantize (m = the block's min, d = (max - min) / 15, q = round((w - m) / d));
    lossy, unlike taking a GGUF file's blocks as they are.
    """
    return gguf_quantize(weight, "Q4_1")


# fp16 neighbours of the first guess at d tried, in this order (the guess is (max - min) / 15 in
# float32 from de-quantized values, within an ulp or two of the stored float16 d).
_D_STEPS = (0, -1, 1, -2, 2, -3, 3)


def exact_q4_1(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """Q4_1 blocks that hold exactly ``weight``'s values, or None when it has none.

    A float32 matrix de-quantized from Q4_1 (transformers' load of a GGUF file) is (d * q) + m per
    block of 32, d and m float16, 0 <= q <= 15. The block's smallest value is m itself (some q is
    0), and llama.cpp's quantizer gives the largest q = 15, so d is the float16 within a few ulps
    of (max - m) / 15 for which every q = round((w - m) / d) gives back w; the blocks are
    recovered without reading the file. Anything else (weights never quantized, other formats)
    is None: the blocks returned always de-quantize to ``weight`` bit for bit.

    Examples
    --------
    >>> import torch
    >>> from costeer_kernels.q4_1 import dequantize_q4_1, exact_q4_1, quantize_q4_1
    >>> w = dequantize_q4_1(quantize_q4_1(torch.randn(8, 64)))
    >>> torch.equal(dequantize_q4_1(exact_q4_1(w)), w)
    True
    >>> exact_q4_1(torch.randn(8, 64)) is None
    True
    """
    return exact_by_chunks(weight, Q4_1_BYTES, _CHUNK_ROWS, _recover_q4_1)


def _recover_q4_1(w: torch.Tensor, blk: torch.Tensor) -> bool:
    """Blocks [n, 20] into ``blk`` for the values w [n, 32]; whether all come back bit for bit."""
    m = w.amin(-1, keepdim=True)
    m16 = m.half()
    if not torch.equal(m16.float(), m):
        return False
    guess = ((w.amax(-1, keepdim=True) - m) / 15).half().view(torch.int16)
    found = torch.zeros_like(m, dtype=torch.bool)
    d16 = torch.zeros_like(m16)
    q_best = torch.zeros_like(w, dtype=torch.uint8)
    for step in _D_STEPS:
        cand = (guess + step).clamp(min=0).view(torch.float16)  # int16 steps: fp16 ulps (d >= 0)
        df = cand.float()
        safe = torch.where(df == 0, torch.ones_like(df), df)
        q = torch.where(df == 0, torch.zeros_like(w), ((w - m) / safe).round()).clamp(0, 15)
        ok = (((df * q) + m).view(torch.int32) == w.view(torch.int32)).all(-1, keepdim=True) & ~found  # bits: -0.0 too
        d16 = torch.where(ok, cand, d16)
        q_best = torch.where(ok, q.to(torch.uint8), q_best)
        found |= ok
        if bool(found.all()):
            break
    if not bool(found.all()):
        return False
    blk[:, 0:2] = d16.view(torch.uint8)
    blk[:, 2:4] = m16.view(torch.uint8)
    blk[:, 4:] = q_best[:, :16] | (q_best[:, 16:] << 4)
    return True
