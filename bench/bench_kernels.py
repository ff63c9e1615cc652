"""Kernel benchmark: every steering backend against the reference loop and a same-run copy.

    python bench/bench_kernels.py                 # the op issue's table: B in {1, 8, 64}, V=151936
    python bench/bench_kernels.py --preset full   # B x V x dtype grid of the report
    python bench/bench_kernels.py --preset tiny   # seconds; what CI runs to test the harness

Writes JSON, a Markdown table and PNG plots under bench/results/<machine>/ (or --out) and prints
the table. Effective bandwidth counts the bytes a fused op must move: three input rows read and
one float32 row written; "copy %" compares it with a copy of the same bytes timed in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import costeer_kernels as ck
from bench.harness import Report, Timing, copy_timing, git_rev, machine_info, time_cuda_graph, time_fn

PRESETS = {
    "op": dict(batches=[1, 8, 64], vocabs=[151936], dtypes=["fp32", "bf16"], ref_max_batch=64, compile_ref=True,
               sample_max_batch=64, proj=[(1, 49152, 576), (8, 49152, 576)]),
    "full": dict(batches=[1, 4, 16, 64, 256], vocabs=[32000, 49152, 128256, 151936], dtypes=["fp32", "fp16", "bf16"],
                 ref_max_batch=4, compile_ref=False, sample_max_batch=16,
                 proj=[(1, 49152, 576), (16, 49152, 576), (1, 151936, 1536)]),
    "tiny": dict(batches=[1, 4], vocabs=[4099], dtypes=["fp32", "bf16"], ref_max_batch=4, compile_ref=False,
                 sample_max_batch=4, proj=[(1, 4099, 64)]),
}
# On a GPU the projection is measured at the shape (a 1.5B small model's head).
CUDA_PROJ = [(1, 151936, 1536), (16, 151936, 1536)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _backends(device: str):
    names = [b for b in ck.available_backends() if b != "triton" or device == "cuda"]
    return [b for b in names if ck.registry._BACKENDS[b].runs_on(torch.device(device))]


def bench_case(B, V, dtype_name, device, *, runs, ref, compile_ref, cold, graphs, sample=False):
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device="cpu").manual_seed(0)
    zl, zc, zn = (torch.randn(B, V, generator=g).mul_(3).to(device=device, dtype=dtype) for _ in range(3))
    out = torch.empty(B, V, dtype=torch.float32, device=device)
    nbytes = B * V * (3 * zl.element_size() + 4)
    copy = copy_timing(nbytes, device, runs=runs, cold=cold)
    copy_gbs = nbytes / (copy.median_us * 1e-6) / 1e9
    rows = []

    def row(name, t: Timing, extra=None):
        gbs = nbytes / (t.median_us * 1e-6) / 1e9
        r = {"op": "steer", "backend": name, "B": B, "V": V, "dtype": dtype_name, "cache": "cold" if cold else "warm",
             "median_us": t.median_us, "p90_us": t.p90_us, "runs": t.runs, "GB/s": gbs,
             "copy %": 100.0 * gbs / copy_gbs, "copy_GB/s": copy_gbs}
        r.update(extra or {})
        rows.append(r)
        return r

    ref_t = None
    if ref:
        ref_t = time_fn(lambda: ck.reference_steer(zl, zc, zn), device, runs=max(3, runs // 4), warmup=1, cold=cold)
        row("reference (eager, T=20)", ref_t)
        if compile_ref:
            try:
                compiled = torch.compile(ck.reference_steer, dynamic=False)
                compiled(zl, zc, zn)
                row("reference (torch.compile)", time_fn(lambda: compiled(zl, zc, zn), device, runs=max(3, runs // 4),
                                                         warmup=1, cold=cold))
            except Exception as exc:  # inductor needs a working C++ toolchain on CPU
                print(f"  torch.compile(reference_steer) skipped: {type(exc).__name__}: {exc}"[:200])
    for name in _backends(device):
        fn = lambda name=name: ck.steer(zl, zc, zn, backend=name, out=out, validate=False)
        t = time_fn(fn, device, runs=runs, cold=cold)
        extra = {}
        if graphs and device == "cuda":
            extra["graph_us"] = _graph_us(fn)
        label = "torch closed form" if name == "torch" else name
        row(label, t, extra)
        if name == "triton" and device == "cuda":
            for label, fn in _triton_merge_variants(zl, zc, zn, out):
                row(label, time_fn(fn, device, runs=runs, cold=cold), {"graph_us": _graph_us(fn)} if graphs else {})
    if sample:
        rows.extend(_sampling_rows(zl, zc, zn, out, device, runs, cold, copy_gbs, row_base=rows[0] if rows else None))
    for r in rows:
        r["speedup_vs_ref"] = (ref_t.median_us / r["median_us"]) if ref_t else ""
    return rows


def _graph_us(fn):
    """Replayed-graph time per call, or "" where capture fails (the row still has its event time)."""
    try:
        return time_cuda_graph(fn).median_us
    except Exception as exc:  # noqa: BLE001 - a capture failure is a finding, not a crash
        print(f"  CUDA graph capture failed: {type(exc).__name__}: {exc}"[:200])
        return ""


def _triton_merge_variants(zl, zc, zn, out):
    """The split row's two in-launch merges side by side (barrier is the CUDA default)."""
    from costeer_kernels import SteerConfig
    from costeer_kernels.triton.steer import _plan, launch_shape, steer_triton

    B, V = zl.shape
    key = (zl.device, zl.dtype, zc.dtype, zn.dtype, True, False, *launch_shape(B, zl.device))  # the default plan
    S = _plan(B, V, zl.device, None, None, key=key)[0]
    if S == 1:
        return []
    hp = SteerConfig().packed(None, zl.device)
    return [(f"triton merge={m} (S={S})", lambda m=m: steer_triton(zl, zc, zn, hp, out, merge=m))
            for m in ("barrier", "last")]


