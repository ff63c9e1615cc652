"""Decode-step attention: ``costeer_kernels.decode_attention`` (C++) against torch's SDPA.

    python bench/bench_attention.py [--rows 1,2,3,16,24] [--keys 100,300] [--threads 2] [--runs 200] [--no-model]

Part 1, the op alone at the attention shapes of SmolLM2-135M (9 query heads on 3 KV heads, head
size 64) and Gemma 3 270M (4 on 1, 256): one query token per row against L cached keys, rows
left-padded (row r has r masked keys, as a batch of prompts of different lengths). Three
candidates, timed round-robin in one run: SDPA with ``enable_gqa`` and a [B, 1, 1, L] bool mask
(the call transformers makes), SDPA with the G query heads of a KV head packed as G query
positions (what transformers does for one query token with a mask), and the C++ kernel. The error
column is each one's largest difference from float64 SDPA of the same inputs.

Part 2, one decode step of the embedded SmolLM2 (all 30 layers, the model as ``load_model`` gives
it: ``linear_rows`` layers, cache blocks) with M left-padded rows and 64 cached positions, its
attention on transformers' SDPA and on ``costeer_sdpa`` (``costeer.fast_attention``), timed in
alternation. Writes JSON and Markdown under bench/results/<machine>/.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench.bench_cpp_cpu import interleaved  # noqa: E402
from bench.harness import Report, git_rev, machine_info  # noqa: E402
from costeer_kernels import decode_attention  # noqa: E402

SHAPES = {"smollm2 9/3 x 64": (9, 3, 64), "gemma3-270m 4/1 x 256": (4, 1, 256)}


def _inputs(B, Hq, Hkv, D, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    v = torch.randn(B, Hkv, L, D, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    for r in range(B):
        mask[r, :r] = False
    return q, k, v, mask


def op_alone(rows, keys, runs):
    out = []
    for label, (Hq, Hkv, D) in SHAPES.items():
        G = Hq // Hkv
        for L in keys:
            for B in rows:
                q, k, v, mask = _inputs(B, Hq, Hkv, D, L, seed=B * 1000 + L)
                m4 = mask[:, None, None, :]
                res = torch.empty(B, Hq, D)
                with torch.inference_mode():
                    gqa = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=m4,  # noqa: E731
                                                                 enable_gqa=True)
                    packed = lambda: F.scaled_dot_product_attention(q.view(B, Hkv, G, D), k, v,  # noqa: E731
                                                                    attn_mask=m4)
                    ours = lambda: torch.ops.costeer_ext.decode_attention(q, k, v, mask, D ** -0.5, res)  # noqa: E731
                    tg, tp, to = interleaved([gqa, packed, ours], runs, warmup=5)
                    exact = F.scaled_dot_product_attention(q[:, :, None].double(), k.double(), v.double(),
                                                           attn_mask=m4, enable_gqa=True)[:, :, 0]
                    err = lambda t: (t.double() - exact).abs().max().item()  # noqa: E731
                    row = {"case": f"{label}, {L} keys", "rows": B, "sdpa_gqa_us": tg * 1e6,
                           "sdpa_packed_us": tp * 1e6, "kernel_us": to * 1e6, "speedup": min(tg, tp) / to,
                           "sdpa_err": err(gqa()[:, :, 0]), "kernel_err": err(decode_attention(q, k, v, mask))}
                out.append(row)
                print(f"  {row['case']:32s} B={B:3d}  SDPA gqa {tg * 1e6:7.1f} us  packed {tp * 1e6:7.1f} us  "
                      f"kernel {to * 1e6:7.1f} us  x{row['speedup']:.2f}  err {row['sdpa_err']:.1e} / "
                      f"{row['kernel_err']:.1e}", flush=True)
    return out


def decode_steps(rows, runs):
    from costeer.fast_attention import use_decode_attention
    from costeer.models import load_model

    fast = load_model("smollm2").model
    if fast.config._attn_implementation != "costeer_sdpa" and not use_decode_attention(fast):
        print("  (the model does not use costeer_sdpa here: part 2 skipped)")
        return []
    # Every attention layer and the mask builder read the one config's _attn_implementation at each
    # call: switching it between rounds times both on the same weights.
    assert all(m.config is fast.config for m in fast.modules() if hasattr(m, "config"))
    from costeer.kv import _cache_kwarg

    cache_kw = _cache_kwarg(fast.forward)
    out = []
    for M in rows:
        ids = torch.randint(0, 49152, (M, 64), generator=torch.Generator().manual_seed(M))
        mask = torch.ones(M, 65, dtype=torch.long)
        for r in range(M):
            mask[r, :r] = 0
        nxt = torch.randint(0, 49152, (M, 1), generator=torch.Generator().manual_seed(M + 1))
        with torch.inference_mode():
            caches = {}

            def step(impl):
                def run():
                    fast.config._attn_implementation = impl
                    fast(nxt, attention_mask=mask, use_cache=True, **{cache_kw: caches[impl]})
                    caches[impl].crop(-1)  # drop the appended position: every round the same 64-position step
                return run

            for impl in ("sdpa", "costeer_sdpa"):
                fast.config._attn_implementation = impl
                caches[impl] = fast(ids, attention_mask=mask[:, :64], use_cache=True).past_key_values
            ts, tk = interleaved([step("sdpa"), step("costeer_sdpa")], runs, warmup=2)
            fast.config._attn_implementation = "costeer_sdpa"
        out.append({"case": "SmolLM2 decode step (64 cached, left-padded)", "rows": M, "sdpa_gqa_us": ts * 1e6,
                    "kernel_us": tk * 1e6, "speedup": ts / tk})
        print(f"  decode step M={M:3d}  SDPA {ts * 1e3:7.2f} ms  costeer_sdpa {tk * 1e3:7.2f} ms  x{ts / tk:.3f}",
              flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,3,16,24")
    ap.add_argument("--keys", default="100,300")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", type=int, default=200, help="timed rounds per op case (the model steps take runs/10)")
    ap.add_argument("--no-model", action="store_true", help="skip part 2 (the SmolLM2 decode step)")
    ap.add_argument("--out", type=Path, help="output folder (default bench/results/<machine>/)")
    args = ap.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",") if r.strip()]
        keys = [int(r) for r in args.keys.split(",") if r.strip()]
    except ValueError:
        ap.error(f"--rows and --keys: comma-separated ints expected, got {args.rows!r}, {args.keys!r}")
    if not rows or min(rows) < 1 or not keys or min(keys) < 1:
        ap.error("--rows and --keys: at least one count each, each >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from costeer_kernels._extension import build_status, load_extension

    if not load_extension():
        print(f"the C++ extension is not loaded ({build_status()['reason']}): nothing to compare")
        return 1
    info = machine_info("cpu")
    isa = torch.ops.costeer_ext.cpu_isa()
    print(f"{info['cpu']}, torch {info['torch']}, threads {torch.get_num_threads()}, kernel path {isa}, "
          f"load average {info.get('load_avg')}")
    results = op_alone(rows, keys, args.runs)
    if not args.no_model:
        results += decode_steps(rows, max(10, args.runs // 10))
    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    info["cpu_isa"] = isa
    report = Report(f"decode attention: C++ kernel vs SDPA (git {git_rev()}, kernel path {isa})", info,
                    "python bench/bench_attention.py " + " ".join(argv if argv is not None else sys.argv[1:]), results)
    out = report.write("attention", ["case", "rows", "sdpa_gqa_us", "sdpa_packed_us", "kernel_us", "speedup",
                                     "sdpa_err", "kernel_err"], args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
