"""backend="triton" for ``steer_from_hidden``: the small model's vocabulary projection fused with
the steering, one launch.

The steered logits need only the delta z_c - z_n = W (h_c - h_n) (the bias cancels), so W
[V_w, H] is read once for both small-model passes. Grid (row blocks, S): program (rb, s) owns
BLOCK_B rows and a contiguous run of vocabulary tiles of BLOCK_V tokens. Per tile it computes
the delta of its rows over H in fp32 (``tl.dot`` when BLOCK_B >= 16; otherwise a broadcast
multiply and reduce, the GEMV shape), then x = z_L + c_T * delta, stores x and keeps an online
(max, sum-exp) per row. The S partials of a row are merged in the same launch exactly as in
``steer.py`` (MERGE_NONE: S = 1, the program normalizes its rows itself; MERGE_LAST: the last
program of the row block, found with a self-resetting atomic counter, merges and normalizes),
with its @triton.jit helpers. Status bits as in ``status.py``; a NaN delta (NaN in h or W) sets
NAN_CTX and a +inf delta POSINF_CTX, like ``steer(llm, delta, None)``; a -inf delta bans the
token, as there.

Precision: fp32 accumulation. fp32 W: ``tl.dot`` in "tf32x3" (about fp32 accuracy) or fp32 FMA.
fp16/bf16 W: the fp32 difference h_c - h_n is split into two values of W's dtype (hi + lo), two
tensor-core products, so the only rounding left is W's own.

With a vocabulary map (VOCAB_MAP), LLM token v reads W's row ``map[v]`` (-1 / out of range: no
counterpart: delta 0, or -inf with DROP_UNMAPPED).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .steer import (
    INTERPRET,
    MERGE_LAST,
    MERGE_NONE,
    _check_device,
    _finish_row,
    _lock_buffer,
    _map_block,
    _merge_partials,
    _normalize,
    _online_update,
    _coef32,
    _coefficient,
    _row_coefficient,
)

PROJ_MAX_SPLIT = 1024


@triton.jit
def _rows_coefficient(hp_ptr, rows, rmask, hp_stride):
    """``_row_coefficient`` for a block of rows at once."""
    base = hp_ptr + rows * hp_stride
    return _coefficient(tl.load(base + 0, mask=rmask, other=0.0), tl.load(base + 1, mask=rmask, other=0.0),
                        tl.load(base + 2, mask=rmask, other=0.0), tl.load(base + 3, mask=rmask, other=1.0),
                        tl.load(base + 4, mask=rmask, other=1.0), True)


@triton.jit
def _delta_tile(w_ptr, hc_ptr, hn_ptr, wrow, has, rows64, rmask, H, w_stride, hc_stride, hn_stride,
                BLOCK_V: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, USE_DOT: tl.constexpr,
                DOT_F32: tl.constexpr):
    """delta[v, r] = sum_h W[wrow[v], h] * (h_c[r, h] - h_n[r, h]) in fp32, [BLOCK_V, BLOCK_B]."""
    w_base = w_ptr + wrow.to(tl.int64)[:, None] * w_stride
    if BLOCK_B == 1:
        if not USE_DOT:
            # GEMV: accumulate elementwise and reduce once at the end; a reduction per H step
            # (the general path below) costs shuffles that keep the loads from streaming.
            acc1 = tl.zeros((BLOCK_V, BLOCK_H), tl.float32)
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                hmask = offs_h < H
                w = tl.load(w_base + offs_h[None, :], mask=has[:, None] & hmask[None, :], other=0.0)
                hc = tl.load(hc_ptr + rows64 * hc_stride + offs_h[:, None], mask=hmask[:, None] & rmask[None, :],
                             other=0.0)
                hn = tl.load(hn_ptr + rows64 * hn_stride + offs_h[:, None], mask=hmask[:, None] & rmask[None, :],
                             other=0.0)
                dh = tl.sum(hc.to(tl.float32) - hn.to(tl.float32), axis=1)  # [BLOCK_H]
                acc1 += w.to(tl.float32) * dh[None, :]
            return tl.sum(acc1, axis=1)[:, None]
    acc = tl.zeros((BLOCK_V, BLOCK_B), tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        hmask = offs_h < H
        w = tl.load(w_base + offs_h[None, :], mask=has[:, None] & hmask[None, :], other=0.0)
        hmask2 = hmask[:, None] & rmask[None, :]
        hc = tl.load(hc_ptr + rows64[None, :] * hc_stride + offs_h[:, None], mask=hmask2, other=0.0)
        hn = tl.load(hn_ptr + rows64[None, :] * hn_stride + offs_h[:, None], mask=hmask2, other=0.0)
        dh = hc.to(tl.float32) - hn.to(tl.float32)  # [BLOCK_H, BLOCK_B]
        if USE_DOT:
            if DOT_F32:
                acc = tl.dot(w.to(tl.float32), dh, acc, input_precision="ieee")
            elif w.dtype == tl.float32:
                acc = tl.dot(w, dh, acc, input_precision="tf32x3")
            else:
                hi = dh.to(w.dtype)
                lo = (dh - hi.to(tl.float32)).to(w.dtype)
                acc = tl.dot(w, hi, acc)
                acc = tl.dot(w, lo, acc)
        else:
            acc += tl.sum(w.to(tl.float32)[:, :, None] * dh[None, :, :], axis=1)
    return acc


@triton.jit
def steer_projection_kernel(
    llm_ptr, hc_ptr, hn_ptr, w_ptr, hp_ptr, out_ptr, part_ptr, flag_ptr, lock_ptr, status_ptr, map_ptr,
    B, V, H, V_w, llm_stride, hc_stride, hn_stride, w_stride, out_stride, hp_stride,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, USE_DOT: tl.constexpr,
    MERGE: tl.constexpr, MAX_SPLIT: tl.constexpr, NORM_BLOCK: tl.constexpr,
    VOCAB_MAP: tl.constexpr, DROP_UNMAPPED: tl.constexpr, DOT_F32: tl.constexpr = False,
):
    rb = tl.program_id(0)
    sid = tl.program_id(1)
    nsplit = tl.num_programs(1)
    rows = rb * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    c64, hp_ok = _rows_coefficient(hp_ptr, rows, rmask, hp_stride)
    c = _coef32(c64)

    ntiles = tl.cdiv(V, BLOCK_V)
    per = tl.cdiv(ntiles, nsplit)
    t0 = sid * per
    t1 = tl.minimum(t0 + per, ntiles)
    m = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_B,), tl.float32)
    flags = tl.zeros((BLOCK_B,), tl.int32)
    for tile in range(t0, t1):
        offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        vmask = offs_v < V
        if VOCAB_MAP:
            wrow, has = _map_block(map_ptr, offs_v, vmask, V_w)
        else:
            wrow = offs_v
            has = vmask
        delta = _delta_tile(w_ptr, hc_ptr, hn_ptr, wrow, has, rows64, rmask, H, w_stride, hc_stride, hn_stride,
                            BLOCK_V, BLOCK_B, BLOCK_H, USE_DOT, DOT_F32)
        mask2 = vmask[:, None] & rmask[None, :]
        zl = tl.load(llm_ptr + rows64[None, :] * llm_stride + offs_v[:, None], mask=mask2,
                     other=float("-inf")).to(tl.float32)
        f = tl.max((zl != zl).to(tl.int32), 0) * 1 | tl.max((zl == float("inf")).to(tl.int32), 0) * 8
        f = f | tl.max((delta != delta).to(tl.int32), 0) * 2 | tl.max((delta == float("inf")).to(tl.int32), 0) * 16
        flags = flags | f
        if VOCAB_MAP:
            if DROP_UNMAPPED:
                zl = tl.where(has[:, None], zl, float("-inf"))
        x = tl.where(c[None, :] == 0.0, zl, zl + c[None, :] * delta)
        x = tl.where(mask2, x, float("-inf"))
        m, s = _online_update(m, s, x)
        tl.store(out_ptr + rows64[None, :] * out_stride + offs_v[:, None], x, mask=mask2)

    if MERGE == 0:
        lse, flags = _finish_row(m, s, flags, hp_ok)
        tl.store(status_ptr + rows, flags, mask=rmask)
        for tile in range(t0, t1):
            offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
            mask2 = (offs_v < V)[:, None] & rmask[None, :]
            ptrs = out_ptr + rows64[None, :] * out_stride + offs_v[:, None]
            x = tl.load(ptrs, mask=mask2)
            tl.store(ptrs, x - lse[None, :], mask=mask2)
    else:
        base = rows * nsplit
        tl.store(part_ptr + 2 * (base + sid), m, mask=rmask)
        tl.store(part_ptr + 2 * (base + sid) + 1, s, mask=rmask)
        tl.store(flag_ptr + base + sid, flags, mask=rmask)
        # The last program normalizes whole rows of `out`, written by every thread of every
        # program: the CTA barrier orders all our threads' stores before the one-thread release;
        # acq_rel: our partials are visible before the count, the others' after it.
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + rb, 1, sem="acq_rel")
        if arrived == nsplit - 1:
            tl.atomic_xchg(lock_ptr + rb, 0)
            for i in range(0, BLOCK_B):
                row = rb * BLOCK_B + i
                if row < B:
                    mr, sr, fr = _merge_partials(part_ptr, flag_ptr, row * nsplit, nsplit, MAX_SPLIT)
                    _, ok_r = _row_coefficient(hp_ptr + row * hp_stride)
                    lse_r, fr = _finish_row(mr, sr, fr, ok_r)
                    tl.store(status_ptr + row, fr)
                    _normalize(out_ptr + row.to(tl.int64) * out_stride, 0, V, V, lse_r, NORM_BLOCK)


def plan(B: int, V: int, H: int, w_dtype: torch.dtype, device: torch.device, num_splits=None, block_b=None):
    """(BLOCK_B, BLOCK_V, BLOCK_H, USE_DOT, S, MERGE, num_warps) of a launch."""
    if block_b is None:
        block_b = 1 if B == 1 else min(64, triton.next_power_of_2(B))
    use_dot = block_b >= 16
    if use_dot:
        block_v, block_h = (128, 32) if w_dtype == torch.float32 else (128, 64)
        num_warps = 4 if block_b <= 32 else 8
    else:
        # The broadcast product is [BLOCK_V, BLOCK_H, BLOCK_B]: keep it at 8192 values.
        block_h = 128 if H > 64 else 64
        block_v = max(8, 8192 // (block_h * block_b))
        num_warps = 4
    ntiles = triton.cdiv(V, block_v)
    n_rb = triton.cdiv(B, block_b)
    if num_splits is None:
        if device.type == "cuda":
            n_sm = torch.cuda.get_device_properties(device).multi_processor_count
            num_splits = max(1, (8 * n_sm) // n_rb)
        else:
            num_splits = 1
    num_splits = max(1, min(int(num_splits), PROJ_MAX_SPLIT, ntiles))
    merge = MERGE_NONE if num_splits == 1 else MERGE_LAST
    return block_b, block_v, block_h, use_dot, num_splits, merge, num_warps


def steer_projection_triton(zl, hc, hn, w, hp, out, *, slm_index=None, drop_unmapped=False,
                            num_splits=None, block_b=None) -> torch.Tensor:
    """Launch: ``zl`` [B, V] (unit column stride), ``hc``/``hn`` [B, H], ``w`` [V_w, H] (unit
    column stride), ``hp`` float64 [1 or B, 5], ``out`` float32 [B, V]; without ``slm_index``,
    V_w >= V and token v uses row v of W. Returns int32 status [B]; no host sync."""
    _check_device(zl)
    B, V = zl.shape
    H = w.shape[1]
    status = torch.empty(B, dtype=torch.int32, device=zl.device)
    bb, bv, bh, use_dot, S, merge, warps = plan(B, V, H, w.dtype, zl.device, num_splits, block_b)
    n_rb = triton.cdiv(B, bb)
    part = torch.empty(2 * B * S if S > 1 else 2, dtype=torch.float32, device=zl.device)
    flags = torch.empty(B * S if S > 1 else 1, dtype=torch.int32, device=zl.device)
    lock = _lock_buffer(zl.device, n_rb, "projection")
    mapped = slm_index is not None
    hp_stride = 0 if hp.shape[0] == 1 else hp.stride(0)
    steer_projection_kernel[(n_rb, S)](
        zl, hc, hn, w, hp, out, part, flags, lock, status, slm_index if mapped else status,
        B, V, H, w.shape[0], zl.stride(0), hc.stride(0), hn.stride(0), w.stride(0), out.stride(0), hp_stride,
        BLOCK_B=bb, BLOCK_V=bv, BLOCK_H=bh, USE_DOT=use_dot, MERGE=merge, MAX_SPLIT=PROJ_MAX_SPLIT,
        NORM_BLOCK=4096 if INTERPRET else 1024, VOCAB_MAP=mapped, DROP_UNMAPPED=bool(drop_unmapped) and mapped,
        # Triton's interpreter computes bf16 tl.dot wrongly (3.9): there, bf16 tiles go through fp32.
        DOT_F32=INTERPRET and w.dtype == torch.bfloat16, num_warps=warps,
    )
    return status
