"""The C++ backends (csrc/): build, CPU kernel against the float64 reference, status bits, the
row-split path, and the CUDA kernel's compile (nvcc, sm_80 + sm_90, no register spills)."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import costeer_kernels as ck
from costeer_kernels import SteerConfig, steer
from costeer_kernels import status as st
from costeer_kernels._extension import build_status
from costeer_kernels.torch_backend import steer_torch

from ..conftest import HAS_CUDA
from .helpers import check_accuracy, make_logits

CSRC = Path(__file__).resolve().parents[2] / "csrc"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def ext():
    s = build_status()
    assert s["loaded"], f"C++ extension unavailable: {s['reason']}"
    return s


def cpp(zl, zc, zn, hp, out=None, mode="closed_form", splits=0):
    """torch.ops.costeer_ext.steer directly: (out, status)."""
    out = torch.empty(zl.shape, dtype=torch.float32, device=zl.device) if out is None else out
    status = torch.ops.costeer_ext.steer(zl, zc, zn, hp, out, mode, splits)
    return out, status


def test_extension_loads_and_registers(ext):
    assert ext["source"].startswith(("prebuilt", "jit"))
    assert "cpu" in ck.available_backends()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("costeer_ext::steer", "CPU")
    z = torch.zeros(1, 3)
    assert steer(z, z, z).shape == (1, 3)  # backend=None on CPU picks "cpu"


@pytest.fixture(params=["avx512", "portable"])
def isa(ext, request):
    """Runs a test with the CPU kernel's AVX-512 path (where the CPU has it) and without."""
    if request.param == "avx512" and not torch.ops.costeer_ext.cpu_avx512(-1):
        pytest.skip("no AVX-512 path on this CPU/build")
    before = torch.ops.costeer_ext.cpu_avx512(1 if request.param == "avx512" else 0)
    yield request.param
    torch.ops.costeer_ext.cpu_avx512(before)


@pytest.mark.parametrize("mode", ["closed_form", "iterative"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3, 2047), (2, 2049), (5, 4099), (1, 33333)], ids=str)
def test_cpu_matches_reference(ext, shape, dtype, mode):
    zl, zc, zn = make_logits(*shape, dtype=dtype, seed=shape[1])
    cfg = SteerConfig(T=7) if mode == "iterative" else None
    check_accuracy(steer(zl, zc, zn, cfg, backend="cpu", mode=mode), zl, zc, zn, cfg, mode)


@pytest.mark.parametrize("scale", [1.0, 3.0, 30.0])
@pytest.mark.parametrize("shape", [(3, 5000), (1, 152064)], ids=str)
def test_cpu_paths_match_reference(isa, shape, scale):
    """Closed form through both first-sweep paths (compacted AVX-512 and portable), with masks."""
    zl, zc, zn = make_logits(*shape, scale=scale, mask_frac=0.05, seed=int(scale))
    zl[0, -1] = 60.0 * scale  # a late, much larger max: the running offset moves by > 64
    check_accuracy(steer(zl, zc, zn, backend="cpu"), zl, zc, zn)


@pytest.mark.parametrize("shape,dtype,mode", [
    ((1, 152064), torch.float32, "closed_form"),
    ((2, 151936), torch.bfloat16, "closed_form"),
    ((1, 152064), torch.float16, "iterative"),
], ids=str)
def test_cpu_full_vocabulary(ext, shape, dtype, mode):
    zl, zc, zn = make_logits(*shape, dtype=dtype, mask_frac=0.01, seed=3)
    cfg = SteerConfig(T=4) if mode == "iterative" else None
    check_accuracy(steer(zl, zc, zn, cfg, backend="cpu", mode=mode), zl, zc, zn, cfg, mode)


@pytest.mark.parametrize("mode", ["closed_form", "iterative"])
def test_per_row_hparams_masks_and_strides(ext, mode):
    B, V = 5, 3001
    zl, zc, zn = make_logits(B, V, dtype=torch.float32, mask_frac=0.2, row_stride=V + 13, seed=5)
    zc[1, 10:20] = float("-inf")  # small-model ban (c_T > 0 drives these to -inf)
    zn[1, 10:20] = 0.5
    cfg = SteerConfig(
        T=torch.tensor([0, 1, 3, 9, 20]),
        alpha=torch.tensor([2.0, 0.0, 1.5, 3.0, 2.0]),
        beta=torch.tensor([1.0, 1.0, 0.0, 0.5, 2.0]),
        lam=2.0,
        eta=torch.tensor([10.0, 0.5, 3.0, 1.0, 7.0]),
    )
    buf = torch.full((B, V + 5), 7.0)
    out = steer(zl, zc, zn, cfg, backend="cpu", mode=mode, out=buf[:, :V])
    assert torch.all(buf[:, V:] == 7.0)
    check_accuracy(out, zl, zc, zn, cfg, mode)
    assert torch.isneginf(out[1, 10:20]).all()
    assert torch.equal(torch.isneginf(out), torch.isneginf(zl) | (torch.isneginf(zc) & ~torch.isneginf(zn)))


