"""Few-row products: ``costeer_kernels.linear_rows`` against ``F.linear`` (BLAS) at decode shapes.

    python bench/bench_linear.py [--rows 1,2,3,4,8,16,24,32] [--threads 2] [--runs 15] [--no-model]
        [--parts matrices,q8_0,q4_1,k_quants,decode,gemma_k]

Part 1, the matrices of SmolLM2-135M and Gemma 3 270M (random float32 weights): each timed call
multiplies the M rows by a set of distinct matrices totalling >= 200 MB (a model's worth), so the
weights come from DRAM as in a decode step and not from cache. Both candidates run round-robin in
the same run; the table gives us per matrix, the weight bytes read per second and the speed-up.

Part 2, one decode step of the embedded SmolLM2 (KV cache of 64 positions) with M rows, with the
model's ``nn.Linear`` layers on BLAS (``COSTEER_LINEAR_ROWS=0`` behaviour) and on the kernel
(``costeer.fast_linear``, what ``load_model`` does on CPU): M = 1 is the LLM alone, 3 the
co-batched CoSteer step, 24 a batch of 8; and the kernel with the head read as its GGUF Q8_0 blocks,
then with the layers read as their GGUF Q4_1 blocks too (what the model cache attaches: the same
logits bit for bit). Part 3, the SmolLM2 head alone as float32 and as Q8_0 blocks, both on the
kernel, each from a set of distinct copies >= 600 MB (DRAM, as in a step). Part 4, SmolLM2's layer
matrices as float32 and as Q4_1 blocks on the kernel, each from a set >= 200 MB of float32 (DRAM).
Part 5 (``k_quants``), Gemma 3 270M's Q4_K / Q6_K matrix shapes the same way (random blocks).
Part 6 (``gemma_k``), one decode step of Gemma 3 270M as ``load_model`` gives it (every layer on its
GGUF blocks) against the same model with its 27 Q4_K and 9 Q6_K layers read as float32.
``--parts`` picks parts. Writes JSON and Markdown under bench/results/<machine>/.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench.bench_cpp_cpu import interleaved  # noqa: E402
from bench.harness import Report, git_rev, machine_info  # noqa: E402
from costeer_kernels import linear_rows  # noqa: E402

SHAPES = {  # (N, K) of nn.Linear.weight
    "smollm2 q/o 576x576": (576, 576),
    "smollm2 k/v 192x576": (192, 576),
    "smollm2 gate/up 1536x576": (1536, 576),
    "smollm2 down 576x1536": (576, 1536),
    "smollm2 head 49152x576": (49152, 576),
    "gemma3-270m q 1024x640": (1024, 640),
    "gemma3-270m gate/up 2048x640": (2048, 640),
    "gemma3-270m down 640x2048": (640, 2048),
}


def matrices(rows, runs):
    out = []
    for label, (N, K) in SHAPES.items():
        count = max(1, min(64, (200 << 20) // (N * K * 4)))
        ws = [torch.randn(N, K) for _ in range(count)]
        nbytes = N * K * 4 * count
        for M in rows:
            x = torch.randn(M, K)
            blas = lambda: [F.linear(x, w) for w in ws]  # noqa: E731
            ours = lambda: [linear_rows(x, w) for w in ws]  # noqa: E731
            tb, to = interleaved([blas, ours], runs, warmup=1)
            out.append({"matrix": label, "rows": M, "blas_us": tb / count * 1e6, "kernel_us": to / count * 1e6,
                        "blas_GBps": nbytes / tb / 1e9, "kernel_GBps": nbytes / to / 1e9, "speedup": tb / to})
            print(f"  {label:30s} M={M:3d}  F.linear {out[-1]['blas_us']:9.1f} us ({out[-1]['blas_GBps']:5.1f} GB/s)"
                  f"  linear_rows {out[-1]['kernel_us']:9.1f} us ({out[-1]['kernel_GBps']:5.1f} GB/s)"
                  f"  x{out[-1]['speedup']:.2f}", flush=True)
        del ws
    return out


def decode_steps(rows, runs):
    from costeer.fast_linear import use_linear_rows
    from costeer.models import load_model

    base = load_model("smollm2").model
    blas = copy.deepcopy(base)  # load_model routed base's layers; a deep copy keeps that, so undo it
    for mod in blas.modules():
        mod.__dict__.pop("forward", None)
    fast = copy.deepcopy(blas)
    use_linear_rows(fast)
    from costeer.fast_linear import attach_blocks, attach_q8_0, attached_blocks, q8_0_weight

    blocks = q8_0_weight(base.get_output_embeddings())
    fast8 = fast4 = None
    if blocks is not None:
        fast8 = copy.deepcopy(fast)
        use_linear_rows(fast8)
        attach_q8_0(fast8.get_output_embeddings(), blocks)
    layer_blocks = {n: attached_blocks(m) for n, m in base.named_modules() if n != "lm_head"}
    layer_blocks = {n: b[0] for n, b in layer_blocks.items() if b is not None and b[1] == "q4_1"}
    if fast8 is not None and layer_blocks:
        fast4 = copy.deepcopy(fast8)
        use_linear_rows(fast4)
        attach_q8_0(fast4.get_output_embeddings(), blocks)
        for n, m in fast4.named_modules():
            if n in layer_blocks:
                attach_blocks(m, layer_blocks[n])
    out = []
    for M in rows:
        ids = torch.randint(0, 49152, (M, 64), generator=torch.Generator().manual_seed(M))
        nxt = torch.randint(0, 49152, (M, 1), generator=torch.Generator().manual_seed(M + 1))
        with torch.inference_mode():
            caches = {}
            models = [("blas", blas), ("kernel", fast)] + ([("q8", fast8)] if fast8 is not None else []) \
                + ([("q4", fast4)] if fast4 is not None else [])
            for name, model in models:
                caches[name] = model(ids, use_cache=True).past_key_values

            def step(model, name):
                def run():
                    model(nxt, past_key_values=caches[name], use_cache=True)
                    caches[name].crop(-1)  # drop the appended position: every round the same 64-position step
                return run

            times = interleaved([step(m, name) for name, m in models], runs, warmup=1)
        tb, to = times[0], times[1]
        out.append({"matrix": "SmolLM2 decode step (64 cached)", "rows": M, "blas_us": tb * 1e6,
                    "kernel_us": to * 1e6, "speedup": tb / to})
        line = f"  decode step M={M:3d}  BLAS {tb * 1e3:7.1f} ms  linear_rows {to * 1e3:7.1f} ms  x{tb / to:.2f}"
        if fast8 is not None:
            out.append({"matrix": "SmolLM2 decode step, Q8_0 head", "rows": M, "blas_us": tb * 1e6,
                        "kernel_us": times[2] * 1e6, "speedup": tb / times[2]})
            line += f"  with the Q8_0 head {times[2] * 1e3:7.1f} ms  x{tb / times[2]:.2f}"
        if fast4 is not None:
            out.append({"matrix": "SmolLM2 decode step, Q8_0 head + Q4_1 layers", "rows": M, "blas_us": tb * 1e6,
                        "kernel_us": times[3] * 1e6, "speedup": tb / times[3]})
            line += f"  and the Q4_1 layers {times[3] * 1e3:7.1f} ms  x{tb / times[3]:.2f}"
        print(line, flush=True)
    return out


def q8_0_head(rows, runs):
    """The SmolLM2 head (49152 x 576) on the kernel as float32 and as Q8_0 blocks (random weights
    quantized; "blas" columns: the float32 head on the kernel), each from DRAM."""
    from costeer_kernels.q8_0 import quantize_q8_0

    N, K = 49152, 576
    w = torch.randn(N, K)
    dense = [w.clone() for _ in range(6)]  # 680 MB
    q8 = quantize_q8_0(w)
    blocks = [q8.clone() for _ in range(20)]  # 600 MB
    return _float32_vs_blocks("smollm2 head", "Q8_0", 34 / 32, dense, blocks, rows, runs)


def _float32_vs_blocks(label, fmt, bytes_per_weight, dense, blocks, rows, runs):
    """Rows of the table: each set of matrices on the kernel as float32 (the "blas" columns) and as
    blocks, interleaved, per M, from DRAM (both sets are distinct matrices)."""
    N, K = dense[0].shape
    out = []
    for M in rows:
        x = torch.randn(M, K)
        f32 = lambda: [linear_rows(x, t) for t in dense]  # noqa: E731
        q = lambda: [linear_rows(x, t) for t in blocks]  # noqa: E731
        tf, tq = interleaved([f32, q], runs, warmup=1)
        tf, tq = tf / len(dense), tq / len(blocks)
        out.append({"matrix": f"{label} float32 vs {fmt} (kernel)", "rows": M, "blas_us": tf * 1e6,
                    "kernel_us": tq * 1e6, "blas_GBps": N * K * 4 / tf / 1e9,
                    "kernel_GBps": N * K * bytes_per_weight / tq / 1e9, "speedup": tf / tq})
        print(f"  {label:30s} M={M:3d}  float32 {tf * 1e6:8.1f} us  {fmt} {tq * 1e6:8.1f} us  x{tf / tq:.2f}", flush=True)
    return out


def q4_1_layers(rows, runs):
    """SmolLM2's layer matrices on the kernel as float32 and as Q4_1 blocks (random weights
    quantized; "blas" columns: float32 on the kernel), each from a set of distinct matrices >= 200 MB
    of float32 (and its Q4_1 copies: 6.4x fewer bytes), so both come from DRAM."""
    from costeer_kernels.q4_1 import dequantize_q4_1, quantize_q4_1

    out = []
    for label, (N, K) in SHAPES.items():
        if not label.startswith("smollm2") or "head" in label:
            continue
        count = max(1, min(64, (200 << 20) // (N * K * 4)))
        q4 = [quantize_q4_1(torch.randn(N, K)) for _ in range(count)]
        dense = [dequantize_q4_1(b) for b in q4]
        out += _float32_vs_blocks(label, "Q4_1", 20 / 32, dense, q4, rows, runs)
        del q4, dense
    return out


def k_quant_layers(rows, runs):
    """Gemma 3 270M's Q4_K / Q6_K matrix shapes on the kernel as float32 and as their blocks (random
    super-blocks: every byte random but finite float16 scales; "blas" columns: float32 on the
    kernel), each from a set of distinct matrices >= 100 MB of float32 (DRAM)."""
    from bench.bench_block_layers import random_k_quant
    from costeer_kernels.blocks import dequantize_blocks

    g = torch.Generator().manual_seed(0)
    out = []
    for label, fmt, nbytes, (N, K) in (("gemma3-270m o_proj 640x1024", "Q4_K", 144, (640, 1024)),
                                       ("gemma3-270m down 640x2048", "Q4_K", 144, (640, 2048)),
                                       ("gemma3-270m down 640x2048", "Q6_K", 210, (640, 2048))):
        count = max(1, min(64, (100 << 20) // (N * K * 4)))
        blocks = [random_k_quant(fmt.lower(), N, K, g) for _ in range(count)]
        dense = [dequantize_blocks(b, K) for b in blocks]
        out += _float32_vs_blocks(label, fmt, nbytes / 256, dense, blocks, rows, runs)
        del blocks, dense
    return out


def gemma_k_quant_step(rows, runs):
    """One decode step of Gemma 3 270M (KV cache of 64 positions) as ``load_model`` gives it (every
    layer on its GGUF blocks, the 27 Q4_K and 9 Q6_K ones included) against the same model with
    only its Q4_K / Q6_K layers read as float32 (what the model cache did before it kept their
    blocks), interleaved: one model, those layers' blocks detached before each float32 call and
    attached again before each blocks call. Both steps start from copies of one prefilled cache, so
    their logits must be the same bit for bit (checked and reported)."""
    from costeer.fast_linear import attach_blocks, attached_blocks, detach_blocks
    from costeer.models import load_model

    try:
        model = load_model("gemma3-270m").model
    except Exception as exc:  # noqa: BLE001 - not installed: say so, skip the part
        print(f"  gemma3-270m unavailable ({exc}): part skipped")
        return []
    k_layers = {}
    for _, m in model.named_modules():
        got = attached_blocks(m)
        if got is not None and got[1] in ("q4_k", "q6_k"):
            k_layers[m] = got[0]
    if not k_layers:
        print("  gemma3-270m has no Q4_K / Q6_K layer blocks attached (an old cache entry?): part skipped")
        return []

    def as_float32():
        for m in k_layers:
            detach_blocks(m)

    def as_blocks():
        for m, b in k_layers.items():
            attach_blocks(m, b)

    vocab = model.config.vocab_size
    out = []
    for M in rows:
        ids = torch.randint(0, vocab, (M, 64), generator=torch.Generator().manual_seed(M))
        nxt = torch.randint(0, vocab, (M, 1), generator=torch.Generator().manual_seed(M + 1))
        with torch.inference_mode():
            prefilled = model(ids, use_cache=True).past_key_values
            caches = [copy.deepcopy(prefilled), copy.deepcopy(prefilled)]
            logits = []
            for cache, mode in zip(caches, (as_float32, as_blocks)):
                mode()
                logits.append(model(nxt, past_key_values=cache, use_cache=True).logits)
                cache.crop(-1)
            same = torch.equal(logits[0], logits[1])

            def step(cache, mode):
                def run():
                    mode()
                    model(nxt, past_key_values=cache, use_cache=True)
                    cache.crop(-1)  # drop the appended position: every round the same 64-position step
                return run

            tf, tb = interleaved([step(caches[0], as_float32), step(caches[1], as_blocks)], runs, warmup=1)
        as_blocks()
        out.append({"matrix": f"Gemma 3 270M decode step, its {len(k_layers)} Q4_K/Q6_K layers float32 vs blocks",
                    "rows": M, "blas_us": tf * 1e6, "kernel_us": tb * 1e6, "speedup": tf / tb, "same_logits": same})
        print(f"  Gemma decode step M={M:3d}  Q4_K/Q6_K layers float32 {tf * 1e3:7.2f} ms  as blocks {tb * 1e3:7.2f} ms"
              f"  x{tf / tb:.2f}  logits identical: {same}", flush=True)
    return out


PARTS = ("matrices", "q8_0", "q4_1", "k_quants", "decode", "gemma_k")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,3,4,8,16,24,32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--no-model", action="store_true", help="skip part 2 (the SmolLM2 decode step)")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all)")
    ap.add_argument("--out", type=Path, help="output folder (default bench/results/<machine>/)")
    ap.add_argument("--name", default="linear", help="file stem of the report (default: linear)")
    args = ap.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",") if r.strip()]
    except ValueError:
        ap.error(f"--rows: comma-separated ints expected, got {args.rows!r}")
    if not rows or min(rows) < 1:
        ap.error("--rows: at least one row count, each >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info("cpu")
    from costeer_kernels._extension import load_extension

    isa = torch.ops.costeer_ext.cpu_isa() if load_extension() else "- (C++ extension unavailable)"
    print(f"{info['cpu']}, torch {info['torch']}, threads {torch.get_num_threads()}, kernel path {isa}, "
          f"load average {info.get('load_avg')}")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - set(PARTS):
        ap.error(f"--parts: comma-separated names of {','.join(PARTS)}, got {args.parts!r}")
    few = [r for r in rows if r <= 8] or rows[:1]
    results = matrices(rows, args.runs) if "matrices" in parts else []
    if "q8_0" in parts:
        results += q8_0_head(few, args.runs)
    if "q4_1" in parts:
        results += q4_1_layers(few, args.runs)
    if "k_quants" in parts:
        results += k_quant_layers(few, args.runs)
    if "decode" in parts and not args.no_model:
        results += decode_steps([r for r in rows if r in (1, 2, 3, 8, 24)] or rows[:1], args.runs)
    if "gemma_k" in parts:
        results += gemma_k_quant_step([r for r in rows if r in (1, 2, 3, 8)] or rows[:1], args.runs)
    info["load_avg_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    info["cpu_isa"] = isa
    report = Report(f"few-row products: linear_rows vs F.linear (git {git_rev()}, kernel path {isa})", info,
                    "python bench/bench_linear.py " + " ".join(argv if argv is not None else sys.argv[1:]), results)
    out = report.write(args.name, ["matrix", "rows", "blas_us", "kernel_us", "blas_GBps", "kernel_GBps", "speedup"],
                       args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
