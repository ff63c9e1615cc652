"""GGML's K-quant weight formats Q4_K and Q6_K as uint8 tensors: what ``linear_rows`` takes in place
of a float weight to read 18 or 26.25 bytes per 32 weights instead of 128.

A row of K weights (K a multiple of 256) is K / 256 super-blocks, de-quantized exactly as gguf-py
(and so transformers' GGUF loader) does:

- Q4_K, 144 bytes: float16 d and dmin, 12 bytes packing eight 6-bit scales sc and mins m (one per
  32 weights), then 128 bytes of nibbles (per 64 weights, 32 bytes: low nibbles the first 32, high
  nibbles the next 32); weight = (d * sc) * q - dmin * m. Gemma 3 270M's q4_k_m GGUF stores its 27
  attention output projections so.
- Q6_K, 210 bytes: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8 scales (one per
  16 weights), float16 d; weight = (d * sc) * (q - 32), q in [0, 63]. Gemma's 9 other MLP down
  projections.

d * sc and dmin * m are exact in float32 (11 + 6 or 8 significant bits), and so is (d * sc) * q
for Q4_K (+ 4 bits): the C++ kernel forms each weight in registers with the one rounding gguf-py's
makes (``fma(q, d * sc, -(dmin * m))``; ``(d * sc) * (q - 32)``) and, accumulating in the float32
path's order, returns the de-quantized matrix's result bit for bit.

Unlike Q8_0 / Q5_0 / Q4_1, these blocks are not recovered from de-quantized values (their 6-bit
sub-block scales make that ambiguous): they are read from the GGUF file, where they are stored
as is (``gguf.GGUFReader(path).tensors[i].data``; ``costeer.model_cache`` does so for a cached
model). gguf-py has no quantizer for them either.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ._ggml import block_shape

__all__ = ["QK_K", "Q4_K_BYTES", "Q6_K_BYTES", "q4_k_shape", "q6_k_shape", "dequantize_q4_k", "dequantize_q6_k"]

QK_K = 256  # weights per super-block
Q4_K_BYTES = 144  # float16 d, float16 dmin, 12 bytes of scales and mins, 128 bytes of nibbles
Q6_K_BYTES = 210  # 128 bytes of low nibbles, 64 of high bits, 16 int8 scales, float16 d
_CHUNK_ROWS = 1024  # rows handled at a time (bounded memory)


def q4_k_shape(weight: torch.Tensor, name: str = "weight") -> Tuple[int, int]:
    """``(N, K)`` of a Q4_K weight [N, K / 256 * 144]; ValueError naming ``name`` for any other shape."""
    return block_shape(weight, "Q4_K", Q4_K_BYTES, name, per=QK_K)


def q6_k_shape(weight: torch.Tensor, name: str = "weight") -> Tuple[int, int]:
    """``(N, K)`` of a Q6_K weight [N, K / 256 * 210]; ValueError naming ``name`` for any other shape."""
    return block_shape(weight, "Q6_K", Q6_K_BYTES, name, per=QK_K)


def _half(blk: torch.Tensor) -> torch.Tensor:
    return blk.contiguous().view(torch.float16).float()


def dequantize_q4_k(weight: torch.Tensor) -> torch.Tensor:
    """The float32 [N, K] matrix of a Q4_K weight [N, K / 256 * 144], as gguf-py computes it.

    Examples
    --------
    >>> import torch
    >>> from costeer_kernels.k_quants import dequantize_q4_k
    >>> blocks = torch.zeros(2, 144, dtype=torch.uint8)
    >>> blocks[:, 0:2] = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)  # d = 1
    >>> blocks[:, 4] = 3                                                             # sub-block 0: sc = 3
    >>> blocks[:, 16] = 0x52                                                         # q = 2 (weight 0), 5 (weight 32)
    >>> dequantize_q4_k(blocks)[0, [0, 1, 32]].tolist()
    [6.0, 0.0, 0.0]
    """
    N, K = q4_k_shape(weight)
    out = torch.empty(N, K, dtype=torch.float32, device=weight.device)
    nb = K // QK_K
    for r in range(0, N, _CHUNK_ROWS):
        blk = weight[r:r + _CHUNK_ROWS].reshape(-1, nb, Q4_K_BYTES)
        d, dmin = _half(blk[..., 0:2]), _half(blk[..., 2:4])
        s = blk[..., 4:16].to(torch.int32)
        lo, mi, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]  # gguf-py's get_scale_min unpacking
        sc = torch.cat([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], dim=-1).float()
        m = torch.cat([mi & 0x3F, (hi >> 4) | ((mi >> 2) & 0x30)], dim=-1).float()
        qs = blk[..., 16:].reshape(*blk.shape[:-1], 4, 1, 32)
        q = torch.cat([qs & 0xF, qs >> 4], dim=-2).reshape(*blk.shape[:-1], 8, 32).float()
        w = (d * sc).unsqueeze(-1) * q - (dmin * m).unsqueeze(-1)
        out[r:r + _CHUNK_ROWS] = w.reshape(-1, K)
    return out


def dequantize_q6_k(weight: torch.Tensor) -> torch.Tensor:
    """The float32 [N, K] matrix of a Q6_K weight [N, K / 256 * 210], as gguf-py computes it.

    Examples
    --------
    >>> import torch
    >>> from costeer_kernels.k_quants import dequantize_q6_k
    >>> blocks = torch.zeros(1, 210, dtype=torch.uint8)
    >>> blocks[:, 208:210] = torch.tensor([0.5], dtype=torch.float16).view(torch.uint8)  # d = 0.5
    >>> blocks[:, 192] = 4                          # weights 0-15: sc = 4
    >>> blocks[:, 0] = 0x21                         # weight 0: low 1; weight 64: low 2
    >>> dequantize_q6_k(blocks)[0, [0, 1]].tolist()   # 0.5 * 4 * (1 - 32), 0.5 * 4 * (0 - 32)
    [-62.0, -64.0]
    """
    N, K = q6_k_shape(weight)
    out = torch.empty(N, K, dtype=torch.float32, device=weight.device)
    nb = K // QK_K
    shifts4 = torch.tensor([0, 4], dtype=torch.uint8, device=weight.device).view(2, 1)
    shifts2 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=weight.device).view(4, 1)
    for r in range(0, N, _CHUNK_ROWS):
        blk = weight[r:r + _CHUNK_ROWS].reshape(-1, nb, Q6_K_BYTES)
        lead = blk.shape[:-1]
        ql = ((blk[..., 0:128].reshape(*lead, 2, 1, 64) >> shifts4) & 0xF).reshape(*lead, 8, 32)
        qh = ((blk[..., 128:192].reshape(*lead, 2, 1, 32) >> shifts2) & 0x3).reshape(*lead, 8, 32)
        q = ((ql | (qh << 4)).to(torch.int32) - 32).reshape(*lead, 16, 16).float()
        scale = _half(blk[..., 208:210]) * blk[..., 192:208].contiguous().view(torch.int8).float()
        out[r:r + _CHUNK_ROWS] = (scale.unsqueeze(-1) * q).reshape(-1, K)
    return out
