"""The C++ backends (csrc/): build, CPU kernel against the float64 reference on every
instruction-set path this CPU runs (test ids name it: portable, avx2, avx512), status bits, the
row-split path, the fused sampler and projection, the bound on T, and the CUDA kernel's compile
(nvcc, sm_80 + sm_90, no register spills)."""
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import costeer_kernels as ck
from costeer_kernels import SteerConfig, closed_form_steer, reference_steer, steer
from costeer_kernels import status as st
from costeer_kernels._extension import build_status
from costeer_kernels.config import steer_coefficient
from costeer_kernels.sampling import gumbel_noise
from costeer_kernels.torch_backend import steer_torch

from ..conftest import HAS_CUDA
from . import helpers
from .helpers import ISAS, make_logits, masked_err

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS32 = torch.finfo(torch.float32).eps
MAX_T = 100000  # STEER_MAX_T of csrc/steer_math.h


def ulp_term(ref64: torch.Tensor) -> float:
    """A few float32 ulps of the reference's magnitude: 4 eps_f32 max|ref| over its finite entries
    (a log-softmax in float32 is off by about ulp(|x| + |lse|) whatever the eager error is)."""
    fin = ref64[torch.isfinite(ref64)]
    return 4 * EPS32 * (fin.abs().max().item() if fin.numel() else 0.0)


def check_accuracy(out, zl, zc, zn, cfg=None, mode="closed_form", ref=None, base=None):
    """helpers.check_accuracy with the ulp term over all finite reference entries (``ulp_term``)."""
    return helpers.check_accuracy(out, zl, zc, zn, cfg, mode, ref=ref, base=base, slack=ulp_term)


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


def test_isa_selection(ext):
    paths = list(torch.ops.costeer_ext.cpu_isas())
    assert paths[0] == "portable" and set(paths) <= set(ISAS)
    before = torch.ops.costeer_ext.cpu_isa()
    try:
        for p in paths:
            assert torch.ops.costeer_ext.cpu_isa(p) == p
            assert torch.ops.costeer_ext.cpu_isa() == p
        assert torch.ops.costeer_ext.cpu_isa("auto") == paths[-1]
        with pytest.raises(ValueError, match="expected .*portable.*got \"sse9\""):
            torch.ops.costeer_ext.cpu_isa("sse9")
        for p in set(ISAS) - set(paths):
            with pytest.raises(ValueError, match=f"\"{p}\" path needs"):
                torch.ops.costeer_ext.cpu_isa(p)
    finally:
        torch.ops.costeer_ext.cpu_isa(before)


def _python(code: str, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_isa_environment_variable(ext):
    """COSTEER_CPU_ISA picks the path at first use; a bad value raises naming the variable."""
    code = ("import torch; from costeer_kernels._extension import build_status; assert build_status()['loaded'];"
            "print(torch.ops.costeer_ext.cpu_isa())")
    res = _python(code, COSTEER_CPU_ISA="portable")
    assert res.returncode == 0 and res.stdout.split()[-1] == "portable", res.stderr
    code_bad = ("import torch; from costeer_kernels._extension import build_status; assert build_status()['loaded'];"
                "z = torch.zeros(1, 3); hp = torch.tensor([[20.0, 2, 1, 2, 10]], dtype=torch.float64)\n"
                "try:\n torch.ops.costeer_ext.steer(z, z, z, hp, torch.empty(1, 3), 'closed_form', 0)\n"
                "except ValueError as e:\n print('VALUEERROR', e)")
    res = _python(code_bad, COSTEER_CPU_ISA="fastest")
    assert "VALUEERROR COSTEER_CPU_ISA" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("mode", ["closed_form", "iterative"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3, 2047), (2, 2049), (5, 4099), (1, 33333)], ids=str)
def test_cpu_matches_reference(isa, shape, dtype, mode):
    zl, zc, zn = make_logits(*shape, dtype=dtype, seed=shape[1])
    cfg = SteerConfig(T=7) if mode == "iterative" else None
    check_accuracy(steer(zl, zc, zn, cfg, backend="cpu", mode=mode), zl, zc, zn, cfg, mode)


