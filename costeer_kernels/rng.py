"""The sampling RNG in PyTorch: Philox4x32-10 (bit-identical to Triton's ``tl.philox`` and the C++
sampler) and the Gumbel noise and order-preserving keys built from it. The stream's definition is
in ``sampling.py``'s docstring."""
from __future__ import annotations

import torch


_M32 = 0xFFFFFFFF


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values (broadcastable); Triton's constants."""
    for _ in range(rounds):
        pb = c2 * 0xCD9E8D57
        pa = c0 * 0xD2511F53
        c0, c1, c2, c3 = ((pb >> 32) & _M32) ^ c1 ^ k0, pb & _M32, ((pa >> 32) & _M32) ^ c3 ^ k1, pa & _M32
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def gumbel_noise(V: int, rkey: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """float32 [R, V] Gumbel noise; ``rkey`` int64 [R] counter row words, ``seed``/``offset`` int64
    [R] or [1]."""
    dev = rkey.device
    V4 = (V + 3) // 4
    c0 = torch.arange(V4, dtype=torch.int64, device=dev)[None, :]
    c1 = (rkey & _M32)[:, None]
    off = offset.reshape(-1, 1)
    sd = seed.reshape(-1, 1)
    r = torch.stack(philox4x32(c0, c1, off & _M32, (off >> 32) & _M32, sd & _M32, (sd >> 32) & _M32), dim=-1)
    r = r.reshape(r.shape[0], 4 * V4)[:, :V]
    u = (2 * (r >> 9) + 1).to(torch.float32) * 5.9604644775390625e-08
    return -torch.log(-torch.log(u))


def ordered_key(x: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is the float order of fp32 ``x`` (-0.0 == +0.0)."""
    b = (x + 0.0).view(torch.int32)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).to(torch.int64)
