"""Standalone benchmark of the C++ CPU backend (issue 3 targets).

    PYTHONPATH=. python bench/bench_cpp_cpu.py [--runs 30] [--V 151936] [--p10]

Prints medians (of --runs timed calls after warm-up; compared timings alternate call by call, as
the machine is shared and its load drifts) and the ratios the issue asks for:
- B=1 fp32: speed-up over reference_steer (T=20) and over steer(backend="torch");
- effective bandwidth = (3 inputs read + output written) / time, as a fraction of a same-run
  copy of the same number of bytes (torch copy_ of 2*B*V floats into a preallocated buffer:
  reads 2BV and writes 2BV floats = 3BV read + BV written);
- B=64: speed-up from 1 to torch.get_num_threads() threads.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from costeer_kernels import SteerConfig, reference_steer, steer
from costeer_kernels._extension import build_status


LOW = False  # --p10: report the 10th percentile instead of the median (a loaded, shared machine)


def median_time(fn, runs: int, warmup: int = 3) -> float:
    return interleaved([fn], runs, warmup)[0]


def inputs(B, V, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, V, generator=g) * 3).to(dtype) for _ in range(3)]


def kernel_call(zl, zc, zn, hp, out, mode="closed_form", splits=0):
    return lambda: torch.ops.costeer_ext.steer(zl, zc, zn, hp, out, mode, splits)


def interleaved(fns, runs: int, warmup: int = 3):
    """Median time of each fn, timed in alternation (the machine is shared: load drifts)."""
    for f in fns:
        for _ in range(warmup):
            f()
    ts = [[] for _ in fns]
    for _ in range(runs):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            ts[i].append(time.perf_counter() - t0)
    if LOW:
        return [sorted(t)[len(t) // 10] for t in ts]
    return [statistics.median(t) for t in ts]


def bandwidth_row(B, V, runs, dtype=torch.float32):
    zl, zc, zn = inputs(B, V, dtype)
    hp = SteerConfig().packed(None, "cpu")
    out = torch.empty(B, V)
    src = torch.randn(2 * B * V)
    dst = torch.empty_like(src)
    t_k, t_c = interleaved([kernel_call(zl, zc, zn, hp, out), lambda: dst.copy_(src)], runs)
    nbytes = 3 * zl.numel() * zl.element_size() + out.numel() * 4
    return t_k, t_c, nbytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--V", type=int, default=151936)
    ap.add_argument("--p10", action="store_true", help="10th percentile instead of the median")
    args = ap.parse_args()
    global LOW
    LOW = args.p10
    runs, V = max(20, args.runs), args.V
    st = build_status()
    nt = torch.get_num_threads()
    stat = "10th percentiles" if LOW else "medians"
    print(f"torch {torch.__version__}, threads={nt}, extension: {st['source']}, runs={runs} ({stat}), "
          f"load average {open('/proc/loadavg').read().split()[0] if os.path.exists('/proc/loadavg') else '?'}")
    if not st["loaded"]:
        print("C++ extension unavailable:", st["reason"])
        return

    cfg = SteerConfig()
    zl, zc, zn = inputs(1, V)
    t_cpu, t_torch = interleaved([lambda: steer(zl, zc, zn, cfg, backend="cpu"),
                                  lambda: steer(zl, zc, zn, cfg, backend="torch")], runs)
    t_cpu_it = median_time(lambda: steer(zl, zc, zn, cfg, backend="cpu", mode="iterative"), 20)
    t_cpu2, t_ref = interleaved([lambda: steer(zl, zc, zn, cfg, backend="cpu"),
                                 lambda: reference_steer(zl, zc, zn, cfg)], 20, warmup=1)
    print(f"\nB=1 V={V} fp32 (public steer(), validate=True)")
    print(f"  cpu closed_form        {t_cpu * 1e6:9.1f} us")
    print(f"  cpu iterative (T=20)   {t_cpu_it * 1e6:9.1f} us")
    print(f"  torch closed form      {t_torch * 1e6:9.1f} us   cpu is {t_torch / t_cpu:6.1f}x faster (target >= 2x)")
    print(f"  reference_steer T=20   {t_ref * 1e6:9.1f} us   cpu is {t_ref / t_cpu2:6.1f}x faster (target >= 100x)")

    print("\nraw kernel (torch.ops.costeer_ext.steer, preallocated out) vs copy of the same bytes")
    for B, dtype in ((1, torch.float32), (64, torch.float32), (64, torch.bfloat16)):
        t_k, t_c, nbytes = bandwidth_row(B, V, runs, dtype)
        copy_bytes = 2 * 2 * B * V * 4
        bw_k, bw_c = nbytes / t_k / 1e9, copy_bytes / t_c / 1e9
        print(f"  B={B:<3} {str(dtype)[6:]:9s} kernel {t_k * 1e6:9.1f} us {bw_k:6.1f} GB/s | copy {t_c * 1e6:9.1f} us "
              f"{bw_c:6.1f} GB/s | kernel/copy bandwidth {bw_k / bw_c:5.2f} (target >= 0.5 for fp32)")

    if nt > 1:
        print(f"\nB=64 fp32 thread scaling")
        zl, zc, zn = inputs(64, V)
        hp = SteerConfig().packed(None, "cpu")
        out = torch.empty(64, V)
        times = {1: [], nt: []}
        call = kernel_call(zl, zc, zn, hp, out)
        call()
        for _ in range(runs):
            for n in (1, nt):
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                call()
                times[n].append(time.perf_counter() - t0)
        torch.set_num_threads(nt)
        times = {n: (sorted(t)[len(t) // 10] if LOW else statistics.median(t)) for n, t in times.items()}
        print(f"  1 thread {times[1] * 1e3:8.2f} ms | {nt} threads {times[nt] * 1e3:8.2f} ms | speed-up {times[1] / times[nt]:4.2f}x")


if __name__ == "__main__":
    main()
