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


def timeit_interleaved(fns, runs: int, warmup: int = 5):
    """Per case (median, p10, p90) seconds; the cases run round-robin within each run, so a busy
    neighbour on a shared machine slows all of them alike. Each timed call follows two untimed
    calls of the same case, so no case pays for the caches another case left behind."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    ts = [[] for _ in fns]
    for _ in range(runs):
        for j, fn in enumerate(fns):
            fn()
            fn()
            t0 = time.perf_counter()
            fn()
            ts[j].append(time.perf_counter() - t0)
    out = []
    for t in ts:
        t.sort()
        out.append((statistics.median(t), t[len(t) // 10], t[(9 * len(t)) // 10]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--greedy-only", action="store_true", help="skip the sampling rows (faster)")
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

    from costeer_kernels.registry import resolve

    dflt = resolve("sample", None, zl.device)  # the C++ sampler when the extension is built
    tok2, _ = steer_sample(zl, zc, zn)
    assert torch.equal(ref, tok2), f"greedy steer_sample ({dflt}) disagrees with steer + argmax"
    cases = [
        ("steer + torch.argmax (baseline)", lambda: steer(zl, zc, zn).argmax(-1)),
        ("steer(validate=False) + argmax", lambda: steer(zl, zc, zn, validate=False).argmax(-1)),
        (f"steer_sample greedy ({dflt})", lambda: steer_sample(zl, zc, zn)),
        (f"steer_sample greedy ({dflt}), validate=False", lambda: steer_sample(zl, zc, zn, validate=False)),
        (f"steer_sample greedy + llm max prob ({dflt})", lambda: steer_sample(zl, zc, zn, return_llm_max_prob=True)),
        ("steer_sample greedy (torch)", lambda: steer_sample(zl, zc, zn, backend="torch")),
        (f"steer_sample temperature=0.8 ({dflt})", lambda: steer_sample(zl, zc, zn, temperature=0.8, seed=1)),
        (f"steer_sample t=0.8 top_k=50 top_p=0.9 ({dflt})", lambda: steer_sample(zl, zc, zn, temperature=0.8, top_k=50, top_p=0.9, seed=1)),
        ("steer_sample temperature=0.8 (torch)", lambda: steer_sample(zl, zc, zn, backend="torch", temperature=0.8, seed=1)),
        ("steer_sample t=0.8 top_k=50 top_p=0.9 (torch)", lambda: steer_sample(zl, zc, zn, backend="torch", temperature=0.8, top_k=50, top_p=0.9, seed=1)),
    ]
    if args.greedy_only:
        cases = cases[:6]
    from costeer_kernels import available_backends

    print(f"# steer backends: {available_backends()}; CPU, B={args.batch}, V={args.vocab}, {args.dtype}, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, cores={os.cpu_count()}, runs={args.runs} (median, p10, p90)")
    stats = timeit_interleaved([fn for _, fn in cases], args.runs)
    base = stats[0][0]
    print(f"{'case':42s} {'median us':>10s} {'p10 us':>9s} {'p90 us':>9s} {'speedup':>8s}")
    for (name, _), (med, p10, p90) in zip(cases, stats):
        print(f"{name:42s} {med * 1e6:10.1f} {p10 * 1e6:9.1f} {p90 * 1e6:9.1f} {base / med:7.2f}x")


if __name__ == "__main__":
    main()