def _samplers(device: str):
    from costeer_kernels.registry import resolve
    from costeer_kernels.sampling import available_samplers

    names = [s for s in available_samplers() if (s == "torch" or s == device or (s == "triton" and device == "cuda"))]
    return names, resolve("sample", None, torch.device(device))


def _sampling_rows(zl, zc, zn, out, device, runs, cold, copy_gbs, row_base):
    """steer_sample (reads the three rows, writes none) against steer + argmax, same inputs."""
    B, V = zl.shape
    nbytes = B * V * 3 * zl.element_size()
    names, default = _samplers(device)
    cases = [("steer + argmax", None, lambda: ck.steer(zl, zc, zn, out=out, validate=False).argmax(-1))]
    for name in names:
        cases.append(("steer_sample greedy", name, lambda name=name: ck.steer_sample(zl, zc, zn, backend=name, validate=False)))
    cases.append(("steer_sample t=0.8 top_p=0.9", default,
                  lambda: ck.steer_sample(zl, zc, zn, backend=default, temperature=0.8, top_p=0.9, seed=1, validate=False)))
    rows = []
    for op, name, fn in cases:
        t = time_fn(fn, device, runs=runs, cold=cold)
        gbs = nbytes / (t.median_us * 1e-6) / 1e9
        extra = {"graph_us": _graph_us(fn)} if device == "cuda" else {}
        rows.append({**extra, "op": op, "backend": name or ck.registry.resolve("steer", None, zl.device), "B": B, "V": V,
                     "dtype": row_base["dtype"] if row_base else "", "cache": "cold" if cold else "warm",
                     "median_us": t.median_us, "p90_us": t.p90_us, "runs": t.runs, "GB/s": gbs,
                     "copy %": 100.0 * gbs / copy_gbs, "copy_GB/s": copy_gbs})
    base = rows[0]["median_us"]
    for r in rows:
        r["vs steer+argmax"] = base / r["median_us"]
    return rows


