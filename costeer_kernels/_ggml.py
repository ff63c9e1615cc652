"""What the GGML block formats (``q8_0.py``, ``q5_0.py``, ``q4_1.py``) share: the shape check of a
uint8 weight, quantizing through the ``gguf`` package, and the chunked scaffold of the exact
recoveries (each format supplies only how one chunk of blocks is recovered)."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

BLOCK = 32  # weights per block, every format


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two float32 tensors hold the same bits (``torch.equal`` takes -0.0 for +0.0): the
    exact recoveries promise the de-quantized weight itself, zeros' signs included."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _shape_text(weight) -> str:
    return str(tuple(weight.shape)) if isinstance(weight, torch.Tensor) else type(weight).__name__


def block_shape(weight: torch.Tensor, fmt: str, nbytes: int, name: str, per: int = BLOCK) -> Tuple[int, int]:
    """``(N, K)`` of a uint8 weight [N, K / per * nbytes] of format ``fmt`` (``nbytes``-byte blocks of
    ``per`` weights); ValueError naming ``name``."""
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.uint8 or weight.dim() != 2 \
            or weight.shape[1] % nbytes != 0:
        raise ValueError(f"{name}: a {fmt} weight is uint8 rows [N, K / {per} * {nbytes}] ({nbytes}-byte blocks of "
                         f"{per} weights), got {_shape_text(weight)}")
    return weight.shape[0], weight.shape[1] // nbytes * per


def gguf_quantize(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """``weight`` [N, K] quantized by the ``gguf`` package to ``fmt`` ("Q8_0", "Q5_0", "Q4_1") blocks."""
    import gguf
    import numpy as np

    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] % BLOCK != 0:
        raise ValueError(f"quantize_{fmt.lower()}: weight must be a 2-D tensor [N, K] with K a multiple of {BLOCK}, "
                         f"got {_shape_text(weight)}")
    blocks = gguf.quants.quantize(weight.detach().float().cpu().numpy(), getattr(gguf.GGMLQuantizationType, fmt))
    return torch.from_numpy(np.ascontiguousarray(blocks)).to(weight.device)


def exact_by_chunks(weight: torch.Tensor, nbytes: int, chunk_rows: int,
                    recover: Callable[[torch.Tensor, torch.Tensor], bool]) -> Optional[torch.Tensor]:
    """The blocks [N, K / 32 * nbytes] holding exactly a float32 ``weight``'s values, or None.

    ``recover(w, blk)`` gets the finite values of ``chunk_rows`` weight rows as blocks [n, 32] and
    writes their bytes into ``blk`` [n, nbytes], returning whether every value came back exactly.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype != torch.float32:
        return None
    N, K = weight.shape
    if K == 0 or K % BLOCK != 0:
        return None
    out = torch.empty(N, K // BLOCK, nbytes, dtype=torch.uint8, device=weight.device)
    with torch.no_grad():
        for r in range(0, N, chunk_rows):
            w = weight[r:r + chunk_rows].reshape(-1, BLOCK)
            if not torch.isfinite(w).all() or not recover(w, out[r:r + chunk_rows].view(-1, nbytes)):
                return None
    return out.reshape(N, K // BLOCK * nbytes)
