"""The public ops' contract: torch ops with fake implementations (opcheck, torch.compile with the
default arguments), fp32 accumulation of the projection, clear errors for bad arguments, and a
bound on T so that no call can hang."""
import time

import pytest
import torch

import costeer_kernels as ck
from costeer_kernels import SteerConfig, closed_form_steer, speculative_verify, steer, steer_from_hidden, steer_sample
from costeer_kernels.registry import available_backends

from .helpers import make_logits, masked_err


def _cpu_backends():
    return [b for b in ("torch", "cpu") if b in available_backends()]


# ---------------------------------------------------------------------------------------------
# Every public op is a torch op with a fake implementation


def _hidden_inputs(B=2, V=97, H=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    hc, hn = (torch.randn(B, H, generator=g).to(dtype) for _ in range(2))
    zl = torch.randn(B, V, generator=g) * 3
    return zl, hc, hn, W


def test_every_public_op_is_registered():
    for name in ("steer", "steer_out", "steer_mapped_out", "steer_sample", "steer_from_hidden",
                 "steer_from_hidden_out", "sample_from_hidden", "speculative_verify"):
        assert hasattr(torch.ops.costeer, name), name


@pytest.mark.parametrize("backend", _cpu_backends())
def test_opcheck_every_op(backend):
    zl, zc, zn = make_logits(2, 33)
    hp = SteerConfig().packed(None, "cpu")
    ops = torch.ops.costeer
    torch.library.opcheck(ops.steer.default, (zl, zc, zn, hp, "closed_form", backend))
    torch.library.opcheck(ops.steer_out.default, (zl, zc, zn, hp, torch.empty(2, 33), "closed_form", backend))
    p = ck.sampling.make_params(2, "cpu", 0.8, 5, 0.9, 0.0, 3, 1)
    torch.library.opcheck(ops.steer_sample.default, (zl, zc, zn, hp, *p[:6], p.row_keyed, True, 2, backend))
    hz, hc, hn, W = _hidden_inputs(V=33)
    fused = backend == "cpu"
    torch.library.opcheck(ops.steer_from_hidden.default, (hz, hc, hn, W, hp, None, False, "closed_form", False, backend))
    torch.library.opcheck(ops.steer_from_hidden_out.default,
                          (hz, hc, hn, W, hp, None, torch.empty(2, 33), False, "closed_form", False, backend))
    torch.library.opcheck(ops.sample_from_hidden.default,
                          (hz, hc, hn, W, hp, None, False, *p[:6], p.row_keyed, True, 1, False, backend))
    if fused:
        torch.library.opcheck(ops.steer_from_hidden.default,
                              (hz[:1], hc[:1], hn[:1], W, hp, None, False, "closed_form", True, backend))
    # speculative verification: 2 requests x (k=2 drafts + the bonus row), greedy and sampling
    vl, vc, vn = make_logits(6, 33, seed=5)
    drafts = torch.randint(0, 33, (2, 2))
    q = torch.randn(4, 33)
    for temp in (0.0, 0.8):
        pv = ck.sampling.make_params(2, "cpu", temp, 5, 0.9, 0.0, torch.tensor([3, 4]), 1)
        torch.library.opcheck(ops.speculative_verify.default,
                              (vl, vc, vn, hp, drafts, q, *pv[:6], pv.row_keyed, "torch"))
    idx = torch.randint(-1, 33, (33,), dtype=torch.int32)
    if "steer_mapped" in ck.registry._BACKENDS[backend].kernels:
        torch.library.opcheck(ops.steer_mapped_out.default,
                              (zl, zc, zn, hp, idx, torch.empty(2, 33), True, "closed_form", backend))


def test_compile_fullgraph_with_default_arguments_matches_eager():
    zl, zc, zn = make_logits(3, 257, seed=1)
    hz, hc, hn, W = _hidden_inputs(B=3, V=257, seed=2)

    def step(zl, zc, zn, hz, hc, hn, W):
        lp = steer(zl, zc, zn) * 1.0
        tok, tok_lp = steer_sample(zl, zc, zn)
        lp_h = steer_from_hidden(hz, hc, hn, W)
        tok_h, _ = steer_from_hidden(hz, hc, hn, W, sample=True)
        j, y = speculative_verify(zl[None], zc[None], zn[None], tok[None, :2])  # 1 request, k = 2
        return lp, tok, tok_lp, lp_h, tok_h, j, y

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(zl, zc, zn, hz, hc, hn, W)
    want = step(zl, zc, zn, hz, hc, hn, W)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)


