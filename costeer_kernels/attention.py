"""``decode_attention``: attention of ONE query token per row against its KV cache, grouped query
heads (GQA) read against their shared key/value head.

A decode step of a small model on a CPU calls attention once per layer with a few rows and a few
hundred cached keys. ``scaled_dot_product_attention`` spends most of such a call outside the
arithmetic (with a padding mask torch's CPU kernel either repeats the KV heads or takes the
query heads as query positions; measured on a 2-core Zen 4, 2 rows x 9 heads x 130 keys: 45 us
a call, this op 23; 16 rows: 295 against 163; bench/bench_attention.py), and a SmolLM2 step
makes 30 such calls. The C++ kernel (``csrc/attention_cpu.cpp``) makes one task of each (row,
KV head): the G query heads' scores from the steering kernels' projection loop (each key read
once for all G), the exponentials vectorized, the values summed with the masked keys skipped.

Backends (the ``attention`` kernel of the one registry): "cpu" (the C++ kernel; float32) and
"torch" (``F.scaled_dot_product_attention`` with ``enable_gqa``; any device and dtype, the
fallback). Registered as ``torch.ops.costeer.decode_attention`` with a fake implementation.
``costeer.fast_attention`` routes a transformers model's decode steps through it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import registry

__all__ = ["decode_attention", "decode_attention_torch"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def decode_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                           scale: float) -> torch.Tensor:
    """The "torch" backend: SDPA with the KV heads shared by their query heads (``enable_gqa``)."""
    m = None
    if mask is not None:
        m = mask[:, None, None, :]
        if m.dtype != torch.bool:
            m = m.to(q.dtype)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=m, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out[:, :, 0]


registry.register_backend("torch", registry.anywhere, attention=decode_attention_torch)


def _check(q, k, v, mask, scale) -> float:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"decode_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"decode_attention: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if q.dim() != 3:
        raise ValueError(f"decode_attention: q must be [B, Hq, D] (one query token per row), "
                         f"got shape {tuple(q.shape)}")
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"decode_attention: k and v must be [B, Hkv, L, D] of one shape, got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    B, Hq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"decode_attention: k must be [B, Hkv, L, D] = [{B}, Hkv, L, {D}] (q's B and D), "
                         f"got {tuple(k.shape)}")
    if k.shape[1] == 0 or Hq % k.shape[1] != 0:
        raise ValueError(f"decode_attention: q's {Hq} heads must be a multiple of k's {k.shape[1]} heads")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"decode_attention: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"decode_attention: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"decode_attention: mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and mask.dtype not in _FLOATS:
            raise TypeError(f"decode_attention: mask must be bool (True: attend) or float (added to the scores), "
                            f"got {mask.dtype}")
        if mask.shape != (B, k.shape[2]):
            raise ValueError(f"decode_attention: mask must be [B, L] = [{B}, {k.shape[2]}], got {tuple(mask.shape)}")
        if mask.device != q.device:
            raise ValueError(f"decode_attention: mask is on {mask.device} but q on {q.device}")
    if scale is None:
        return D ** -0.5 if D > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"decode_attention: scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not (scale == scale and abs(scale) != float("inf")):
        raise ValueError(f"decode_attention: scale must be finite, got {scale}")
    return scale


@torch.library.custom_op("costeer::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                        scale: float, backend: str = "auto") -> torch.Tensor:
    name = registry.resolve("attention", None if backend == "auto" else backend, q.device)
    return registry.kernel(name, "attention")(q, k, v, mask, scale)


@decode_attention_op.register_fake
def _decode_attention_fake(q, k, v, mask, scale, backend="auto"):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """Softmax attention of one query token per row: ``softmax(scale q k^T + mask) v`` per head.

    Parameters
    ----------
    q : torch.Tensor
        [B, Hq, D]: each row's query, one token (float32, float16 or bfloat16).
    k, v : torch.Tensor
        [B, Hkv, L, D], the rows' cached keys and values (``Hq`` a multiple of ``Hkv``: query head
        ``j`` reads KV head ``j // (Hq / Hkv)``, as ``repeat_kv`` lays them out). Any strides with
        a contiguous last dimension are read in place (a KV cache grown in a larger buffer).
    mask : torch.Tensor, optional
        [B, L]: bool (True: attend; a left-padded row's padding False) or float (added to the
        scores, -inf: masked). A row with every key masked gets zeros.
    scale : float, optional
        The scores' factor; default ``D ** -0.5``.
    backend : str, optional
        "cpu" (the C++ kernel, computed in float32), "torch" (SDPA), or None for the device's default.

    Returns
    -------
    torch.Tensor
        [B, Hq, D] in the dtype of ``q``.

    Examples
    --------
    >>> import torch
    >>> from costeer_kernels import decode_attention
    >>> q = torch.randn(2, 9, 64)                          # 2 rows, 9 query heads
    >>> k, v = torch.randn(2, 3, 40, 64), torch.randn(2, 3, 40, 64)   # 3 KV heads, 40 keys
    >>> mask = torch.ones(2, 40, dtype=torch.bool)
    >>> mask[1, :15] = False                               # row 1: 15 tokens of left padding
    >>> out = decode_attention(q, k, v, mask)
    >>> ref = torch.nn.functional.scaled_dot_product_attention(
    ...     q[:, :, None], k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
    ...     attn_mask=mask[:, None, None, :])[:, :, 0]
    >>> out.shape, bool(torch.allclose(out, ref, atol=1e-5))
    (torch.Size([2, 9, 64]), True)
    """
    scale = _check(q, k, v, mask, scale)
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
    registry.resolve("attention", backend, q.device)  # a bad backend is a ValueError here, eagerly
    return decode_attention_op(q, k, v, mask, scale, backend or "auto")