def bench_projection(B, V, H, dtype_name, device, *, runs):
    """steer_from_hidden against the GEMV/GEMM over the same W (its floor) and the unfused paths."""
    from costeer_kernels import steer_from_hidden

    dtype = DTYPES[dtype_name]
    g = torch.Generator(device="cpu").manual_seed(0)
    W = (torch.randn(V, H, generator=g) * H**-0.5).to(device=device, dtype=dtype)
    hc, hn = (torch.randn(B, H, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    h2 = torch.cat([hc, hn], 0)
    zl = torch.randn(B, V, generator=g).mul_(3).to(device)
    out = torch.empty(B, V, device=device)
    nbytes = W.numel() * W.element_size() + B * V * 8
    cases = [
        ("GEMV/GEMM W h (floor)", lambda: torch.matmul(W, hc[0]) if B == 1 else torch.matmul(hc, W.t())),
        ("steer_from_hidden", lambda: steer_from_hidden(zl, hc, hn, W, out=out, validate=False)),
        ("steer_from_hidden sample=greedy", lambda: steer_from_hidden(zl, hc, hn, W, sample=True, validate=False)),
        ("batched matmul + steer", lambda: ck.steer(zl, *torch.matmul(h2, W.t()).split(B), out=out, validate=False)),
        ("2 matmuls + steer", lambda: ck.steer(zl, torch.matmul(hc, W.t()), torch.matmul(hn, W.t()), out=out,
                                               validate=False)),
    ]
    rows = []
    for op, fn in cases:
        t = time_fn(fn, device, runs=runs)
        gbs = nbytes / (t.median_us * 1e-6) / 1e9
        extra = {"graph_us": _graph_us(fn)} if device == "cuda" else {}
        rows.append({**extra, "op": f"{op} (H={H})", "backend": ck.registry.resolve("steer", None, zl.device), "B": B, "V": V,
                     "dtype": dtype_name, "cache": "warm", "median_us": t.median_us, "p90_us": t.p90_us,
                     "runs": t.runs, "GB/s": gbs})
    floor = rows[0]["median_us"]
    for r in rows:
        r["vs GEMV"] = r["median_us"] / floor
    return rows


def plots(report: Report, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r["cache"] == "warm" and r["op"] in ("steer", "steer_sample greedy")]
    if not rows:
        return
    V = max(r["V"] for r in rows)
    for metric, fname, ylabel in (("median_us", "latency_vs_batch.png", "median latency (us)"),
                                  ("copy %", "roofline_share.png", "share of same-run copy bandwidth (%)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for dtype in sorted({r["dtype"] for r in rows}):
            for be in sorted({r["backend"] for r in rows}):
                pts = sorted((r["B"], r[metric]) for r in rows if r["backend"] == be and r["dtype"] == dtype and r["V"] == V)
                if len(pts) >= 1:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{be} {dtype}")
        ax.set_xscale("log", base=2)
        if metric == "median_us":
            ax.set_yscale("log")
        ax.set_xlabel("batch B")
        ax.set_ylabel(ylabel)
        ax.set_title(f"steer, V={V}, {report.machine.get('gpu') or report.machine['cpu']}"[:80])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)


COLUMNS = ["op", "backend", "B", "V", "dtype", "cache", "median_us", "p90_us", "GB/s", "copy %", "speedup_vs_ref",
           "vs steer+argmax", "vs GEMV"]


def _print_row(r) -> None:
    extra = ""
    if r.get("speedup_vs_ref", "") != "":
        extra += f"  x{r['speedup_vs_ref']:.1f} vs ref"
    if "vs steer+argmax" in r:
        extra += f"  {r['vs steer+argmax']:.2f}x vs steer+argmax"
    if "vs GEMV" in r:
        extra += f"  {r['vs GEMV']:.2f} of the GEMV's time"
    if r.get("graph_us", "") != "":
        extra += f"  graph {r['graph_us']:.1f} us"
    copy = f"  {r['copy %']:6.1f}% copy" if "copy %" in r else ""
    print(f"{r['op'][:34]:34s} {str(r['backend']):8s} B={r['B']:<4d} V={r['V']:<7d} {r['dtype']:5s} {r['cache']:4s} "
          f"{r['median_us']:12.1f} us  {r['GB/s']:7.2f} GB/s{copy}{extra}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="op")
    ap.add_argument("--batches", type=int, nargs="*")
    ap.add_argument("--vocabs", type=int, nargs="*")
    ap.add_argument("--dtypes", nargs="*", choices=sorted(DTYPES))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cold", action="store_true", help="also measure with the caches flushed before each call")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--compile-batches", type=int, nargs="*",
                    help="batches at which torch.compile(reference_steer) is timed (default: every reference batch "
                         "of the preset that compiles it; each shape is one compile)")
    ap.add_argument("--no-sampling", action="store_true", help="skip the steer_sample rows")
    ap.add_argument("--no-projection", action="store_true", help="skip the steer_from_hidden rows")
    ap.add_argument("--out", type=Path, help="output folder (default bench/results/<machine>/)")
    ap.add_argument("--name", default=None, help="file stem of the report (default kernels_<preset>)")
    args = ap.parse_args(argv)
    p = dict(PRESETS[args.preset])
    batches = args.batches or p["batches"]
    vocabs = args.vocabs or p["vocabs"]
    dtypes = args.dtypes or p["dtypes"]
    info = machine_info(args.device)
    cmd = "python bench/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = Report(f"steer kernels ({args.preset}, git {git_rev()})", info, cmd.strip())
    for V in vocabs:
        for dtype in dtypes:
            for B in batches:
                for cold in ([False, True] if args.cold else [False]):
                    ref = not args.no_reference and B <= p["ref_max_batch"]
                    sample = not args.no_sampling and B <= p["sample_max_batch"] and not cold
                    compile_ref = p["compile_ref"] and ref and (args.compile_batches is None or B in args.compile_batches)
                    rows = bench_case(B, V, dtype, args.device, runs=args.runs, ref=ref, compile_ref=compile_ref,
                                      cold=cold, graphs=True, sample=sample)
                    report.rows.extend(rows)
                    for r in rows:
                        _print_row(r)
    if not args.no_projection:
        shapes = CUDA_PROJ if args.device == "cuda" and args.preset != "tiny" else p["proj"]
        for B, V, H in shapes:
            for dtype in (["bf16"] if args.device == "cuda" else ["fp32"]):
                rows = bench_projection(B, V, H, dtype, args.device, runs=max(5, args.runs // 2))
                report.rows.extend(rows)
                for r in rows:
                    _print_row(r)
    cols = COLUMNS + (["graph_us"] if args.device == "cuda" else [])
    out_dir = report.write(args.name or f"kernels_{args.preset}", cols, args.out, plots)
    print(f"\nwrote {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
