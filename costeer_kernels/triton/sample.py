"""backend="triton" of ``steer_sample``: steer and sample the next token in one launch.

Grid (B, S). Program (row, s) streams its slice of the row once, computing the steered logits
x = z_L + c_T (z_c - z_n) in fp32 (``_steered_block`` of ``steer.py``), and keeps
- the online (max, sum-exp) of x (for the chosen token's log-prob) and the status bits,
- the online (max, sum-exp) of z_L when the LLM's max probability is asked for
  (max_v softmax(z_L)_v = 1 / sum_v exp(z_L,v - max z_L): no extra pass),
- the best (key, index) of the slice: key = x (greedy) or x + tau * Gumbel (sampling).
The S partials of a row are merged in the same launch by the last program of the row to finish
(atomic counter, self-resetting: steer.py's MERGE_LAST; it also runs under the interpreter).

Rows with top-k / top-p / min-p (and temperature > 0) need the row's threshold first: the
finishing program then runs the threshold search (see ``sampling.py``: bisection over the
order-preserving int32 image of x with NPIV pivots per pass, ~8 passes) and one final masked
Gumbel pass over the whole row. Those passes run in that one program (no grid-wide barrier, so
the interpreter can run it); on a GPU at batch 1 they are the slow part of a filtered call.

Random numbers: Philox4x32-10 (Triton's ``tl.philox``), key = seed (64 bits), counter =
(v >> 2, row key, offset low 32 bits, offset high 32 bits), output word v & 3; see
``sampling.py`` for the exact definition shared with the torch backend.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .steer import INTERPRET, _coef32, MAX_SPLIT, _finish_row, _lock_buffer, _merge_partials, _online_update, _row_coefficient, _steered_block

NPIV = 16  # pivots per search pass


@triton.jit
def _ordered_key(x):
    """An int32 whose signed order is the float order of x (-0.0 and +0.0 map to the same key)."""
    b = (x + 0.0).to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _gumbel(offs, rk, off_lo, off_hi, seed):
    """Standard Gumbel noise [DT, BLOCK] for vocabulary positions ``offs`` [BLOCK] and counter row
    words ``rk`` [DT] (see sampling.py for the spec)."""
    c0 = (offs >> 2).to(tl.uint32)[None, :] + (rk * 0)[:, None]
    c1 = rk[:, None] + c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c0 * 0 + off_lo, c0 * 0 + off_hi)
    w = (offs & 3)[None, :]
    r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    # u in (0, 1), exactly representable: (2k + 1) / 2^24 with k the top 23 bits.
    k = (r >> 9).to(tl.int32)
    u = (2 * k + 1).to(tl.float32) * 5.9604644775390625e-08
    return -tl.log(-tl.log(u))


@triton.jit
def _tail_stats(llm_row, ctx_row, noctx_row, V, c, m, inv_tau, piv,
                BLOCK: tl.constexpr, HAS_NOCTX: tl.constexpr):
    """For each pivot key p: (#tokens with key >= p, sum of exp((x - m) / tau) over them)."""
    cnt = tl.zeros(piv.shape, tl.float32)
    mass = tl.zeros(piv.shape, tl.float32)
    for off in range(0, V, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < V
        x, _ = _steered_block(llm_row, ctx_row, noctx_row, llm_row, offs, mask, c, 0, HAS_NOCTX)
        key = _ordered_key(x)
        w = tl.exp((x - m) * inv_tau)
        ge = (key[:, None] >= piv[None, :]) & mask[:, None]
        cnt += tl.sum(ge.to(tl.float32), 0)
        mass += tl.sum(tl.where(ge, w[:, None], 0.0), 0)
    return cnt, mass


@triton.jit
def _search(llm_row, ctx_row, noctx_row, V, c, m, inv_tau, lo, hi, target, USE_MASS: tl.constexpr,
            BLOCK: tl.constexpr, HAS_NOCTX: tl.constexpr, NP: tl.constexpr):
    """Largest key t in [lo, hi) with stat(t) >= target, given stat(lo) >= target > stat(hi);
    stat = count or tempered mass of the tokens with key >= t (both non-increasing in t).
    NP pivots per pass: the interval shrinks NP + 1 times per pass over the row."""
    j = tl.arange(1, NP + 1).to(tl.int64)
    while hi - lo > 1:
        piv = lo + ((hi - lo) * j) // (NP + 1)
        cnt, mass = _tail_stats(llm_row, ctx_row, noctx_row, V, c, m, inv_tau, piv.to(tl.int32), BLOCK, HAS_NOCTX)
        if USE_MASS:
            ok = mass >= target
        else:
            ok = cnt >= target
        lo = tl.maximum(lo, tl.max(tl.where(ok, piv, lo), 0))
        hi = tl.minimum(hi, tl.min(tl.where(ok, hi, piv), 0))
    return lo


@triton.jit
def _best_update(x, offs, bk, bi, tau, theta, rk, off_lo, off_hi, seed, NOISE: tl.constexpr,
                 USE_THETA: tl.constexpr):
    """Fold one block into the per-draw best (key [DT], index [DT]); lowest index on ties."""
    if NOISE:
        key = x[None, :] + tau * _gumbel(offs, rk, off_lo, off_hi, seed)
    else:
        key = x[None, :] + (rk * 0).to(tl.float32)[:, None]
    if USE_THETA:
        key = tl.where((_ordered_key(x) >= theta)[None, :], key, float("-inf"))
    blk = tl.max(key, 1)
    arg = tl.argmax(key, 1)
    take = blk > bk
    bi = tl.where(take, tl.min(offs, 0) + arg, bi)
    bk = tl.where(take, blk, bk)
    return bk, bi


@triton.jit
def _best_pass(llm_row, ctx_row, noctx_row, V, c, tau, theta, rk, off_lo, off_hi, seed,
               NOISE: tl.constexpr, USE_THETA: tl.constexpr, BLOCK: tl.constexpr, HAS_NOCTX: tl.constexpr):
    """Per draw: argmax over the row of x + tau * G among the tokens with key >= theta."""
    bk = tl.full(rk.shape, float("-inf"), tl.float32)
    bi = (rk * 0).to(tl.int32)
    for off in range(0, V, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < V
        x, _ = _steered_block(llm_row, ctx_row, noctx_row, llm_row, offs, mask, c, 0, HAS_NOCTX)
        if NOISE:
            bk, bi = _best_update(x, offs, bk, bi, tau, theta, rk, off_lo, off_hi, seed, True, USE_THETA)
        else:
            bk, bi = _best_update(x, offs, bk, bi, tau, theta, rk, off_lo, off_hi, seed, False, USE_THETA)
    return bk, bi


@triton.jit
def steer_sample_kernel(
    llm_ptr, ctx_ptr, noctx_ptr, hp_ptr,
    tau_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr, off_ptr,
    tok_ptr, lp_ptr, maxp_ptr, status_ptr,
    part_ptr, partl_ptr, flag_ptr, bk_ptr, bi_ptr, lock_ptr,
    V, D, llm_stride, ctx_stride, noctx_stride, hp_stride,
    tau_stride, topk_stride, topp_stride, minp_stride, seed_stride, off_stride, ROW_KEYED,
    BLOCK: tl.constexpr, SBLOCK: tl.constexpr, DT: tl.constexpr, HAS_NOCTX: tl.constexpr,
    MERGE: tl.constexpr, MAX_SPLIT: tl.constexpr, WANT_MAXP: tl.constexpr, NP: tl.constexpr,
):
    row = tl.program_id(0)
    sid = tl.program_id(1)
    nsplit = tl.num_programs(1)
    row64 = row.to(tl.int64)
    c64, hp_ok = _row_coefficient(hp_ptr + row * hp_stride)
    c = _coef32(c64)

    # Sampling parameters; out-of-range values (validate=False) are clamped to "off".
    tau = tl.load(tau_ptr + row * tau_stride).to(tl.float32)
    tau = tl.where(tau > 0.0, tau, 0.0)  # NaN -> 0 (greedy)
    topk = tl.load(topk_ptr + row * topk_stride).to(tl.int32)
    topp = tl.load(topp_ptr + row * topp_stride).to(tl.float32)
    minp = tl.load(minp_ptr + row * minp_stride).to(tl.float32)
    use_k = (topk > 0) & (topk < V)
    use_p = (topp > 0.0) & (topp < 1.0)
    use_min = minp > 0.0
    filtered = (tau > 0.0) & (use_k | use_p | use_min)
    noise1 = (tau > 0.0) & (~filtered)
    seed = tl.load(seed_ptr + row * seed_stride).to(tl.int64)
    offset = tl.load(off_ptr + row * off_stride).to(tl.int64)
    off_lo = (offset & 0xFFFFFFFF).to(tl.uint32)
    off_hi = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    # Counter row word of draw d: row * D + d (scalar seed) or d (per-row seed).
    dr = tl.arange(0, DT)
    rk0 = (tl.where(ROW_KEYED != 0, row, 0) * D).to(tl.uint32)

    chunk = tl.cdiv(tl.cdiv(V, nsplit), BLOCK) * BLOCK
    start = sid * chunk
    end = tl.minimum(start + chunk, V)
    llm_row = llm_ptr + row64 * llm_stride
    ctx_row = ctx_ptr + row64 * ctx_stride
    noctx_row = noctx_ptr + row64 * noctx_stride

    # Pass 1 over this program's slice: statistics, and the first tile of draws when no
    # threshold is needed.
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    ml = tl.full((), float("-inf"), tl.float32)
    sl = tl.zeros((), tl.float32)
    flags = tl.zeros((), tl.int32)
    rk = rk0 + dr.to(tl.uint32)
    bk = tl.full((DT,), float("-inf"), tl.float32)
    bi = tl.zeros((DT,), tl.int32) + start
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        x, f = _steered_block(llm_row, ctx_row, noctx_row, llm_row, offs, mask, c, 0, HAS_NOCTX)
        flags = flags | f
        m, s = _online_update(m, s, x)
        if WANT_MAXP:
            zl = tl.load(llm_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            ml, sl = _online_update(ml, sl, zl)
        if noise1:
            bk, bi = _best_update(x, offs, bk, bi, tau, 0, rk, off_lo, off_hi, seed, True, False)
        else:
            bk, bi = _best_update(x, offs, bk, bi, tau, 0, rk, off_lo, off_hi, seed, False, False)

    finish = True
    if MERGE != 0:
        base = row * nsplit
        tl.store(part_ptr + 2 * (base + sid), m)
        tl.store(part_ptr + 2 * (base + sid) + 1, s)
        tl.store(partl_ptr + 2 * (base + sid), ml)
        tl.store(partl_ptr + 2 * (base + sid) + 1, sl)
        tl.store(flag_ptr + base + sid, flags)
        tl.store(bk_ptr + (base + sid) * DT + dr, bk)
        tl.store(bi_ptr + (base + sid) * DT + dr, bi)
        # The CTA barrier orders every thread's partial stores before the one-thread release;
        # acq_rel: our partials are visible before the count, the others' after it.
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + row, 1, sem="acq_rel")
        finish = arrived == nsplit - 1
        if finish:
            tl.atomic_xchg(lock_ptr + row, 0)
            m, s, flags = _merge_partials(part_ptr, flag_ptr, base, nsplit, MAX_SPLIT)
            ml, sl, _ = _merge_partials(partl_ptr, flag_ptr, base, nsplit, MAX_SPLIT)
            jj = tl.arange(0, MAX_SPLIT)
            jm = (jj < nsplit)[:, None] & (dr >= 0)[None, :]
            idx = (base + jj)[:, None] * DT + dr[None, :]
            bk_j = tl.load(bk_ptr + idx, mask=jm, other=float("-inf"), cache_modifier=".cg")
            bi_j = tl.load(bi_ptr + idx, mask=jm, other=2147483647, cache_modifier=".cg")
            bk = tl.max(bk_j, 0)
            bi = tl.min(tl.where(bk_j == bk[None, :], bi_j, 2147483647), 0)
    if finish:
        lse, flags = _finish_row(m, s, flags, hp_ok)
        ok = flags == 0
        theta = tl.zeros((), tl.int32)
        if filtered & ok:
            inv_tau = 1.0 / tau
            key_m = _ordered_key(m).to(tl.int64)
            lo = _ordered_key(tl.full((), float("-inf"), tl.float32)).to(tl.int64)
            if use_k:
                lo = _search(llm_row, ctx_row, noctx_row, V, c, m, inv_tau, lo, key_m + 1, topk.to(tl.float32),
                             False, SBLOCK, HAS_NOCTX, NP)
            if use_p:
                piv = tl.zeros((NP,), tl.int64) + lo
                _, mass = _tail_stats(llm_row, ctx_row, noctx_row, V, c, m, inv_tau, piv.to(tl.int32), SBLOCK,
                                      HAS_NOCTX)
                target = topp * tl.max(mass, 0)
                lo = _search(llm_row, ctx_row, noctx_row, V, c, m, inv_tau, lo, key_m + 1, target,
                             True, SBLOCK, HAS_NOCTX, NP)
            if use_min:
                thr = m + tau * tl.log(minp)
                lo = tl.maximum(lo, _ordered_key(thr).to(tl.int64))
            theta = lo.to(tl.int32)
            bk, bi = _best_pass(llm_row, ctx_row, noctx_row, V, c, tau, theta, rk, off_lo, off_hi, seed,
                                True, True, BLOCK, HAS_NOCTX)
        # Further tiles of draws (num_samples > DT): one pass over the row each.
        for d0 in range(DT, D, DT):
            i2 = bi
            if tau > 0.0:
                if filtered:
                    b2, i2 = _best_pass(llm_row, ctx_row, noctx_row, V, c, tau, theta, rk + d0, off_lo, off_hi,
                                        seed, True, True, BLOCK, HAS_NOCTX)
                else:
                    b2, i2 = _best_pass(llm_row, ctx_row, noctx_row, V, c, tau, theta, rk + d0, off_lo, off_hi,
                                        seed, True, False, BLOCK, HAS_NOCTX)
            _store_draws(llm_row, ctx_row, noctx_row, tok_ptr, lp_ptr, row64 * D + d0, d0 + dr < D, i2, c, lse, ok,
                         DT, HAS_NOCTX)
        _store_draws(llm_row, ctx_row, noctx_row, tok_ptr, lp_ptr, row64 * D, dr < D, bi, c, lse, ok, DT, HAS_NOCTX)
        tl.store(status_ptr + row, flags)
        if WANT_MAXP:
            tl.store(maxp_ptr + row, tl.where(ok & (ml > float("-inf")), 1.0 / sl, float("nan")))


@triton.jit
def _store_draws(llm_row, ctx_row, noctx_row, tok_ptr, lp_ptr, base, dmask, idx, c, lse, ok,
                 DT: tl.constexpr, HAS_NOCTX: tl.constexpr):
    """Token ids and their steered log-probs (x recomputed from the inputs at the chosen ids)."""
    xt, _ = _steered_block(llm_row, ctx_row, noctx_row, llm_row, idx, dmask, c, 0, HAS_NOCTX)
    dr = tl.arange(0, DT)
    tl.store(tok_ptr + base + dr, tl.where(ok, idx, -1).to(tl.int64), mask=dmask)
    tl.store(lp_ptr + base + dr, tl.where(ok, xt - lse, float("nan")), mask=dmask)


def _plan(B: int, V: int, D: int, device: torch.device, num_splits):
    """(S, BLOCK, SBLOCK, DT): splits per row, block of pass 1, block of the search passes, draw tile."""
    cpu = device.type == "cpu"
    dt = 1 if D == 1 else min(triton.next_power_of_2(D), 1024 if cpu else 16)
    block = min(4096, triton.next_power_of_2(V)) if cpu else 1024
    if dt > 1:
        block = max(16, min(block, (1 << 16) // dt)) if cpu else max(16, 1024 // dt)
    sblock = min(4096, triton.next_power_of_2(V)) if cpu else 256
    if num_splits is None:
        if device.type == "cuda" and D == 1:
            n_sm = torch.cuda.get_device_properties(device).multi_processor_count
            num_splits = 1 if B >= n_sm else min(n_sm // B, triton.cdiv(V, block))
        else:
            num_splits = 1
    num_splits = max(1, min(int(num_splits), MAX_SPLIT, triton.cdiv(V, block)))
    return num_splits, block, sblock, dt


def _stride(t: torch.Tensor) -> int:
    return 0 if t.numel() == 1 else t.stride(0)


def sample_triton(zl, zc, zn, hp, params, want_maxp: bool, num_samples: int = 1, *, num_splits=None):
    """Launch ``steer_sample_kernel``. ``params`` is a ``sampling.SampleParams`` of device tensors
    ([1] or [B] each). Returns (token int64 [B, n], logprob f32 [B, n], maxp f32 [B] or None,
    status int32 [B]); no host sync."""
    if zl.device.type == "cpu" and not INTERPRET:
        raise ValueError(
            "backend='triton' got CPU tensors: run on a GPU, or set TRITON_INTERPRET=1 before importing "
            "triton to run the kernel in Triton's CPU interpreter (slow; for testing)"
        )
    B, V = zl.shape
    D = int(num_samples)
    dev = zl.device
    tok = torch.empty(B, D, dtype=torch.int64, device=dev)
    lp = torch.empty(B, D, dtype=torch.float32, device=dev)
    maxp = torch.empty(B if want_maxp else 1, dtype=torch.float32, device=dev)
    status = torch.empty(B, dtype=torch.int32, device=dev)
    S, block, sblock, dt = _plan(B, V, D, dev, num_splits)
    n = B * S if S > 1 else 1
    part = torch.empty(2 * n, dtype=torch.float32, device=dev)
    partl = torch.empty(2 * n, dtype=torch.float32, device=dev)
    flags = torch.empty(n, dtype=torch.int32, device=dev)
    bk = torch.empty(n * dt, dtype=torch.float32, device=dev)
    bi = torch.empty(n * dt, dtype=torch.int32, device=dev)
    lock = _lock_buffer(dev, B, "sample")
    has_noctx = zn is not None
    zn_arg = zn if has_noctx else zc
    hp_stride = 0 if hp.shape[0] == 1 else hp.stride(0)
    p = params
    steer_sample_kernel[(B, S)](
        zl, zc, zn_arg, hp,
        p.temperature, p.top_k, p.top_p, p.min_p, p.seed, p.offset,
        tok, lp, maxp, status,
        part, partl, flags, bk, bi, lock,
        V, D, zl.stride(0), zc.stride(0), zn_arg.stride(0), hp_stride,
        _stride(p.temperature), _stride(p.top_k), _stride(p.top_p), _stride(p.min_p),
        _stride(p.seed), _stride(p.offset), int(p.row_keyed),
        BLOCK=block, SBLOCK=sblock, DT=dt, HAS_NOCTX=has_noctx, MERGE=1 if S > 1 else 0,
        MAX_SPLIT=MAX_SPLIT, WANT_MAXP=bool(want_maxp), NP=NPIV, num_warps=4,
    )
    return tok, lp, (maxp if want_maxp else None), status


def aot_compile(dtype: str = "fp32", merge: int = 1, draws_tile: int = 1, cc: int = 90) -> dict:
    """Compile ``steer_sample_kernel`` for a CUDA target without a GPU (TRITON_INTERPRET unset);
    returns the cubin's resource usage (registers, stack, shared, local = spilled bytes)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .aot import _res_usage

    types = {"llm_ptr": f"*{dtype}", "ctx_ptr": f"*{dtype}", "noctx_ptr": f"*{dtype}", "hp_ptr": "*fp64",
             "tau_ptr": "*fp32", "topk_ptr": "*i32", "topp_ptr": "*fp32", "minp_ptr": "*fp32", "seed_ptr": "*i64",
             "off_ptr": "*i64", "tok_ptr": "*i64", "lp_ptr": "*fp32", "maxp_ptr": "*fp32", "status_ptr": "*i32",
             "part_ptr": "*fp32", "partl_ptr": "*fp32", "flag_ptr": "*i32", "bk_ptr": "*fp32", "bi_ptr": "*i32",
             "lock_ptr": "*i32"}
    kernel = steer_sample_kernel
    sig = {p.name: ("constexpr" if p.is_constexpr else types.get(p.name, "i32")) for p in kernel.params}
    constexprs = {"BLOCK": 1024 if draws_tile == 1 else 64, "SBLOCK": 256, "DT": draws_tile, "HAS_NOCTX": True,
                  "MERGE": merge, "MAX_SPLIT": MAX_SPLIT, "WANT_MAXP": True, "NP": NPIV}
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", cc, 32), options={"num_warps": 4})
    return _res_usage(compiled.asm["cubin"])


if __name__ == "__main__":  # python -m costeer_kernels.triton.sample: AOT report
    import json

    for dt in ("fp32", "bf16"):
        for mg in (0, 1):
            print(dt, f"merge={mg}", json.dumps(aot_compile(dt, mg)))