def test_compile_with_inductor_matches_eager():
    zl, zc, zn = make_logits(2, 129, seed=3)

    def step(zl, zc, zn):
        tok, lp = steer_sample(zl, zc, zn, temperature=0.7, top_k=20, seed=5)
        return steer(zl, zc, zn).exp().sum(-1), tok, lp

    got = torch.compile(step, fullgraph=True)(zl, zc, zn)
    want = step(zl, zc, zn)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_validate_under_compile_is_an_in_graph_assert():
    zl, zc, zn = make_logits(2, 65, seed=4)
    compiled = torch.compile(lambda a, b, c: steer(a, b, c), fullgraph=True, backend="aot_eager")
    compiled(zl, zc, zn)
    bad = zl.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(RuntimeError, match="invalid"):
        compiled(bad, zc, zn)
    quiet = torch.compile(lambda a, b, c: steer(a, b, c, validate=False), fullgraph=True, backend="aot_eager")
    assert torch.isnan(quiet(bad, zc, zn)[1]).all()


# ---------------------------------------------------------------------------------------------
# steer_from_hidden accumulates W (h_c - h_n) in fp32 on every path


@pytest.mark.parametrize("backend", [None] + _cpu_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B", [1, 3])
def test_projection_matches_float64_of_the_same_inputs(backend, dtype, B):
    zl, hc, hn, W = _hidden_inputs(B=B, V=5003, H=129, dtype=dtype, seed=5)
    ref = closed_form_steer(zl.double(), (hc.double() - hn.double()) @ W.double().t(), None, dtype=torch.float64)
    out = steer_from_hidden(zl, hc, hn, W, backend=backend)
    # fp32 products and sums of H=129 terms: ~1e-6; a GEMM in bf16 (the old CPU batch path) gave
    # 3.7e-2, in fp16 4.7e-3.
    assert masked_err(out, ref) < 1e-4
    tok, _ = steer_from_hidden(zl, hc, hn, W, backend=backend, sample=True)
    assert torch.equal(tok, ref.argmax(-1))


# ---------------------------------------------------------------------------------------------
# Bad arguments get a TypeError/ValueError naming the argument, or documented clamping


def test_out_with_overlapping_rows_is_refused():
    zl, zc, zn = make_logits(3, 50)
    out = torch.empty(1, 50).expand(3, 50)
    for backend in _cpu_backends():
        with pytest.raises(ValueError, match="out has overlapping rows"):
            steer(zl, zc, zn, out=out, backend=backend)


def test_wide_vocab_map_entries_never_wrap_to_another_token():
    zl, zc, zn = make_logits(2, 40, seed=6)
    idx = torch.arange(40, dtype=torch.int64)
    wide = idx.clone()
    wide[7] = 2**32 + 5  # as int32 this would be 5
    unmapped = idx.clone()
    unmapped[7] = -1
    for backend in [None] + [b for b in _cpu_backends() if b in available_backends("steer_mapped")]:
        with pytest.raises(ValueError, match="vocab_map has an out-of-range entry"):
            steer(zl, zc, zn, vocab_map=wide, backend=backend)
        got = steer(zl, zc, zn, vocab_map=wide, validate=False, backend=backend)
        torch.testing.assert_close(got, steer(zl, zc, zn, vocab_map=unmapped, backend=backend))


@pytest.mark.parametrize("backend", _cpu_backends())
def test_huge_top_k_means_off(backend):
    zl, zc, zn = make_logits(2, 300, seed=7)
    want = steer_sample(zl, zc, zn, temperature=1.0, seed=3, backend=backend)
    for k in (2**31, 2**40, torch.tensor([2**32 + 1, 2**33], dtype=torch.int64)):
        for validate in (True, False):
            got = steer_sample(zl, zc, zn, temperature=1.0, seed=3, top_k=k, backend=backend, validate=validate)
            assert torch.equal(got[0], want[0]), (k, validate)


def test_bad_scalar_arguments_name_themselves():
    zl, zc, zn = make_logits(2, 30)
    with pytest.raises(TypeError, match="vocab_size"):
        steer(zl, zc, zn, vocab_size=True)
    with pytest.raises(ValueError, match="temperature"):
        steer_sample(zl, zc, zn, temperature=1e300)
    with pytest.raises(ValueError, match="temperature"):
        steer_sample(zl, zc, zn, temperature=torch.tensor([1e300, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="num_samples"):
        steer_sample(zl, zc, zn, num_samples=10**12)
    with pytest.raises(TypeError, match="return_llm_max_prob"):
        steer_sample(zl, zc, zn, return_llm_max_prob="yes")
    with pytest.raises(ValueError, match=r"SteerConfig.T must be an integer in \[0, 100000\]"):
        SteerConfig(T=10**9)


@pytest.mark.parametrize("backend", _cpu_backends())
def test_unrepresentable_temperature_without_validation_is_greedy(backend):
    zl, zc, zn = make_logits(2, 30, seed=8)
    tau = torch.tensor([1e300, float("inf")], dtype=torch.float64)
    got = steer_sample(zl, zc, zn, temperature=tau, validate=False, backend=backend)
    assert torch.equal(got[0], steer_sample(zl, zc, zn, backend=backend)[0])


@pytest.mark.parametrize("backend", _cpu_backends())
def test_empty_batch(backend):
    zl, zc, zn = (torch.empty(0, 30) for _ in range(3))
    tok, lp, conf = steer_sample(zl, zc, zn, temperature=0.5, backend=backend, return_llm_max_prob=True)
    assert tok.shape == (0,) and lp.shape == (0,) and conf.shape == (0,)
    tok, lp = steer_sample(zl, zc, zn, num_samples=3, backend=backend)
    assert tok.shape == (0, 3)
    assert steer(zl, zc, zn, backend=backend).shape == (0, 30)


@pytest.mark.parametrize("backend", _cpu_backends())
def test_huge_per_row_T_is_invalid_not_a_hang(backend):
    zl, zc, zn = make_logits(2, 64, seed=9)
    for T in (2**40, 10**9, ck.MAX_T + 1):
        cfg = SteerConfig(T=torch.tensor([20, T]))
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match="row 1: cfg has an invalid per-row setting"):
            steer(zl, zc, zn, cfg, backend=backend)
        out = steer(zl, zc, zn, cfg, backend=backend, validate=False)
        assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
        assert time.perf_counter() - t0 < 30  # generous: the point is that it ends at all
    cfg = SteerConfig(T=torch.tensor([ck.MAX_T, 3]))
    assert not torch.isnan(steer(zl, zc, zn, cfg, backend=backend)).any()


def test_huge_logits_keep_the_max_term_on_every_isa():
    """|max| >= 2^28: max - 30 rounds to max, and the SIMD paths' exp cut dropped the max term
    itself (log-prob +inf; found by the fuzz test)."""
    if "cpu" not in available_backends():
        pytest.skip("the C++ extension is not built")
    zl, zc, zn = torch.tensor([[4.5938e29]]), torch.tensor([[-9.2075e29]]), torch.tensor([[-1.7861e29]])
    before = torch.ops.costeer_ext.cpu_isa("")
    try:
        for isa in torch.ops.costeer_ext.cpu_isas():
            torch.ops.costeer_ext.cpu_isa(isa)
            for mode in ("closed_form", "iterative"):
                assert steer(zl, zc, zn, backend="cpu", mode=mode).item() == 0.0, (isa, mode)
            big = torch.full((2, 300), 3e30)
            big[:, 7] = 3.0000002e30
            out = steer(big, torch.zeros_like(big), torch.zeros_like(big), backend="cpu")
            torch.testing.assert_close(out, torch.log_softmax(big.double(), -1).float(), atol=1e-5, rtol=0)
    finally:
        torch.ops.costeer_ext.cpu_isa(before)