@pytest.mark.parametrize("scale", [1.0, 3.0, 30.0])
@pytest.mark.parametrize("shape", [(3, 5000), (1, 152064)], ids=str)
def test_cpu_paths_match_reference(isa, shape, scale):
    """Closed form with masks and a late, much larger max (the running offset jumps by > 64, so
    the skipped-exponential bookkeeping must redo the chunk)."""
    zl, zc, zn = make_logits(*shape, scale=scale, mask_frac=0.05, seed=int(scale))
    zl[0, -1] = 60.0 * scale  # a late, much larger max: the running offset moves by > 64
    check_accuracy(steer(zl, zc, zn, backend="cpu"), zl, zc, zn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", [0.5, 3.0])
@pytest.mark.parametrize("V", [2000, 4099, 33333, 152064])
def test_exp_sums_at_float32_resolution(isa, V, scale, dtype):
    """The log-sum-exp alone, read where the output's rounding cannot hide it: z_c = z_n (no
    steering), z_L[0] = 0 and the other tokens near log(1 / V), so out[0] = -lse rounds at lse's
    small magnitude. The vector paths' table exponential (cpu_simd.inc vexp_sum, 1.1e-7 relative)
    and their two-level float32 sums are measured at <= 6e-7 here, float32 and bfloat16 rows; one
    table entry off by 3e-5 gives 3.7e-6. bfloat16 rows (many equal terms, rounding alike) are the
    hard case for the sums: one lane over a whole chunk gave 1.6e-6 (AVX2) and 1.2e-5 (portable)."""
    bound = 3e-6 if isa == "portable" else 1e-6  # portable: steer_exp, the compiler's lanes; measured <= 1.8e-6
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        zl = (math.log(1.0 / V) + torch.randn(2, V, generator=g, dtype=torch.float64) * scale).to(dtype)
        zl[:, 0] = 0.0
        zc = torch.randn(2, V, generator=g).to(dtype)
        out = steer(zl, zc, zc.clone(), backend="cpu")
        err = (out[:, 0].double() + torch.logsumexp(zl.double(), -1)).abs().max().item()
        assert err <= bound, f"log-sum-exp error {err:.3g} > {bound:.1g} (V={V}, scale={scale}, seed={seed})"


@pytest.mark.parametrize("shape,dtype,mode", [
    ((1, 152064), torch.float32, "closed_form"),
    ((2, 151936), torch.bfloat16, "closed_form"),
    ((1, 152064), torch.float16, "iterative"),
], ids=str)
def test_cpu_full_vocabulary(isa, shape, dtype, mode):
    zl, zc, zn = make_logits(*shape, dtype=dtype, mask_frac=0.01, seed=3)
    cfg = SteerConfig(T=4) if mode == "iterative" else None
    check_accuracy(steer(zl, zc, zn, cfg, backend="cpu", mode=mode), zl, zc, zn, cfg, mode)


@pytest.mark.parametrize("mode", ["closed_form", "iterative"])
def test_per_row_hparams_masks_and_strides(isa, mode):
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
def test_mixed_dtypes_and_given_delta(isa, mode):
    zl, zc, zn = make_logits(3, 1537, seed=9)
    hp = SteerConfig(T=5).packed(None, "cpu")
    ref, _ = cpp(zl, zc, zn, hp, mode=mode)
    mixed, s = cpp(zl.bfloat16(), zc.half(), zn, hp, mode=mode)
    ref_mixed, _ = cpp(zl.bfloat16().float(), zc.half().float(), zn, hp, mode=mode)
    torch.testing.assert_close(mixed, ref_mixed, rtol=0, atol=0)
    assert not s.any()
    for dt in (torch.float16, torch.bfloat16):
        # Three half-precision rows are widened in registers on the SIMD paths: the same numbers.
        z16 = [t.to(dt) for t in (zl, zc, zn)]
        same, s16 = cpp(*z16, hp, mode=mode)
        widened, _ = cpp(*(t.float() for t in z16), hp, mode=mode)
        torch.testing.assert_close(same, widened, rtol=0, atol=0)
        assert not s16.any()
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
    for dt in (torch.float16, torch.bfloat16):  # NaN, +-inf and the masks survive the conversion
        out16, status16 = cpp(zl.to(dt), zc.to(dt), zn.to(dt), hp, mode=mode, splits=splits)
        assert status16.tolist() == expected and torch.isnan(out16).all()
    with pytest.raises(ValueError, match="row 0"):
        steer(zl, zc, zn, backend="cpu", mode=mode)


@pytest.mark.parametrize("mode", ["closed_form", "iterative"])
@pytest.mark.parametrize("splits", [0, 3])
def test_negative_coefficient_status_and_accuracy(isa, mode, splits):
    # The SIMD sweeps run c_T < 0 as z_L + |c_T| (z_n - z_c) with z_c and z_n exchanged: the status
    # bits must still name the input that holds the NaN or +inf, and the values must not change.
    if splits != 0 and mode == "iterative":
        pytest.skip("the iterative form has no row split")
    cfg = SteerConfig(alpha=-2.0, beta=-1.0)
    assert steer_coefficient(cfg.T, cfg.alpha, cfg.beta, cfg.lam, cfg.eta) < 0
    zl, zc, zn, hp = _corrupt_rows()
    hp[:9] = cfg.packed(None, "cpu")
    out, status = cpp(zl, zc, zn, hp, mode=mode, splits=splits)
    ref_status = steer_torch(zl, zc, zn, hp, torch.empty_like(out), mode)
    assert status.tolist()[:6] == [st.NAN_LLM, st.NAN_CTX, st.NAN_NOCTX, st.POSINF_LLM, st.POSINF_CTX,
                                   st.POSINF_NOCTX]
    assert torch.equal(status, ref_status)
    zl, zc, zn = make_logits(3, 5000, seed=12)
    out, status = cpp(zl, zc, zn, cfg.packed(None, "cpu"), mode=mode, splits=splits)
    assert status.tolist() == [0, 0, 0]
    check_accuracy(out, zl, zc, zn, cfg, mode)


def test_status_mixed_with_valid_rows(isa):
    zl, zc, zn = make_logits(4, 5000, seed=2)
    zc[2, 4321] = float("nan")
    out, status = cpp(zl, zc, zn, SteerConfig().packed(None, "cpu"), splits=2)
    assert status.tolist() == [0, 0, st.NAN_CTX, 0]
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3]]).all()


