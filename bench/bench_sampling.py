"""Benchmark: greedy steer_sample against steer followed by torch.argmax (CPU, B=1, V=151936).

Usage: python bench/bench_sampling.py [--runs 50] [--threads N] [--vocab 151936] [--batch 1]
Prints a table of medians (and p10/p90) over --runs timed calls after warm-up.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from costeer_kernels import steer  # noqa: E402
from costeer_kernels.sampling import steer_sample  # noqa: E402


def timeit(fn, runs: int, warmup: int = 5):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return statistics.median(ts), ts[len(ts) // 10], ts[(9 * len(ts)) // 10]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    zl, zc, zn = [(torch.randn(args.batch, args.vocab, generator=g) * 3).to(dtype) for _ in range(3)]

    ref = steer(zl, zc, zn).argmax(-1)
    tok, _ = steer_sample(zl, zc, zn, backend="torch")
    assert torch.equal(ref, tok), "greedy steer_sample disagrees with steer + argmax"

    cases = [
        ("steer + torch.argmax (baseline)", lambda: steer(zl, zc, zn).argmax(-1)),
        ("steer(validate=False) + argmax", lambda: steer(zl, zc, zn, validate=False).argmax(-1)),
        ("steer_sample greedy", lambda: steer_sample(zl, zc, zn, backend="torch")),
        ("steer_sample greedy, validate=False", lambda: steer_sample(zl, zc, zn, backend="torch", validate=False)),
        ("steer_sample greedy + llm max prob", lambda: steer_sample(zl, zc, zn, backend="torch", return_llm_max_prob=True)),
        ("steer_sample temperature=0.8", lambda: steer_sample(zl, zc, zn, backend="torch", temperature=0.8, seed=1)),
        ("steer_sample t=0.8 top_k=50 top_p=0.9", lambda: steer_sample(zl, zc, zn, backend="torch", temperature=0.8, top_k=50, top_p=0.9, seed=1)),
    ]
    print(f"# CPU, B={args.batch}, V={args.vocab}, {args.dtype}, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, cores={os.cpu_count()}, runs={args.runs} (median, p10, p90)")
    base = None
    print(f"{'case':42s} {'median us':>10s} {'p10 us':>9s} {'p90 us':>9s} {'speedup':>8s}")
    for name, fn in cases:
        med, p10, p90 = timeit(fn, args.runs)
        if base is None:
            base = med
        print(f"{name:42s} {med * 1e6:10.1f} {p10 * 1e6:9.1f} {p90 * 1e6:9.1f} {base / med:7.2f}x")


if __name__ == "__main__":
    main()
