"""The issues' GPU targets, checked against a kernel report (JSON written by bench_kernels.py).

    python bench/gpu_targets.py bench/results/<gpu>/kernels_op.json    # prints a Markdown table

Targets (from the op, C++, projection and sampling issues), V=151936:
- steer, B=64, bf16: >= 85% of the same-run copy bandwidth; CUDA C++ within 10% of Triton.
- steer, B=1: <= 8 us per call replayed in a CUDA graph; >= 100x faster than reference_steer.
- steer_sample greedy, B=1: <= 10 us replayed in a CUDA graph.
- steer_from_hidden, B=1, H=1536, bf16: <= 1.1x the cuBLAS GEMV over the same W.
Also reported: the split row's barrier merge against the last-program merge.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

V = 151936


def _find(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def _us(v) -> str:
    return f"{v:.1f} us" if isinstance(v, (int, float)) else "-"


def targets(report: dict) -> list:
    rows = [r for r in report["rows"] if r.get("cache") == "warm"]
    out = []

    def add(what, measured, ok):
        out.append((what, measured, "not measured" if ok is None else ("met" if ok else "NOT met")))

    for be in ("triton", "cuda"):
        r = _find(rows, op="steer", backend=be, B=64, V=V, dtype="bf16")
        if r:
            # Kernel bandwidth from the CUDA-graph time where there is one (the event-timed median
            # includes the Python call); the copy is event-timed too, but launch-bound it is not.
            t = r[0].get("graph_us") or r[0]["median_us"]
            share = r[0]["copy %"] * r[0]["median_us"] / t
            gbs = r[0]["GB/s"] * r[0]["median_us"] / t
            add(f"steer {be}, B=64 bf16: >= 85% of copy bandwidth", f"{share:.0f}% ({gbs:.0f} GB/s, {_us(t)} per call "
                f"{'in a graph' if r[0].get('graph_us') else 'event-timed'})", share >= 85)
        else:
            add(f"steer {be}, B=64 bf16: >= 85% of copy bandwidth", "-", None)
    t = _find(rows, op="steer", backend="triton", B=64, V=V, dtype="bf16")
    c = _find(rows, op="steer", backend="cuda", B=64, V=V, dtype="bf16")
    tc = (c[0].get("graph_us") or c[0]["median_us"]) if c else None
    tt = (t[0].get("graph_us") or t[0]["median_us"]) if t else None
    add("steer CUDA C++ within 10% of Triton (B=64 bf16, graph time)",
        f"{tc / tt:.2f}x Triton's time ({_us(tc)} vs {_us(tt)})" if t and c else "-",
        tc <= 1.1 * tt if t and c else None)
    for dtype in ("fp32", "bf16"):
        for be in ("triton", "cuda"):
            r = _find(rows, op="steer", backend=be, B=1, V=V, dtype=dtype)
            g = r[0].get("graph_us") if r else None
            add(f"steer {be}, B=1 {dtype}: <= 8 us in a CUDA graph", _us(g),
                g <= 8 if isinstance(g, (int, float)) else None)
        ref = _find(rows, op="steer", backend="reference (eager, T=20)", B=1, V=V, dtype=dtype)
        best = [r for r in _find(rows, op="steer", B=1, V=V, dtype=dtype) if r["backend"] in ("triton", "cuda")]
        if ref and best:
            b = min(best, key=lambda r: r["median_us"])
            sp = ref[0]["median_us"] / b["median_us"]
            add(f"steer, B=1 {dtype}: >= 100x reference_steer", f"{sp:.0f}x ({b['backend']})", sp >= 100)
        else:
            add(f"steer, B=1 {dtype}: >= 100x reference_steer", "-", None)
    for dtype in ("fp32", "bf16"):
        r = _find(rows, op="steer_sample greedy", backend="triton", B=1, V=V, dtype=dtype)
        g = r[0].get("graph_us") if r else None
        add(f"steer_sample greedy (triton), B=1 {dtype}: <= 10 us in a CUDA graph", _us(g),
            g <= 10 if isinstance(g, (int, float)) else None)
    floor = _find(rows, op="GEMV/GEMM W h (floor) (H=1536)", B=1, V=V, dtype="bf16")
    fused = _find(rows, op="steer_from_hidden (H=1536)", B=1, V=V, dtype="bf16")
    if floor and fused:
        ratio = fused[0]["median_us"] / floor[0]["median_us"]
        add("steer_from_hidden, B=1 H=1536 bf16: <= 1.1x cuBLAS GEMV",
            f"{ratio:.2f}x ({_us(fused[0]['median_us'])} vs {_us(floor[0]['median_us'])})", ratio <= 1.1)
    else:
        add("steer_from_hidden, B=1 H=1536 bf16: <= 1.1x cuBLAS GEMV", "-", None)
    for r in rows:
        if r["op"] == "steer" and str(r["backend"]).startswith("triton merge=barrier"):
            last = _find(rows, op="steer", backend=r["backend"].replace("barrier", "last"), B=r["B"], V=r["V"],
                         dtype=r["dtype"])
            if last:
                out.append((f"{r['backend']} vs merge=last, B={r['B']} {r['dtype']}",
                            f"{_us(r['median_us'])} vs {_us(last[0]['median_us'])} "
                            f"(graph {_us(r.get('graph_us'))} vs {_us(last[0].get('graph_us'))})", "measured"))
    return out


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"### GPU targets ({m.get('gpu', m.get('device'))}, torch {m['torch']}, triton {m.get('triton', '-')})", "",
             "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in targets(report)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(markdown(json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