@pytest.mark.parametrize("mode", ["closed_form", "iterative"])
def test_mixed_dtypes_and_given_delta(ext, mode):
    zl, zc, zn = make_logits(3, 1537, seed=9)
    hp = SteerConfig(T=5).packed(None, "cpu")
    ref, _ = cpp(zl, zc, zn, hp, mode=mode)
    mixed, s = cpp(zl.bfloat16(), zc.half(), zn, hp, mode=mode)
    ref_mixed, _ = cpp(zl.bfloat16().float(), zc.half().float(), zn, hp, mode=mode)
    torch.testing.assert_close(mixed, ref_mixed, rtol=0, atol=0)
    assert not s.any()
    if mode == "closed_form":
        delta, _ = cpp(zl, zc - zn, None, hp)
        torch.testing.assert_close(delta, ref, rtol=0, atol=2e-5)


def _corrupt_rows():
    """Rows that each exercise one status path; (zl, zc, zn, hp) with B rows."""
    V = 3000
    zl, zc, zn = make_logits(10, V, seed=11)
    nan, inf = float("nan"), float("inf")
    zl[0, 5] = nan
    zc[1, 2999] = nan
    zn[2, 0] = nan
    zl[3, 100] = inf
    zc[4, 2048] = inf
    zn[5, 7] = inf
    zl[6] = -inf  # no live token: EMPTY_ROW
    zn[7, 50] = -inf  # noctx -inf alone: +inf steered logit
    zl[8, 1:] = -inf  # only token 0 live, and the small model bans it
    zc[8, 0] = -inf
    hp = SteerConfig().packed(None, "cpu").expand(10, 5).clone()
    hp[9, 3] = -1.0  # lam <= 0
    return zl, zc, zn, hp


@pytest.mark.parametrize("mode", ["closed_form", "iterative"])
@pytest.mark.parametrize("splits", [0, 1, 3])
def test_status_bits_match_torch_backend(isa, mode, splits):
    zl, zc, zn, hp = _corrupt_rows()
    if splits != 0 and mode == "iterative":
        pytest.skip("the iterative form has no row split")
    out, status = cpp(zl, zc, zn, hp, mode=mode, splits=splits)
    ref_out = torch.empty_like(out)
    ref_status = steer_torch(zl, zc, zn, hp, ref_out, mode)
    expected = [st.NAN_LLM, st.NAN_CTX, st.NAN_NOCTX, st.POSINF_LLM, st.POSINF_CTX, st.POSINF_NOCTX,
                st.EMPTY_ROW, st.NOCTX_MASK, st.EMPTY_ROW, st.BAD_HPARAMS]
    assert status.tolist() == expected
    assert torch.equal(status, ref_status)
    assert torch.isnan(out).all(), "invalid rows must be written all-NaN"
    with pytest.raises(ValueError, match="row 0"):
        steer(zl, zc, zn, backend="cpu", mode=mode)


def test_status_mixed_with_valid_rows(ext):
    zl, zc, zn = make_logits(4, 5000, seed=2)
    zc[2, 4321] = float("nan")
    out, status = cpp(zl, zc, zn, SteerConfig().packed(None, "cpu"), splits=2)
    assert status.tolist() == [0, 0, st.NAN_CTX, 0]
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3]]).all()


def test_overflow_is_reported(ext):
    zl, zc, zn = make_logits(1, 100, seed=1)
    zc[0, 3] = 3e38
    zn[0, 3] = -3e38
    _, status = cpp(zl, zc, zn, SteerConfig().packed(None, "cpu"))
    assert status.tolist() == [st.NOCTX_MASK]