def test_overflow_is_reported(isa):
    zl, zc, zn = make_logits(1, 100, seed=1)
    zc[0, 3] = 3e38
    zn[0, 3] = -3e38
    _, status = cpp(zl, zc, zn, SteerConfig().packed(None, "cpu"))
    assert status.tolist() == [st.NOCTX_MASK]


def test_coefficient_below_float32_still_steers_infinities(isa):
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


def mode_mixing_rows(dtype, seed=0):
    """Rows whose chunks switch the SIMD sweep's sum mode (csrc/cpu_simd.inc: per 256-element
    block, lanes packed or every exponential inline) back and forth: flat logits (scale 0.5, every
    lane within 30 of the max: inline blocks) with whole blocks pushed 200 below the max (no lane
    passes: back to packed), blocks where half the lanes pass, -inf masks inside the inline blocks,
    and a row of peaked logits (scale 30: few lanes pass)."""
    V = 4 * 2048 + 77
    zl, zc, zn = make_logits(4, V, scale=0.5, mask_frac=0.05, seed=seed)
    for b0 in range(2048 + 512, V, 1024):  # one block of 256 in four, from the second chunk on
        zl[:3, b0 : b0 + 256] -= 200.0
    zl[1, 2048 + 256 : 4096 : 2] -= 200.0  # half the lanes of a chunk's blocks pass
    zl[3] = torch.randn(V, generator=torch.Generator().manual_seed(seed + 1)) * 30.0
    return [t.to(dtype) for t in (zl, zc, zn)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_modes_match_reference(isa, dtype):
    zl, zc, zn = mode_mixing_rows(dtype)
    out = steer(zl, zc, zn, backend="cpu")
    check_accuracy(out, zl, zc, zn)
    # The sums themselves: each row's log-softmax normalizes, up to the float32 rounding of the
    # log-probs that carry the mass (x - lse rounds at ulp(|x| + |lse|)).
    ref = reference_steer(zl, zc, zn, None, dtype=torch.float64)
    lse = torch.logsumexp(out.double(), -1)
    heavy = torch.where(ref > -20.0, ref.abs(), torch.zeros_like(ref)).amax(-1)
    for r in range(out.shape[0]):
        assert abs(lse[r].item()) <= 1e-6 + 4 * EPS32 * heavy[r].item(), (r, lse[r].item())


def test_nan_in_an_inline_block_is_reported(isa):
    """A NaN input inside a block whose exponentials are computed inline (its lane is zeroed in
    the sum bitwise, never added) still sets the status bit and poisons only its row."""
    zl, zc, zn = mode_mixing_rows(torch.float32, seed=4)
    zc[2, 2048 + 300] = float("nan")
    zl[0, 3 * 2048 + 5] = float("nan")
    out, status = cpp(zl, zc, zn, SteerConfig().packed(None, "cpu"))
    assert status.tolist() == [st.NAN_LLM, 0, st.NAN_CTX, 0]
    assert torch.isnan(out[[0, 2]]).all() and not torch.isnan(out[[1, 3]]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_streamed_output_equals_cached(isa, dtype):
    """An output of >= 16 MiB is written by the second sweep with streaming stores from a per-thread
    row of scratch (csrc/steer_cpu.cpp, kStreamOut): the same values, bit for bit, as a row
    computed alone (subtracted in place), here into out rows that start off a 64-byte boundary."""
    B, V = 32, 131072
    zl, zc, zn = make_logits(B, V, dtype=dtype, mask_frac=0.01, seed=11)
    zc[5, 777] = float("nan")
    hp = SteerConfig().packed(None, "cpu")
    big = torch.full((B, V + 3), 7.0)
    out = big[:, 1 : V + 1]  # row starts 4 bytes past an aligned address, stride V + 3
    _, status = cpp(zl, zc, zn, hp, out=out)
    assert out.numel() * 4 >= 16 << 20
    assert (big[:, 0] == 7.0).all() and (big[:, V + 1 :] == 7.0).all()  # nothing written outside out
    for r in (0, 5, 17, 31):
        one, s_one = cpp(zl[r : r + 1], zc[r : r + 1], zn[r : r + 1], hp, splits=1)
        torch.testing.assert_close(out[r], one[0], rtol=0, atol=0, equal_nan=True)
        assert status[r].item() == s_one.item() == (st.NAN_CTX if r == 5 else 0)
    check_accuracy(out[[0, 17]], zl[[0, 17]], zc[[0, 17]], zn[[0, 17]])


@pytest.mark.parametrize("V", [1, 2048, 4097, 151936])
def test_split_rows_equal_whole_rows(isa, V):
    """B=1 split across tasks (num_splits > 1) against the same row processed whole in a batch.
    Split and whole rows sum their exponentials in different orders, so the log-sum-exp may differ
    by a few float32 ulps of its magnitude (this row's lse is below max |log-prob|)."""
    zl, zc, zn = make_logits(6, V, seed=V, mask_frac=0.05)
    hp = SteerConfig().packed(None, "cpu")
    whole, s_whole = cpp(zl, zc, zn, hp, splits=1)
    for splits in (0, 2, 3, 7):
        for r in (0, 5):
            one, s_one = cpp(zl[r : r + 1], zc[r : r + 1], zn[r : r + 1], hp, splits=splits)
            torch.testing.assert_close(one[0], whole[r], rtol=0, atol=ulp_term(whole[r].double()))
            assert s_one.item() == s_whole[r].item() == 0
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial, _ = cpp(zl, zc, zn, hp)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(serial, whole, rtol=0, atol=0)


def sample_op(zl, zc, zn, hp, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0, num_samples=1,
              want_maxp=True, hidden=None):
    """torch.ops.costeer_ext.sample (or sample_hidden with hidden=(hdiff, W)): parameters as [1]
    tensors, one RNG stream per row (row_keyed)."""
    params = (torch.tensor([temperature], dtype=torch.float32), torch.tensor([top_k], dtype=torch.int32),
              torch.tensor([top_p], dtype=torch.float32), torch.tensor([min_p], dtype=torch.float32),
              torch.tensor([seed], dtype=torch.int64), torch.tensor([offset], dtype=torch.int64))
    if hidden is not None:
        return torch.ops.costeer_ext.sample_hidden(zl, hidden[0], hidden[1], hp, *params, True, want_maxp, num_samples)
    return torch.ops.costeer_ext.sample(zl, zc, zn, hp, *params, True, want_maxp, num_samples)


def gumbel_oracle(x64, temperature, top_k, seed, num_samples):
    """Gumbel-max in float64 over the steered log-probs x64 [B, V] with the kernels' Philox noise
    (row key r * n + d): the token each draw should pick, and the winning margin."""
    B, V = x64.shape
    rkey = torch.arange(B * num_samples, dtype=torch.int64)
    g = gumbel_noise(V, rkey, torch.tensor([seed]), torch.tensor([0])).double().reshape(B, num_samples, V)
    allowed = torch.ones(B, V, dtype=torch.bool)
    if 0 < top_k < V:
        kth = x64.topk(top_k, dim=-1).values[:, -1:]
        allowed = x64 >= kth
    key = torch.where(allowed[:, None, :], x64[:, None, :] + temperature * g, torch.tensor(float("-inf"), dtype=torch.float64))
    top2 = key.topk(2, dim=-1)
    return top2.indices[..., 0], top2.values[..., 0] - top2.values[..., 1]


def check_sampled(tok, lp, x64, temperature, top_k, seed):
    want, margin = gumbel_oracle(x64, temperature, top_k, seed, tok.shape[1])
    # A draw whose two best keys lie within float32 rounding may go either way.
    close = margin < 1e-4
    assert torch.equal(tok[~close], want[~close]), (tok, want)
    torch.testing.assert_close(lp.double(), x64.gather(1, tok), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 3])
def test_sampler_matches_float64(isa, dtype, B):
    """The fused sampler sweep on each path: greedy token and log-prob, Gumbel draws (plain and
    top-k) and the LLM's max probability, against float64 of the same inputs."""
    V = 20011
    zl, zc, zn = make_logits(B, V, dtype=dtype, mask_frac=0.02, seed=B)
    hp = SteerConfig().packed(None, "cpu")
    x64 = reference_steer(zl, zc, zn, None, dtype=torch.float64)
    tok, lp, maxp, status = sample_op(zl, zc, zn, hp)
    assert not status.any()
    ref_best = x64.max(-1).values
    assert torch.all(x64.gather(1, tok)[:, 0] >= ref_best - 1e-5)
    torch.testing.assert_close(lp[:, 0].double(), ref_best, rtol=0, atol=1e-5)
    torch.testing.assert_close(maxp.double(), torch.softmax(zl.double(), -1).max(-1).values, rtol=1e-5, atol=0)
    for top_k in (0, 40):
        tok, lp, _, status = sample_op(zl, zc, zn, hp, temperature=0.8, top_k=top_k, seed=7, num_samples=4)
        assert not status.any()
        check_sampled(tok, lp, x64, 0.8, top_k, 7)


def projection_inputs(B, V, H, dtype, seed=0):
    """llm logits, float32 hdiff [B, H] and a weight of dtype with more rows than V and a row stride
    wider than H (a slice), like a padded lm_head."""
    g = torch.Generator().manual_seed(seed)
    zl = torch.randn(B, V, generator=g) * 3
    hdiff = torch.randn(B, H, generator=g)
    W = (torch.randn(V + 5, H + 3, generator=g) / H**0.5 * 3).to(dtype)[:, :H]
    return zl, hdiff, W


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 2, 3, 5, 17])
def test_projection_matches_float64(isa, dtype, B):
    """steer_hidden and sample_hidden for any B (W read once for all rows), every weight dtype:
    float32 accumulation of W hdiff, against float64 of the same input values."""
    V, H = 5003, 129
    zl, hdiff, W = projection_inputs(B, V, H, dtype, seed=B)
    d64 = hdiff.double() @ W[:V].double().T
    zero = torch.zeros(B, V)
    ref = closed_form_steer(zl, d64, None, None, dtype=torch.float64)
    base = closed_form_steer(zl, hdiff @ W[:V].float().T, None, None, dtype=torch.float32)
    hp = SteerConfig().packed(None, "cpu")
    for splits in (0, 1, 3):
        out = torch.empty(B, V)
        status = torch.ops.costeer_ext.steer_hidden(zl, hdiff, W, hp, out, splits)
        assert not status.any()
        check_accuracy(out, zl, d64, zero, ref=ref, base=base)
    tok, lp, maxp, status = sample_op(zl, None, None, hp, hidden=(hdiff, W))
    assert not status.any()
    assert torch.all(ref.gather(1, tok)[:, 0] >= ref.max(-1).values - 1e-5)
    tok, lp, _, status = sample_op(zl, None, None, hp, temperature=1.3, top_k=50, seed=3, num_samples=2,
                                   hidden=(hdiff, W))
    assert not status.any()
    check_sampled(tok, lp, ref, 1.3, 50, 3)


