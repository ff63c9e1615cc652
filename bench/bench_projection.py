"""Benchmark of steer_from_hidden (issue 4 targets), CPU by default.

    PYTHONPATH=. python bench/bench_projection.py [--runs 40] [--V 49152] [--H 576] [--B 1] [--dtype fp32]

SmolLM2-135M head shape (V=49152, H=576, fp32; random weights), B=1. Candidates, timed round-robin
(one call of each per round, so that drift hits all alike), median of --runs rounds after warm-up:

    fused            steer_from_hidden(z_L, h_c, h_n, W)   (dh = h_c - h_n, one GEMV, steer on the delta)
    1 matmul         torch.matmul(W, h)                     (one GEMV over the same W: the floor)
    2 matmuls+steer  z_c = W h_c, z_n = W h_n, steer(z_L, z_c, z_n)
    batched+steer    z = [h_c; h_n] @ W.T (one GEMM over both rows, rows already stacked), steer(z_L, z[0], z[1])

Targets: fused <= 1.25x "1 matmul"; >= 1.8x faster than "2 matmuls+steer"; >= 1.1x faster than
"batched+steer". Every steer call uses out= and validate=False (no allocation, no host read) in
all candidates; "fused (validate=True)" is listed too.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import costeer_kernels as ck
from costeer_kernels.projection import steer_from_hidden

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def round_robin(fns: dict, runs: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--V", type=int, default=49152)
    ap.add_argument("--H", type=int, default=576)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.runs < 20:
        ap.error("--runs must be >= 20")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    B, V, H = args.B, args.V, args.H
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(V, H, generator=g) * 0.05).to(dtype)
    hc = torch.randn(B, H, generator=g).to(dtype)
    hn = torch.randn(B, H, generator=g).to(dtype)
    h2 = torch.cat([hc, hn], 0).contiguous()  # the batched baseline gets its rows pre-stacked
    zl = torch.randn(B, V, generator=g) * 3
    out = torch.empty(B, V)
    backend = ck.registry.resolve("steer", None, zl.device)

    def fused():
        steer_from_hidden(zl, hc, hn, W, out=out, validate=False)

    def fused_validated():
        steer_from_hidden(zl, hc, hn, W, out=out)

    def one_matmul():
        torch.matmul(W, hc[0]) if B == 1 else torch.matmul(hc, W.t())

    def two_matmuls_steer():
        zc = torch.matmul(hc, W.t())
        zn = torch.matmul(hn, W.t())
        ck.steer(zl, zc, zn, out=out, validate=False)

    def batched_steer():
        z = torch.matmul(h2, W.t())
        ck.steer(zl, z[:B], z[B:], out=out, validate=False)

    # Same result check before timing.
    fused()
    ref = ck.steer(zl, (hc.float() @ W.float().t()), (hn.float() @ W.float().t()))
    err = (out - ref).abs().max().item()

    t = round_robin({
        "fused": fused,
        "fused (validate=True)": fused_validated,
        "1 matmul": one_matmul,
        "2 matmuls + steer": two_matmuls_steer,
        "batched matmul + steer": batched_steer,
    }, args.runs)

    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"machine: {_cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}; steer backend '{backend}'; load average {load} "
          "(other processes on the cores distort CPU timings)")
    print(f"shape: B={B} V={V} H={H} {args.dtype}; W = {W.numel() * W.element_size() / 1e6:.1f} MB; "
          f"median of {args.runs} round-robin runs; max |fused - steer(W h_c, W h_n)| = {err:.2e}")
    print()
    print(f"{'candidate':26s} {'median us':>11s} {'vs fused':>9s}")
    for k, v in t.items():
        print(f"{k:26s} {v:11.1f} {v / t['fused']:8.2f}x")
    print()
    targets = [
        ("fused / 1 matmul", t["fused"] / t["1 matmul"], "<= 1.25", t["fused"] / t["1 matmul"] <= 1.25),
        ("(2 matmuls + steer) / fused", t["2 matmuls + steer"] / t["fused"], ">= 1.8",
         t["2 matmuls + steer"] / t["fused"] >= 1.8),
        ("(batched + steer) / fused", t["batched matmul + steer"] / t["fused"], ">= 1.1",
         t["batched matmul + steer"] / t["fused"] >= 1.1),
    ]
    print(f"{'target':30s} {'measured':>9s} {'goal':>8s}  met")
    for name, val, goal, ok in targets:
        print(f"{name:30s} {val:9.3f} {goal:>8s}  {'yes' if ok else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
