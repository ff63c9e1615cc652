"""Ahead-of-time compilation of the Triton kernels for GPU targets, without a GPU.

Checks that every kernel variant builds for sm_80 and sm_90, emits 16-byte vector loads, and
does not spill registers (read from the cubin with Triton's own cuobjdump: LOCAL bytes > 0 means
spilled registers in local memory). Must run with TRITON_INTERPRET unset (``python -m
costeer_kernels.triton.aot`` prints the report; the tests run it in a subprocess).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import projection as _proj
from . import steer as _steer

_INPUT = {"llm_ptr", "ctx_ptr", "noctx_ptr", "hc_ptr", "hn_ptr", "w_ptr"}


def _signature(fn, dtype: str, ints: str = "i32"):
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name in _INPUT:
            sig[name] = f"*{dtype}"
        elif name == "hp_ptr":
            sig[name] = "*fp64"
        elif name in ("out_ptr", "part_ptr", "u_ptr"):
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*i32"
        else:
            sig[name] = ints
    return sig


def variants():
    """(name, kernel, dtype, constexprs, num_warps) of every shipped configuration."""
    out = []
    for dtype in ("fp32", "fp16", "bf16"):
        for merge, mname in ((_steer.MERGE_NONE, "none"), (_steer.MERGE_LAST, "last"), (_steer.MERGE_BARRIER, "barrier")):
            for has_noctx in (True, False):
                out.append((
                    f"closed_form/{mname}/{dtype}/{'zc,zn' if has_noctx else 'delta'}",
                    _steer.steer_closed_form_kernel, dtype,
                    {"BLOCK": 1024, "HAS_NOCTX": has_noctx, "MERGE": merge, "MAX_SPLIT": _steer.MAX_SPLIT}, 4,
                ))
        out.append((f"iterative/{dtype}", _steer.steer_iterative_kernel, dtype, {"BLOCK": 1024, "HAS_NOCTX": True}, 4))
    # Different vocabularies: the small-model rows gathered through the map (not vector loads).
    for mname, merge in (("none", _steer.MERGE_NONE), ("last", _steer.MERGE_LAST), ("barrier", _steer.MERGE_BARRIER)):
        out.append((
            f"closed_form/{mname}/bf16/vocab_map,drop", _steer.steer_closed_form_kernel, "bf16",
            {"BLOCK": 1024, "HAS_NOCTX": True, "MERGE": merge, "MAX_SPLIT": _steer.MAX_SPLIT,
             "VOCAB_MAP": True, "DROP_UNMAPPED": True}, 4,
        ))
    out.append(("iterative/bf16/vocab_map", _steer.steer_iterative_kernel, "bf16",
                {"BLOCK": 1024, "HAS_NOCTX": True, "VOCAB_MAP": True, "DROP_UNMAPPED": False}, 4))
    out += projection_variants()
    return out


def projection_variants():
    """steer_from_hidden's fused kernel, with the tiles ``projection.plan`` picks on a GPU."""
    import torch

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    out = []
    cases = [(1, "gemv"), (3, "b4"), (17, "dot16"), (64, "dot64")]
    for dtype in ("fp32", "fp16", "bf16"):
        for B, tag in cases:
            for mapped in ((False, True) if (dtype == "bf16" and B in (1, 17)) else (False,)):
                bb, bv, bh, use_dot, _, _, warps = _proj.plan(B, 151936, 1536, torch_dtype[dtype], torch.device("cpu"), 2)
                merges = ((_steer.MERGE_NONE, "none"), (_steer.MERGE_LAST, "last")) if B == 1 else ((_steer.MERGE_LAST, "last"),)
                for merge, mname in merges:
                    out.append((
                        f"projection/{tag}/{mname}/{dtype}{'/vocab_map,drop' if mapped else ''}",
                        _proj.steer_projection_kernel, dtype,
                        {"BLOCK_B": bb, "BLOCK_V": bv, "BLOCK_H": bh, "USE_DOT": use_dot, "MERGE": merge,
                         "MAX_SPLIT": _proj.PROJ_MAX_SPLIT, "NORM_BLOCK": 1024, "VOCAB_MAP": mapped,
                         "DROP_UNMAPPED": mapped, "DOT_F32": False},
                        warps,
                    ))
    return out


def _res_usage(cubin: bytes) -> dict:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"cuobjdump gave no resource usage:\n{text}")
    return dict(zip(("registers", "stack", "shared", "local"), map(int, m.groups())))


def compile_variant(kernel, dtype: str, constexprs: dict, num_warps: int, cc: int) -> dict:
    sig = _signature(kernel, dtype)
    # What the JIT specializes at run time for real vocabularies: pointers and V, strides
    # divisible by 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if sig[n] != "constexpr"}
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    usage = _res_usage(compiled.asm["cubin"])
    usage["vector_loads"] = len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.", ptx))
    usage["num_warps"] = compiled.metadata.num_warps
    return usage


def report(ccs=(80, 90)) -> list:
    rows = []
    for name, kernel, dtype, constexprs, warps in variants():
        for cc in ccs:
            rows.append({"variant": name, "sm": cc, **compile_variant(kernel, dtype, constexprs, warps, cc)})
    return rows


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET to compile for GPU targets", file=sys.stderr)
        return 2
    rows = report()
    if argv and "--json" in argv:
        print(json.dumps(rows))
    else:
        print(f"{'variant':40s} {'sm':>3s} {'regs':>5s} {'spill(local B)':>15s} {'vec loads':>9s}")
        for r in rows:
            print(f"{r['variant']:40s} {r['sm']:3d} {r['registers']:5d} {r['local']:15d} {r['vector_loads']:9d}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