def test_coefficient_below_float32_still_steers_infinities(ext):
    """c_T = 8.6e-90 rounds to 0 in float32, but a lone noctx -inf must still be reported and a
    small-model ban must still ban; finite deltas change nothing."""
    cfg = SteerConfig(T=1, alpha=0.0, beta=1.7e-89, lam=1.0, eta=1.0)
    zl, zc, zn = make_logits(2, 50, seed=8)
    zn[0, 3] = float("-inf")
    zc[1, 4] = float("-inf")
    out, status = cpp(zl, zc, zn, cfg.packed(None, "cpu"))
    assert status.tolist() == [st.NOCTX_MASK, 0]
    assert torch.isneginf(out[1, 4]) and torch.isfinite(out[1, [3, 5]]).all()
    torch.testing.assert_close(out[1, 5:], torch.log_softmax(torch.cat([zl[1, :4], zl[1, 5:]]), 0)[4:])


@pytest.mark.parametrize("V", [1, 2048, 4097, 151936])
def test_split_rows_equal_whole_rows(isa, V):
    """B=1 split across tasks (num_splits > 1) against the same row processed whole in a batch."""
    zl, zc, zn = make_logits(6, V, seed=V, mask_frac=0.05)
    hp = SteerConfig().packed(None, "cpu")
    whole, s_whole = cpp(zl, zc, zn, hp, splits=1)
    for splits in (0, 2, 3, 7):
        for r in (0, 5):
            one, s_one = cpp(zl[r : r + 1], zc[r : r + 1], zn[r : r + 1], hp, splits=splits)
            torch.testing.assert_close(one[0], whole[r], rtol=0, atol=2e-6)
            assert s_one.item() == s_whole[r].item() == 0
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial, _ = cpp(zl, zc, zn, hp)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(serial, whole, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# CUDA: the kernel translation unit compiles for sm_80 and sm_90 without register spills (no GPU
# needed); running it needs a GPU.

NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None)


@pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not found")
def test_cuda_kernel_compiles_without_spills(tmp_path):
    cmd = [NVCC, "-c", str(CSRC / "steer_cuda.cu"), "-o", str(tmp_path / "steer_cuda.o"), "-O3", "-std=c++17",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90", "-Xptxas", "-v"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log
    entries = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'", log)
    assert {arch for _, arch in entries} == {"sm_80", "sm_90"}, log
    assert len({name for name, _ in entries}) >= 2, log  # closed form + iterative
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(spills) >= len(entries), log
    assert all(s == ("0", "0") for s in spills), log
    assert "bytes stack frame" in log and not re.search(r"[1-9]\d* bytes stack frame", log), log


requires_cuda_backend = pytest.mark.skipif(
    not HAS_CUDA or "cuda" not in ck.available_backends(),
    reason="needs a CUDA GPU and the CUDA build of the extension (none on this machine)",
)


@requires_cuda_backend
@pytest.mark.parametrize("mode", ["closed_form", "iterative"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 7), (3, 4099), (1, 152064), (64, 151936)], ids=str)
def test_cuda_matches_reference(shape, dtype, mode):
    if mode == "iterative" and shape[0] == 64:
        pytest.skip("covered by the smaller shapes")
    zl, zc, zn = make_logits(*shape, dtype=dtype, mask_frac=0.05, device="cuda")
    cfg = SteerConfig(T=5) if mode == "iterative" else None
    check_accuracy(steer(zl, zc, zn, cfg, backend="cuda", mode=mode), zl, zc, zn, cfg, mode)


@requires_cuda_backend
@pytest.mark.parametrize("merge", ["auto", "last"])
@pytest.mark.parametrize("mode", ["closed_form", "iterative"])
def test_cuda_status_and_splits(mode, merge, monkeypatch):
    """Row splits of 2 and 37 blocks fit on the GPU at once (barrier merge unless
    COSTEER_CUDA_MERGE=last), 200 x 2 rows need not (last-block merge)."""
    if merge == "last":
        monkeypatch.setenv("COSTEER_CUDA_MERGE", "last")
    zl, zc, zn, hp = (t.cuda() for t in _corrupt_rows())
    out, status = cpp(zl, zc, zn, hp, mode=mode)
    cpu_out, cpu_status = cpp(*(t.cpu() for t in (zl, zc, zn, hp)), mode=mode)
    assert torch.equal(status.cpu(), cpu_status) and torch.isnan(out).all()
    zl, zc, zn = make_logits(2, 151937, device="cuda", row_stride=151937 + 3, seed=4)
    hp = SteerConfig().packed(None, "cuda")
    whole, _ = cpp(zl, zc, zn, hp, mode=mode, splits=1)
    for splits in (2, 37, 200):
        for _ in range(2):  # the second launch reuses the self-reset counters
            split, s = cpp(zl, zc, zn, hp, mode=mode, splits=splits)
            torch.testing.assert_close(split, whole, rtol=0, atol=2e-6)
            assert not s.any()
