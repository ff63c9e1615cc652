"""GGML's Q8_0 weight format as a uint8 tensor: what ``linear_rows`` and ``steer_from_hidden`` take
in place of a float weight to read a quarter of the bytes.

A Q8_0 row of K weights (K a multiple of 32) is K / 32 blocks of 34 bytes: the block's scale d as
float16, then 32 int8 q; weight = d * q. That is how a GGUF file stores it (SmolLM2-135M's
49152 x 576 vocabulary head: 30 MB instead of 113 MB of float32), so the blocks can be taken from
the file as they are. d * q is exact in float32 (11 + 8 significant bits): the de-quantized float32
matrix holds exactly these values, and the C++ kernel, forming each weight vector in registers and
accumulating in the float32 path's order, returns that matrix's result bit for bit.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._ggml import exact_by_chunks, gguf_quantize, same_bits

__all__ = ["Q8_0_BLOCK", "Q8_0_BYTES", "is_q8_0", "q8_0_shape", "dequantize_q8_0", "quantize_q8_0", "exact_q8_0"]

Q8_0_BLOCK = 32  # weights per block
Q8_0_BYTES = 34  # bytes per block: float16 scale + 32 int8
_CHUNK_ROWS = 8192  # rows de-quantized at a time by the fallbacks (bounded memory)


def is_q8_0(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a Q8_0 weight (a uint8 tensor); its shape is checked by ``q8_0_shape``."""
    return isinstance(weight, torch.Tensor) and weight.dtype == torch.uint8


def q8_0_shape(weight: torch.Tensor, name: str = "weight") -> Tuple[int, int]:
    """``(N, K)`` of a Q8_0 weight [N, K / 32 * 34]; ValueError naming ``name`` for any other shape."""
    if weight.dim() != 2 or weight.shape[1] % Q8_0_BYTES != 0:
        raise ValueError(f"{name}: a uint8 weight is GGML Q8_0 rows [N, K / 32 * 34] (34-byte blocks of 32 weights), "
                         f"got shape {tuple(weight.shape)}")
    return weight.shape[0], weight.shape[1] // Q8_0_BYTES * Q8_0_BLOCK


def dequantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """The float32 [N, K] matrix of a Q8_0 weight [N, K / 32 * 34] (exact: d * q).

    Examples
    --------
    >>> import torch
    >>> from costeer_kernels.q8_0 import dequantize_q8_0, quantize_q8_0
    >>> w = torch.randn(4, 64)
    >>> blocks = quantize_q8_0(w)
    >>> blocks.shape, blocks.dtype
    (torch.Size([4, 68]), torch.uint8)
    >>> bool((dequantize_q8_0(blocks) - w).abs().max() < w.abs().max() / 127)
    True
    """
    N, K = q8_0_shape(weight)
    out = torch.empty(N, K, dtype=torch.float32, device=weight.device)
    for r in range(0, N, _CHUNK_ROWS):
        blk = weight[r:r + _CHUNK_ROWS].reshape(-1, K // Q8_0_BLOCK, Q8_0_BYTES)
        d = blk[..., :2].contiguous().view(torch.float16).float()
        q = blk[..., 2:].contiguous().view(torch.int8).float()
        out[r:r + _CHUNK_ROWS] = (d * q).reshape(-1, K)
    return out


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks [N, K / 32 * 34] of a float [N, K] weight (K a multiple of 32), as llama.cpp and
    the ``gguf`` package quantize (d = max |w| / 127 per block, q = round(w / d)); lossy, unlike
    taking a GGUF file's blocks as they are.
    """
    return gguf_quantize(weight, "Q8_0")


def exact_q8_0(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """The Q8_0 blocks that hold exactly ``weight``'s values, or None when it has none.

    A float32 matrix de-quantized from Q8_0 (transformers' load of a GGUF file) is d * q per block
    of 32 with d a float16 and |q| <= 127; llama.cpp's quantizer makes max |q| = 127 in every
    nonzero block, so d = max |w| / 127 and q = w / d recover the stored blocks byte for byte
    without reading the file. Anything else (another quantizer's blocks, or weights never
    quantized) is None unless every value still comes back exactly: the blocks returned always
    de-quantize to ``weight`` bit for bit.

    Examples
    --------
    >>> import torch
    >>> from costeer_kernels.q8_0 import dequantize_q8_0, exact_q8_0, quantize_q8_0
    >>> blocks = quantize_q8_0(torch.randn(8, 64))
    >>> torch.equal(exact_q8_0(dequantize_q8_0(blocks)), blocks)
    True
    >>> exact_q8_0(torch.randn(8, 64)) is None
    True
    """
    return exact_by_chunks(weight, Q8_0_BYTES, _CHUNK_ROWS, _recover_q8_0)


def _recover_q8_0(w: torch.Tensor, blk: torch.Tensor) -> bool:
    """Blocks [n, 34] into ``blk`` for the values w [n, 32]; whether all come back bit for bit."""
    d = (w.abs().amax(-1, keepdim=True) / 127).half()
    df = d.float()
    q = torch.where(df == 0, torch.zeros_like(w), w / torch.where(df == 0, torch.ones_like(df), df)).round()
    if q.abs().max() > 127 or not same_bits(df * q, w):
        return False
    blk[:, :2] = d.view(torch.uint8)
    blk[:, 2:] = q.to(torch.int8).view(torch.uint8)
    return True
