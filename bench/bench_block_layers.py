"""A model's worth of few-row products from GGML blocks, per format and ISA path, for comparing two
builds of the kernel (run this under each build's PYTHONPATH, alternating, and compare the lines).

    PYTHONPATH=. python bench/bench_block_layers.py --format q4_1 --isa avx2 --rows 1,3,8,16,24,32

Formats: "q4_1" (SmolLM2-135M's 210 layer matrices), "q5_0" (Gemma 3 270M's 90 q/k/v/gate/up
matrices), "k" (Gemma's 36 K-quant matrices: 27 Q4_K, 9 Q6_K). Weights are random (quantized by
gguf-py, or random super-blocks with finite float16 scales for the K-quants), one distinct matrix per
layer as in the model, so a pass reads them from DRAM as a decode step does (61 / 97 / 26 MB). Each
line is the 2nd-fastest of 15 passes over all matrices (ms), after 2 warm-up passes.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

if __package__ in (None, "") and importlib.util.find_spec("costeer_kernels") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # else the build on PYTHONPATH: the one compared

import torch

from costeer_kernels import linear_rows

SMOLLM2 = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
GEMMA_Q5_0 = [(1024, 640), (256, 640), (256, 640), (2048, 640), (2048, 640)] * 18
GEMMA_K = [("q4_k", (640, 1024))] * 18 + [("q4_k", (640, 2048))] * 9 + [("q6_k", (640, 2048))] * 9


def random_k_quant(kind: str, N: int, K: int, g: torch.Generator) -> torch.Tensor:
    nbytes = 144 if kind == "q4_k" else 210
    raw = torch.randint(0, 256, (N, K // 256, nbytes), generator=g, dtype=torch.uint8)
    where = slice(0, 4) if kind == "q4_k" else slice(208, 210)  # float16 d (and dmin)
    scales = (torch.randn(N, K // 256, (where.stop - where.start) // 2, generator=g) * 0.02).half()
    raw[..., where] = scales.view(torch.uint8).reshape(N, K // 256, -1)
    return raw.reshape(N, -1)


def layers(fmt: str):
    g = torch.Generator().manual_seed(0)
    if fmt == "k":
        return [(K, random_k_quant(kind, N, K, g)) for kind, (N, K) in GEMMA_K]
    from costeer_kernels.q4_1 import quantize_q4_1
    from costeer_kernels.q5_0 import quantize_q5_0

    quantize, shapes = (quantize_q4_1, SMOLLM2) if fmt == "q4_1" else (quantize_q5_0, GEMMA_Q5_0)
    return [(K, quantize(torch.randn(N, K, generator=g))) for N, K in shapes]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", choices=("q4_1", "q5_0", "k"), default="q4_1")
    ap.add_argument("--isa", default=None, help="one of torch.ops.costeer_ext.cpu_isas() (default: the active path)")
    ap.add_argument("--rows", default="1,2,3,8,16,24,32")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",") if r.strip()]
    torch.set_num_threads(args.threads)
    from costeer_kernels._extension import load_extension

    if not load_extension():
        print("the C++ extension is not available: nothing to measure")
        return 1
    if args.isa:
        torch.ops.costeer_ext.cpu_isa(args.isa)
    ws = layers(args.format)
    out = []
    for M in rows:
        xs = {K: torch.randn(M, K) for K in {K for K, _ in ws}}
        for _ in range(2):
            for K, w in ws:
                linear_rows(xs[K], w)
        times = []
        for _ in range(15):
            t = time.perf_counter()
            for K, w in ws:
                linear_rows(xs[K], w)
            times.append(time.perf_counter() - t)
        out.append(f"M={M}: {sorted(times)[1] * 1e3:.2f}")
    print(f"{os.environ.get('PYTHONPATH', '.')} {args.format} {torch.ops.costeer_ext.cpu_isa()} ms:", "  ".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
