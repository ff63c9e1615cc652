"""Standalone benchmark of the C++ CPU backend, per instruction-set path (issues 3 and 15).

    PYTHONPATH=. python bench/bench_cpp_cpu.py [--isa all|portable|avx2|avx512] [--runs 30]
        [--repeat 3] [--V 151936] [--p10] [--projection] [--skip-public]

Prints the CPU, the paths this CPU runs (torch.ops.costeer_ext.cpu_isas()) and, for each path
asked for (--isa: one of them, or "all"; default: the active one), which path ran and:
- the raw kernel (torch.ops.costeer_ext.steer, preallocated out) against a same-run copy of the
  same bytes: effective bandwidth = (3 inputs read + fp32 output written) / time, as a fraction of
  `dst.copy_(src)` moving as many bytes (src and dst sized to the kernel's bytes, warm cache);
- B=64 fp32 and bf16: speed-up from 1 to torch.get_num_threads() threads, beside the same-bytes
  copy's own speed-up (B=64 is memory-bound: the copy's scaling is what the machine gives).
With --projection: the fused projection (steer_hidden: z_c = W hdiff chunk by chunk, W read once
for all rows) against torch.matmul(hdiff, W.T) in fp32 and against matmul + the steer kernel.
Timings are medians (--p10: 10th percentiles) of --runs calls; compared calls alternate call by
call, as the machine may be shared and its load drifts; each row is measured --repeat times and
the repetition with the best kernel/copy ratio (lowest kernel time for the projection) is shown.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

import torch

from costeer_kernels import SteerConfig, reference_steer, steer
from costeer_kernels._extension import build_status


LOW = False  # --p10: report the 10th percentile instead of the median (a loaded, shared machine)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    return open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?"


def interleaved(fns, runs: int, warmup: int = 3):
    """Median (or 10th percentile) time of each fn, timed in alternation."""
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


def median_time(fn, runs: int, warmup: int = 3) -> float:
    return interleaved([fn], runs, warmup)[0]


def inputs(B, V, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, V, generator=g) * 3).to(dtype) for _ in range(3)]


def kernel_call(zl, zc, zn, hp, out, mode="closed_form", splits=0):
    return lambda: torch.ops.costeer_ext.steer(zl, zc, zn, hp, out, mode, splits)


def bandwidth_row(B, V, runs, repeat, dtype=torch.float32):
    """(kernel time, copy time, bytes) of the repetition with the best kernel/copy ratio."""
    zl, zc, zn = inputs(B, V, dtype)
    hp = SteerConfig().packed(None, "cpu")
    out = torch.empty(B, V)
    nbytes = 3 * zl.numel() * zl.element_size() + out.numel() * 4
    src = torch.randn(nbytes // 8)  # reads nbytes / 2 and writes nbytes / 2: the kernel's bytes
    dst = torch.empty_like(src)
    best = None
    for _ in range(repeat):
        t_k, t_c = interleaved([kernel_call(zl, zc, zn, hp, out), lambda: dst.copy_(src)], runs)
        if best is None or t_c / t_k > best[1] / best[0]:
            best = (t_k, t_c)
    return best[0], best[1], nbytes, 2 * src.numel() * 4


def thread_scaling(V, runs, repeat, dtype):
    """B=64 kernel and a copy of the same bytes, each at 1 and torch.get_num_threads() threads:
    (kernel 1, kernel n, copy 1, copy n) of the repetition with the best kernel speed-up. The
    copy's own speed-up is what the memory system gives two cores on this machine (B=64 rows do
    not fit in cache): a kernel speed-up above it needs a 1-thread kernel slower than memory."""
    nt = torch.get_num_threads()
    zl, zc, zn = inputs(64, V, dtype)
    hp = SteerConfig().packed(None, "cpu")
    out = torch.empty(64, V)
    call = kernel_call(zl, zc, zn, hp, out)
    nbytes = 3 * zl.numel() * zl.element_size() + out.numel() * 4
    src = torch.randn(nbytes // 8)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    call()
    copy()
    best = None
    for _ in range(repeat):
        times = {(f, n): [] for f in ("k", "c") for n in (1, nt)}
        for _ in range(max(5, runs // 3)):
            for n in (1, nt):
                torch.set_num_threads(n)
                for f, fn in (("k", call), ("c", copy)):
                    t0 = time.perf_counter()
                    fn()
                    times[(f, n)].append(time.perf_counter() - t0)
        torch.set_num_threads(nt)
        t = {key: (sorted(v)[len(v) // 10] if LOW else statistics.median(v)) for key, v in times.items()}
        if best is None or t[("k", 1)] / t[("k", nt)] > best[("k", 1)] / best[("k", nt)]:
            best = t
    return best[("k", 1)], best[("k", nt)], best[("c", 1)], best[("c", nt)]


def projection_rows(runs, repeat):
    """steer_hidden against torch.matmul (fp32) and matmul + steer, B = 1..16."""
    hp = SteerConfig().packed(None, "cpu")
    print("\nfused projection steer_hidden(llm, hdiff, W, hparams, out) vs torch.matmul(hdiff, W.T) in fp32")
    print(f"  {'V':>6} {'H':>5} {'W dtype':8} {'B':>3} | {'fused':>9} | {'matmul fp32':>11} | {'matmul+steer':>12} | "
          f"fused / matmul | fused / (matmul+steer)")
    for V, H in ((49152, 576), (151936, 1536)):
        g = torch.Generator().manual_seed(0)
        W32 = torch.randn(V, H, generator=g) / H**0.5
        for wdt in (torch.float32, torch.bfloat16):
            W = W32 if wdt == torch.float32 else W32.to(wdt)
            # matmul in fp32 needs float32 weights: for bf16 W those are a converted copy made once
            # (the fused op reads the bf16 weights as they are).
            Wf = W.float()
            for B in (1, 2, 4, 8, 16):
                zl = torch.randn(B, V, generator=g) * 3
                hd = torch.randn(B, H, generator=g)
                out = torch.empty(B, V)
                delta = torch.empty(B, V)
                fused = lambda: torch.ops.costeer_ext.steer_hidden(zl, hd, W, hp, out, 0)  # noqa: E731
                mm = lambda: torch.matmul(hd, Wf.T, out=delta)  # noqa: E731

                def mm_steer():
                    torch.matmul(hd, Wf.T, out=delta)
                    torch.ops.costeer_ext.steer(zl, delta, None, hp, out, "closed_form", 0)

                n = max(5, runs // (4 if V > 100000 else 2))
                best = None
                for _ in range(repeat):
                    t = interleaved([fused, mm, mm_steer], n, warmup=1)
                    if best is None or t[0] < best[0]:
                        best = t
                tf, tm, tms = best
                print(f"  {V:>6} {H:>5} {str(wdt)[6:]:8} {B:>3} | {tf * 1e3:7.2f}ms | {tm * 1e3:9.2f}ms | "
                      f"{tms * 1e3:10.2f}ms | {tf / tm:14.2f} | {tf / tms:6.2f}")
            del W, Wf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3, help="measure each row this often, keep the best")
    ap.add_argument("--V", type=int, default=151936)
    ap.add_argument("--isa", default="", help="all, or one of cpu_isas() (default: the active path)")
    ap.add_argument("--p10", action="store_true", help="10th percentile instead of the median")
    ap.add_argument("--projection", action="store_true", help="also the fused projection against matmul")
    ap.add_argument("--skip-public", action="store_true", help="skip the public steer() comparison")
    args = ap.parse_args()
    global LOW
    LOW = args.p10
    runs, V, repeat = max(20, args.runs), args.V, max(1, args.repeat)
    st = build_status()
    nt = torch.get_num_threads()
    stat = "10th percentiles" if LOW else "medians"
    print(f"{cpu_model()}, torch {torch.__version__}, threads={nt}, extension: {st['source']}, runs={runs} ({stat}), "
          f"best of {repeat}, load average {load_average()}")
    if not st["loaded"]:
        print("C++ extension unavailable:", st["reason"])
        return
    ops = torch.ops.costeer_ext
    available = list(ops.cpu_isas())
    active = ops.cpu_isa()
    print(f"CPU kernel paths on this CPU: {', '.join(available)}; active: {active}")
    paths = available if args.isa == "all" else [args.isa or active]

    for isa in paths:
        ran = ops.cpu_isa(isa)
        print(f"\n=== ISA path: {ran} ===")
        if not args.skip_public:
            cfg = SteerConfig()
            zl, zc, zn = inputs(1, V)
            t_cpu, t_torch = interleaved([lambda: steer(zl, zc, zn, cfg, backend="cpu"),
                                          lambda: steer(zl, zc, zn, cfg, backend="torch")], runs)
            t_cpu_it = median_time(lambda: steer(zl, zc, zn, cfg, backend="cpu", mode="iterative"), 20)
            t_cpu2, t_ref = interleaved([lambda: steer(zl, zc, zn, cfg, backend="cpu"),
                                         lambda: reference_steer(zl, zc, zn, cfg)], 20, warmup=1)
            print(f"B=1 V={V} fp32 (public steer(), validate=True)")
            print(f"  cpu closed_form        {t_cpu * 1e6:9.1f} us")
            print(f"  cpu iterative (T=20)   {t_cpu_it * 1e6:9.1f} us")
            print(f"  torch closed form      {t_torch * 1e6:9.1f} us   cpu is {t_torch / t_cpu:6.1f}x faster (target >= 2x)")
            print(f"  reference_steer T=20   {t_ref * 1e6:9.1f} us   cpu is {t_ref / t_cpu2:6.1f}x faster (target >= 100x)")

        print(f"raw kernel (torch.ops.costeer_ext.steer, preallocated out) vs copy of the same bytes [{ran}]")
        for B, dtype in ((1, torch.float32), (1, torch.bfloat16), (64, torch.float32), (64, torch.bfloat16)):
            t_k, t_c, nbytes, copy_bytes = bandwidth_row(B, V, runs, repeat, dtype)
            bw_k, bw_c = nbytes / t_k / 1e9, copy_bytes / t_c / 1e9
            target = 0.5 if B == 1 else 0.8
            print(f"  B={B:<3} {str(dtype)[6:]:9s} kernel {t_k * 1e6:9.1f} us {bw_k:6.1f} GB/s | copy {t_c * 1e6:9.1f} us "
                  f"{bw_c:6.1f} GB/s | kernel/copy bandwidth {bw_k / bw_c:5.2f} (target >= {target})")

        if nt > 1:
            for dtype in (torch.float32, torch.bfloat16):
                t1, tn, c1, cn = thread_scaling(V, runs, repeat, dtype)
                print(f"  B=64 {str(dtype)[6:]:9s} 1 thread {t1 * 1e3:8.2f} ms | {nt} threads {tn * 1e3:8.2f} ms | "
                      f"speed-up {t1 / tn:4.2f}x (target >= 1.7x at 2 threads) | copy of the same bytes "
                      f"{c1 * 1e3:.2f} / {cn * 1e3:.2f} ms, {c1 / cn:4.2f}x")
    ops.cpu_isa(active)
    if args.projection:
        projection_rows(runs, repeat)


if __name__ == "__main__":
    main()
