"""GGML's Q5_0 weight format as a uint8 tensor: what ``linear_rows`` takes in place of a float
weight to read 22 bytes per 32 weights instead of 128.

A Q5_0 row of K weights (K a multiple of 32) is K / 32 blocks of 22 bytes: the block's scale d as
float16, a little-endian uint32 whose bit j is the fifth bit of weight j, then 16 bytes whose low
nibbles are the low four bits of weights 0-15 and high nibbles those of 16-31; weight =
d * (q - 16), q in [0, 31], as gguf-py (and so transformers' GGUF loader) de-quantizes it. Gemma 3
270M's GGUF (q4_k_m) stores 81 of its 126 layer weights so. d * (q - 16) is exact in float32
(11 + 5 significant bits): the C++ kernel forms each weight vector in registers and, accumulating in
the float32 path's order, returns the de-quantized float32 matrix's result bit for bit.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._ggml import block_shape, exact_by_chunks, gguf_quantize, same_bits

__all__ = ["Q5_0_BLOCK", "Q5_0_BYTES", "q5_0_shape", "dequantize_q5_0", "quantize_q5_0", "exact_q5_0"]

Q5_0_BLOCK = 32  # weights per block
Q5_0_BYTES = 22  # bytes per block: float16 d, uint32 of fifth bits, 16 bytes of nibbles
_CHUNK_ROWS = 4096  # rows handled at a time (bounded memory)
_BITS = torch.arange(32, dtype=torch.int64)


def q5_0_shape(weight: torch.Tensor, name: str = "weight") -> Tuple[int, int]:
    """``(N, K)`` of a Q5_0 weight [N, K / 32 * 22]; ValueError naming ``name`` for any other shape."""
    return block_shape(weight, "Q5_0", Q5_0_BYTES, name)


def _codes(blk: torch.Tensor) -> torch.Tensor:
    """q in [0, 31] of blocks [..., 22] as int64 [..., 32]."""
    qh = blk[..., 2:6].to(torch.int64)
    bits = qh[..., 0] | (qh[..., 1] << 8) | (qh[..., 2] << 16) | (qh[..., 3] << 24)
    high = (bits.unsqueeze(-1) >> _BITS.to(blk.device)) & 1
    qs = blk[..., 6:].to(torch.int64)
    return torch.cat([qs & 0xF, qs >> 4], dim=-1) | (high << 4)


def dequantize_q5_0(weight: torch.Tensor) -> torch.Tensor:
    """The float32 [N, K] matrix of a Q5_0 weight [N, K / 32 * 22]: d * (q - 16), as gguf-py computes it.

    Examples
    --------
    >>> import torch
    >>> from costeer_kernels.q5_0 import dequantize_q5_0, quantize_q5_0
    >>> w = torch.randn(4, 64)
    >>> blocks = quantize_q5_0(w)
    >>> blocks.shape, blocks.dtype
    (torch.Size([4, 44]), torch.uint8)
    >>> bool((dequantize_q5_0(blocks) - w).abs().max() <= w.abs().max() / 16)
    True
    """
    N, K = q5_0_shape(weight)
    out = torch.empty(N, K, dtype=torch.float32, device=weight.device)
    nb = K // Q5_0_BLOCK
    for r in range(0, N, _CHUNK_ROWS):
        blk = weight[r:r + _CHUNK_ROWS].reshape(-1, nb, Q5_0_BYTES)
        d = blk[..., 0:2].contiguous().view(torch.float16).float()
        out[r:r + _CHUNK_ROWS] = (d * (_codes(blk) - 16).float()).reshape(-1, K)
    return out


def quantize_q5_0(weight: torch.Tensor) -> torch.Tensor:
    """Q5_0 blocks [N, K / 32 * 22] of a float [N, K] weight (K a multiple of 32), as llama.cpp and
    the ``gguf`` package quantize (d = the block's value of largest magnitude / -16); lossy."""
    return gguf_quantize(weight, "Q5_0")


def exact_q5_0(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """Q5_0 blocks that hold exactly ``weight``'s values, or None when it has none.

    A float32 matrix de-quantized from Q5_0 is d * (q - 16) per block of 32. llama.cpp's quantizer
    maps the value of largest magnitude to q = 0, so that value is -16 d (exactly: a power of two)
    and d is recovered as -value / 16; every q = w / d + 16 must then be an integer in [0, 31]
    that gives back w. The blocks returned always de-quantize to ``weight`` bit for bit.

    Examples
    --------
    >>> import torch
    >>> from costeer_kernels.q5_0 import dequantize_q5_0, exact_q5_0, quantize_q5_0
    >>> w = dequantize_q5_0(quantize_q5_0(torch.randn(8, 64)))
    >>> torch.equal(dequantize_q5_0(exact_q5_0(w)), w)
    True
    >>> exact_q5_0(torch.randn(8, 64)) is None
    True
    """
    return exact_by_chunks(weight, Q5_0_BYTES, _CHUNK_ROWS, _recover_q5_0)


def _recover_q5_0(w: torch.Tensor, blk: torch.Tensor) -> bool:
    """Blocks [n, 22] into ``blk`` for the values w [n, 32]; whether all come back bit for bit."""
    big = torch.take_along_dim(w, w.abs().argmax(-1, keepdim=True), -1)
    # An all-zero block's d is its zero, sign kept: d * (16 - 16) gives back -0.0 (llama.cpp
    # stores such a block with d = -0.0, gguf-py de-quantizes it to -0.0).
    d = torch.where(big == 0, big, -big / 16)
    d16 = d.half()
    if not torch.equal(d16.float(), d):
        return False
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.where(d == 0, torch.full_like(w, 16.0), w / safe + 16).round()
    if q.min() < 0 or q.max() > 31 or not same_bits(d * (q - 16), w):
        return False
    q = q.to(torch.int64)
    blk[:, 0:2] = d16.view(torch.uint8)
    bits = ((q >> 4) << _BITS.to(q.device)).sum(-1)
    for i in range(4):
        blk[:, 2 + i] = ((bits >> (8 * i)) & 0xFF).to(torch.uint8)
    low = q & 0xF
    blk[:, 6:] = (low[:, :16] | (low[:, 16:] << 4)).to(torch.uint8)
    return True
