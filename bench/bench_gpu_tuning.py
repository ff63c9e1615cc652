"""Launch-shape sweep of the GPU steer kernels (how the defaults were chosen): CUDA-graph time per
call and the error against the torch closed form, for each split plan, block and warp count.

    python bench/bench_gpu_tuning.py        # needs a CUDA GPU; writes bench/results/<gpu>/tuning.{json,md}

Triton: programs per SM (the split S = per_sm * SMs / B, capped by the co-resident count the
launcher computed from the compiled kernel), BLOCK and num_warps; the merge is the default
(barrier when S > 1). CUDA C++: its own plan (barrier) against COSTEER_CUDA_MERGE=last.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import costeer_kernels as ck
from bench.harness import copy_timing, machine_info, machine_slug, time_cuda_graph, RESULTS_DIR


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from costeer_kernels import SteerConfig
    from costeer_kernels.triton import steer as ts

    info = machine_info("cuda")
    n_sm = info["sms"]
    hp = SteerConfig().packed(None, "cuda")
    rows = []
    V = 151936
    for dtype, batches in ((torch.bfloat16, (1, 8, 64, 256)), (torch.float32, (1, 64))):
        for B in batches:
            g = torch.Generator(device="cpu").manual_seed(B)
            zl, zc, zn = (torch.randn(B, V, generator=g).mul_(3).to("cuda", dtype) for _ in range(3))
            ref = ck.steer(zl, zc, zn, backend="torch")
            out = torch.empty(B, V, device="cuda")
            nbytes = B * V * (3 * zl.element_size() + 4)
            copy_us = copy_timing(nbytes, "cuda").median_us

            def record(kernel, config, fn):
                try:
                    fn()
                    err = (out - ref).abs().nan_to_num(0.0).max().item()
                    us = time_cuda_graph(fn).median_us
                except Exception as exc:  # noqa: BLE001 - report, keep sweeping
                    print(f"  {kernel} {config}: {type(exc).__name__}: {exc}"[:200])
                    return
                r = {"kernel": kernel, "config": config, "B": B, "V": V, "dtype": str(dtype).split(".")[-1],
                     "graph_us": us, "copy %": 100.0 * copy_us / us, "max_err": err}
                rows.append(r)
                print(f"{kernel:7s} {config:34s} B={B:<4d} {r['dtype']:9s} {us:9.1f} us  {r['copy %']:6.1f}% copy  "
                      f"err {err:.1e}", flush=True)

            for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8)):
                ts.steer_triton(zl, zc, zn, hp, out, block=block, num_warps=warps)  # learns residency
                key = (zl.device, zl.dtype, zc.dtype, zn.dtype, True, False, block, warps)
                resident = ts._RESIDENT.get(key, 1)
                for per_sm in (1, 2, 4, 8):
                    if per_sm > resident:
                        continue
                    S = max(1, min(per_sm * n_sm // B, ts.MAX_SPLIT, -(-V // block)))
                    record("triton", f"BLOCK={block} warps={warps} S={S} ({per_sm}/SM)",
                           lambda S=S, block=block, warps=warps: ts.steer_triton(zl, zc, zn, hp, out, num_splits=S,
                                                                                  block=block, num_warps=warps))
            if "cuda" in ck.available_backends():
                for merge in ("auto", "last"):
                    if merge == "last":
                        os.environ["COSTEER_CUDA_MERGE"] = "last"
                    record("cuda", f"plan merge={merge}", lambda: ck.steer(zl, zc, zn, backend="cuda", out=out,
                                                                            validate=False))
                    os.environ.pop("COSTEER_CUDA_MERGE", None)
    out_dir = RESULTS_DIR / machine_slug(info)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tuning.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    lines = [f"## GPU launch-shape sweep ({info.get('gpu')}, {n_sm} SMs, torch {info['torch']}, triton "
             f"{info.get('triton')})", "", "Command: `python bench/bench_gpu_tuning.py` (CUDA-graph replay, V=151936)", "",
             "| kernel | config | B | dtype | graph us | copy % | max err |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['config']} | {r['B']} | {r['dtype']} | {r['graph_us']:.1f} | {r['copy %']:.0f} | "
              f"{r['max_err']:.1e} |" for r in rows]
    (out_dir / "tuning.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out_dir / 'tuning.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