def test_projection_strided_hidden_rows(isa):
    """hdiff rows with a stride wider than H, and per-row settings."""
    B, V, H = 4, 3001, 40
    zl, hdiff, W = projection_inputs(B, V, H, torch.float32, seed=11)
    wide = torch.zeros(B, H + 9)
    wide[:, :H] = hdiff
    cfg = SteerConfig(T=torch.tensor([0, 3, 20, 7]))
    hp = cfg.packed(B, "cpu")
    out = torch.empty(B, V)
    status = torch.ops.costeer_ext.steer_hidden(zl, wide[:, :H], W, hp, out, 0)
    assert not status.any()
    d64 = hdiff.double() @ W[:V].double().T
    check_accuracy(out, zl, d64, torch.zeros(B, V), cfg,
                   ref=closed_form_steer(zl, d64, None, cfg, dtype=torch.float64),
                   base=closed_form_steer(zl, hdiff @ W[:V].T, None, cfg, dtype=torch.float32))


def test_large_T_is_invalid_and_prompt(ext):
    """T > STEER_MAX_T = 100000 is BAD_HPARAMS in every C++ entry point (the c_T recurrence and the
    iterative form cost O(T)): T = 2**40 or 1e9 used to run for hours or seconds."""
    zl, zc, zn = make_logits(4, 257, seed=4)
    row = [20.0, 2.0, 1.0, 2.0, 10.0]
    hp = torch.tensor([row] * 4, dtype=torch.float64)
    hp[:, 0] = torch.tensor([float(MAX_T + 1), 20.0, float(MAX_T), 7.0], dtype=torch.float64)
    out, status = cpp(zl, zc, zn, hp)
    assert status.tolist() == [st.BAD_HPARAMS, 0, 0, 0]  # fails fast on code without the bound
    cfg = SteerConfig(T=torch.tensor([20, MAX_T, 7]))
    rows = (zl[1:], zc[1:], zn[1:])
    # The float64 closed form stands in for the T = 100000 step loop (they agree to ~1e-13).
    check_accuracy(out[1:], *rows, cfg, ref=closed_form_steer(*rows, cfg, dtype=torch.float64))
    hp[:, 0] = torch.tensor([2.0**40, 1e9, 20.0, float(MAX_T + 1)], dtype=torch.float64)
    expect = [st.BAD_HPARAMS, st.BAD_HPARAMS, 0, st.BAD_HPARAMS]
    for mode in ("closed_form", "iterative"):
        for splits in (0, 1, 2):
            out, status = cpp(zl, zc, zn, hp, mode=mode, splits=splits)
            assert status.tolist() == expect
            assert torch.isnan(out[[0, 1, 3]]).all() and torch.isfinite(out[2]).all()
    *_, status = sample_op(zl, zc, zn, hp, temperature=1.0)
    assert status.tolist() == expect
    hdiff, W = torch.randn(4, 8), torch.randn(257, 8)
    status = torch.ops.costeer_ext.steer_hidden(zl, hdiff, W, hp, torch.empty(4, 257), 0)
    assert status.tolist() == expect
    *_, status = sample_op(zl, None, None, hp, hidden=(hdiff, W))
    assert status.tolist() == expect


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
