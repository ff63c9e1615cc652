"""steer_sample: greedy, Gumbel-max sampling, top-k / top-p / min-p, RNG reproducibility, checks.

Statistical cases draw >= 1e5 tokens in one call and compare the counts with the exact steered
distribution from the float64 reference loop (chi-square, p > 1e-3); tokens outside the allowed
set (computed from the float64 reference) must never be drawn. The Triton kernel runs in Triton's
interpreter here (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU).
"""
import os

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from costeer_kernels import SteerConfig, reference_steer, steer
from costeer_kernels.sampling import gumbel_noise, steer_sample

from .helpers import device_for, make_logits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

def _cpp_sampler_built() -> bool:
    from costeer_kernels import available_backends
    from costeer_kernels.sampling import available_samplers

    return "cpu" in available_backends() and "cpu" in available_samplers()


def _cpp_sampler() -> bool:
    """Whether the C++ sampler is the default here (built, and the test device is the CPU)."""
    return DEVICE == "cpu" and _cpp_sampler_built()


# The C++ CPU sampler (csrc/sample_cpu.cpp) when the extension is built (CI builds it); it runs
# on CPU tensors (device_for) on every machine, the other backends on DEVICE.
BACKENDS = ["torch", "triton"] + (["cpu"] if _cpp_sampler_built() else [])
N_DRAWS = 100_000


def _pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit; bins with expected count < 5 are pooled."""
    n = counts.sum().item()
    exp = probs * n
    big = exp >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().reshape(1)])
    ex = torch.cat([exp[big], exp[~big].sum().reshape(1)])
    if ex[-1] < 5:  # pool too small: merge it into the smallest big bin
        obs, ex = obs[:-1].clone(), ex[:-1].clone()
        j = torch.argmin(ex)
        obs[j] += counts[~big].double().sum()
        ex[j] += exp[~big].sum()
    chi2 = ((obs - ex) ** 2 / ex).sum().item()
    dof = len(ex) - 1
    try:
        from scipy.stats import chi2 as chi2_dist

        return float(chi2_dist.sf(chi2, dof))
    except ImportError:
        return torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), torch.tensor(chi2 / 2.0, dtype=torch.float64)).item()


def _target(ref_lp: torch.Tensor, tau: float, top_k=0, top_p=1.0, min_p=0.0):
    """Exact sampling distribution (float64) and the allowed mask, from reference log-probs [V]."""
    lq = ref_lp / tau
    lq = lq - torch.logsumexp(lq, 0)
    q = lq.exp()
    allowed = torch.isfinite(ref_lp)
    order = torch.argsort(q, descending=True)
    if top_k:
        a = torch.zeros_like(allowed)
        a[order[:top_k]] = True
        allowed &= a
    if top_p < 1.0:
        qk = torch.where(allowed, q, torch.zeros_like(q))
        qs = qk[order] / qk.sum()
        cum = torch.cumsum(qs, 0)
        keep = int((cum < top_p).sum().item()) + 1
        a = torch.zeros_like(allowed)
        a[order[:keep]] = True
        allowed &= a
    if min_p > 0:
        allowed &= q >= min_p * q.max()
    p = torch.where(allowed, q, torch.zeros_like(q))
    return p / p.sum(), allowed


def _top_p_keeping(ref_lp, tau, j, top_k=0):
    """A top_p (well away from any boundary) that keeps exactly j tokens."""
    q = torch.softmax(ref_lp / tau, 0)
    qs = torch.sort(q, descending=True).values
    if top_k:
        qs = qs[:top_k]
    cum = torch.cumsum(qs / qs.sum(), 0)
    return float((cum[j - 2] + cum[j - 1]) / 2)


def _min_p_keeping(ref_lp, tau, j):
    q = torch.softmax(ref_lp / tau, 0)
    qs = torch.sort(q, descending=True).values
    r = qs / qs[0]
    return float((r[j - 1] + r[j]) / 2)


def _check_counts(tokens: torch.Tensor, p: torch.Tensor, allowed: torch.Tensor):
    tokens = tokens.reshape(-1).cpu()
    assert tokens.numel() >= N_DRAWS
    counts = torch.bincount(tokens, minlength=p.numel())
    assert counts.numel() == p.numel(), "a token id out of range was drawn"
    assert counts[~allowed].sum().item() == 0, f"tokens outside the allowed set drawn: {torch.nonzero(counts * ~allowed).flatten().tolist()}"
    pv = _pvalue(counts, p)
    assert pv > 1e-3, f"chi-square p-value {pv:.2e}"


CASES = [
    # (V, tau, top_k, top_p keep j (0 = off), min_p keep j (0 = off))
    pytest.param(24, 1.0, 0, 0, 0, id="temperature"),
    pytest.param(24, 0.6, 8, 0, 0, id="top_k"),
    pytest.param(20, 1.3, 0, 5, 0, id="top_p"),
    pytest.param(16, 1.0, 0, 0, 4, id="min_p"),
    pytest.param(24, 0.8, 10, 6, 0, id="top_k+top_p"),
    pytest.param(7, 1.0, 5, 0, 3, id="top_k+min_p"),
]


def _case_inputs(V, seed=1, device=DEVICE):
    zl, zc, zn = make_logits(1, V, seed=seed, scale=1.5, device=device)
    ref = reference_steer(zl, zc, zn, dtype=torch.float64)[0].cpu()
    return zl, zc, zn, ref


@pytest.mark.parametrize("V,tau,k,pj,mj", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_distribution(backend, V, tau, k, pj, mj):
    zl, zc, zn, ref = _case_inputs(V, device=device_for(backend))
    top_p = _top_p_keeping(ref, tau, pj, top_k=k) if pj else 1.0
    min_p = _min_p_keeping(ref, tau, mj) if mj else 0.0
    p, allowed = _target(ref, tau, k, top_p, min_p)
    tok, lp = steer_sample(zl, zc, zn, temperature=tau, top_k=k, top_p=top_p, min_p=min_p, seed=123,
                           num_samples=N_DRAWS, backend=backend)
    assert tok.shape == (1, N_DRAWS) and tok.dtype == torch.int64 and lp.dtype == torch.float32
    _check_counts(tok, p, allowed)
    # The returned log-prob is the steered one of the chosen token (before temperature/filters).
    assert torch.allclose(lp[0].double().cpu(), ref[tok[0].cpu()], atol=1e-5)


def test_identical_rows_torch():
    """B = 1e5 identical rows in one call: the row index keys the RNG stream."""
    V = 16
    zl, zc, zn, ref = _case_inputs(V, seed=2)
    rows = [t.expand(N_DRAWS, V) for t in (zl, zc, zn)]
    p, allowed = _target(ref, 0.9, top_k=10)
    tok, _ = steer_sample(*rows, temperature=0.9, top_k=10, seed=7, backend="torch")
    assert tok.shape == (N_DRAWS,)
    _check_counts(tok, p, allowed)


def test_identical_rows_triton_match_torch():
    """The Triton kernel over many rows (one program each) draws what the torch path draws."""
    V = 40
    zl, zc, zn, _ = _case_inputs(V, seed=3)
    rows = [t.expand(16, V) for t in (zl, zc, zn)]
    a, _ = steer_sample(*rows, temperature=1.1, top_p=0.9, seed=11, offset=5, backend="torch")
    b, _ = steer_sample(*rows, temperature=1.1, top_p=0.9, seed=11, offset=5, backend="triton")
    assert (a == b).float().mean().item() > 0.99
    assert len(set(a.tolist())) > 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_inputs(backend, dtype):
    V = 16
    zl, zc, zn = make_logits(1, V, dtype=dtype, seed=4, scale=1.5, device=device_for(backend))
    ref = reference_steer(zl, zc, zn, dtype=torch.float64)[0].cpu()
    p, allowed = _target(ref, 1.0, top_k=7)
    tok, _ = steer_sample(zl, zc, zn, temperature=1.0, top_k=7, seed=5, num_samples=N_DRAWS, backend=backend)
    _check_counts(tok, p, allowed)
    g, lp = steer_sample(zl, zc, zn, backend=backend)
    assert g.item() == steer(zl, zc, zn).argmax(-1).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_tokens_never_drawn(backend):
    V = 24
    zl, zc, zn = make_logits(1, V, seed=6, scale=1.0, device=device_for(backend), mask_frac=0.3)
    zc = zc.clone()
    zc[0, 5] = float("-inf")  # banned by the small model with context alone
    ref = reference_steer(zl, zc, zn, dtype=torch.float64)[0].cpu()
    banned = ~torch.isfinite(ref)
    assert banned.sum() > 3
    p, allowed = _target(ref, 2.0)
    tok, _ = steer_sample(zl, zc, zn, temperature=2.0, seed=9, num_samples=N_DRAWS, backend=backend)
    assert not banned[tok[0].cpu()].any()
    _check_counts(tok, p, allowed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_is_steer_argmax(backend):
    dev = device_for(backend)
    zl, zc, zn = make_logits(6, 200, seed=7, device=dev)
    cfg = SteerConfig(T=torch.tensor([0, 1, 5, 20, 20, 3], device=dev))
    out = steer(zl, zc, zn, cfg)
    tok, lp, mp = steer_sample(zl, zc, zn, cfg, backend=backend, return_llm_max_prob=True)
    assert torch.equal(tok, out.argmax(-1))
    assert torch.allclose(lp, out.gather(1, tok[:, None])[:, 0], atol=1e-5)
    assert torch.allclose(mp, torch.softmax(zl.double(), -1).max(-1).values.float(), rtol=1e-5)
    # delta given directly (slm_noctx_logits=None)
    tok2, _ = steer_sample(zl, zc - zn, None, cfg, backend=backend)
    assert torch.equal(tok2, tok)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_ties_lowest_index(backend):
    zl = torch.zeros(2, 64, device=device_for(backend))
    zl[0, [9, 17, 40]] = 3.0
    zl[1, [63, 2]] = 1.0
    z0 = torch.zeros_like(zl)
    tok, _ = steer_sample(zl, z0, z0, backend=backend)
    assert tok.tolist() == [9, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_one_hot_exact(backend):
    V = 100
    dev = device_for(backend)
    zl, zc, zn = make_logits(4, V, seed=8, scale=0.5, device=dev)
    zl = zl.clone()
    hot = torch.tensor([3, 50, 99, 0], device=dev)
    zl[torch.arange(4), hot] += 60.0
    tok, lp = steer_sample(zl, zc, zn, temperature=1.0, top_p=0.95, seed=1, num_samples=2000, backend=backend)
    assert (tok == hot[:, None]).all()
    assert (lp.abs() < 1e-6).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_and_offset(backend):
    dev = device_for(backend)
    zl, zc, zn = make_logits(3, 50, seed=9, scale=0.3, device=dev)
    kw = dict(temperature=1.0, num_samples=64, backend=backend)
    a, _ = steer_sample(zl, zc, zn, seed=1, **kw)
    b, _ = steer_sample(zl, zc, zn, seed=1, **kw)
    c, _ = steer_sample(zl, zc, zn, seed=2, **kw)
    d, _ = steer_sample(zl, zc, zn, seed=1, offset=1, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    # device tensors as seed/offset: 0-d equals the Python int
    e, _ = steer_sample(zl, zc, zn, seed=torch.tensor(1, device=dev), offset=torch.tensor(0, device=dev), **kw)
    assert torch.equal(a, e)
    # per-row seeds: each row its own stream, independent of its slot in the batch
    seeds = torch.tensor([5, 6, 7], device=dev)
    f, _ = steer_sample(zl, zc, zn, seed=seeds, **kw)
    g, _ = steer_sample(zl[1:2], zc[1:2], zn[1:2], seed=seeds[1:2], **kw)
    assert torch.equal(f[1:2], g)


def test_backends_draw_the_same_tokens():
    zl, zc, zn = make_logits(3, 300, seed=10, scale=1.0, device=DEVICE)
    kw = dict(temperature=torch.tensor([0.5, 1.0, 2.0], device=DEVICE), top_k=torch.tensor([0, 40, 7], device=DEVICE),
              top_p=torch.tensor([0.9, 1.0, 0.8], device=DEVICE), min_p=0.01, seed=3, offset=2**33 + 5, num_samples=32)
    a, la = steer_sample(zl, zc, zn, backend="torch", **kw)
    b, lb = steer_sample(zl, zc, zn, backend="triton", **kw)
    assert (a == b).float().mean().item() > 0.98
    assert torch.allclose(la[a == b], lb[a == b], atol=1e-5)


@pytest.mark.skipif(not _cpp_sampler_built(), reason="the C++ extension is not built (CPU sampler missing)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,V", [(1, 151936), (3, 4099), (2, 7), (1, 1)])
def test_cpu_sampler_draws_what_torch_draws(B, V, dtype):
    """Same RNG, same thresholds: the C++ sampler picks the torch path's tokens (greedy with the
    row split across threads at V=151936, temperature, every filter, per-row parameters)."""
    zl, zc, zn = (t.to(dtype) for t in make_logits(B, V, seed=21, device="cpu"))  # the C++ sampler: CPU tensors
    cases = [dict(), dict(temperature=0.8, seed=3, offset=5), dict(temperature=1.0, top_k=50, top_p=0.9, seed=1),
             dict(temperature=0.7, min_p=0.05, seed=2, num_samples=3),
             dict(temperature=torch.linspace(0, 1.5, B), top_k=torch.arange(B, dtype=torch.int64) * 3,
                  top_p=0.8, seed=torch.arange(B) + 11, offset=2**33 + 1)]
    for kw in cases:
        a = steer_sample(zl, zc, zn, backend="torch", return_llm_max_prob=True, **kw)
        b = steer_sample(zl, zc, zn, backend="cpu", return_llm_max_prob=True, **kw)
        assert torch.equal(a[0], b[0]), kw
        torch.testing.assert_close(a[1], b[1], atol=2e-5, rtol=0)
        torch.testing.assert_close(a[2], b[2], atol=0, rtol=1e-5)


def test_triton_splits_merge_in_launch():
    from costeer_kernels import SteerConfig
    from costeer_kernels.sampling import make_params
    from costeer_kernels.triton.sample import sample_triton

    zl, zc, zn = make_logits(2, 3000, seed=11, device=DEVICE)
    zl2, zc2, zn2, hp = zl, zc, zn, SteerConfig().packed(None, zl.device)
    for tau, k in ((0.0, 0), (1.0, 0), (0.8, 20)):
        p = make_params(2, zl2.device, tau, k, 1.0, 0.0, 4, 0)
        one = sample_triton(zl2, zc2, zn2, hp, p, True, 1, num_splits=1)
        four = sample_triton(zl2, zc2, zn2, hp, p, True, 1, num_splits=4)
        assert torch.equal(one[0], four[0]) and torch.equal(one[3], four[3])
        assert torch.allclose(one[1], four[1], atol=1e-6) and torch.allclose(one[2], four[2], rtol=1e-6)


def test_gumbel_noise_is_standard_gumbel():
    """The torch Philox noise: finite, Gumbel mean and variance (bit agreement with tl.philox is
    checked through identical draws in test_backends_draw_the_same_tokens)."""
    g = gumbel_noise(1000, torch.tensor([0, 1]), torch.tensor([2**40 + 3]), torch.tensor([7]))
    assert torch.isfinite(g).all()
    assert abs(g.mean().item() - 0.5772) < 0.1 and abs(g.var().item() - 1.6449) < 0.3


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_inputs(backend):
    zl, zc, zn = make_logits(3, 32, seed=12, device=device_for(backend))
    bad = zc.clone()
    bad[1, 4] = float("nan")
    with pytest.raises(ValueError, match="row 1.*slm_ctx_logits contains NaN"):
        steer_sample(zl, bad, zn, temperature=1.0, backend=backend)
    tok, lp = steer_sample(zl, bad, zn, temperature=1.0, top_k=3, backend=backend, validate=False)
    assert tok[1].item() == -1 and torch.isnan(lp[1])
    assert tok[0].item() >= 0 and tok[2].item() >= 0
    empty = zl.clone()
    empty[2] = float("-inf")
    with pytest.raises(ValueError, match="row 2"):
        steer_sample(empty, zc, zn, backend=backend)


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=2.0), "min_p"),
        (dict(top_p=torch.tensor([0.5, 1.2])), "top_p"),
        (dict(temperature=torch.tensor([1.0, -1.0])), "temperature"),
        (dict(top_k=torch.tensor([1, -1])), "top_k"),
        (dict(top_k=torch.tensor([1, 2, 3])), "top_k"),
        (dict(offset=-1), "offset"),
    ],
)
def test_bad_parameters(kw, name):
    zl, zc, zn = make_logits(2, 16, seed=13, device=DEVICE)
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    with pytest.raises(ValueError, match=name):
        steer_sample(zl, zc, zn, backend="torch", **kw)


def test_vector_inputs_and_default_backend():
    zl, zc, zn = make_logits(1, 20, seed=14, device=DEVICE)
    tok, lp = steer_sample(zl[0], zc[0], zn[0])
    assert tok.dim() == 0 and lp.dim() == 0
    assert tok.item() == steer(zl, zc, zn).argmax(-1).item()
    from costeer_kernels.registry import resolve

    assert resolve("sample", None, zl.device) == ("cpu" if _cpp_sampler() else "triton" if DEVICE == "cuda" else "torch")


def test_kernel_compiles_for_sm90_without_spills():
    """Ahead-of-time compile of the Triton kernel for sm_90 (no GPU needed), in a subprocess
    because this process runs Triton's interpreter."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json; from costeer_kernels.triton.sample import aot_compile; print(json.dumps(aot_compile('bf16', 1)))"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    if r.returncode != 0 and ("cuobjdump" in r.stderr or "ptxas" in r.stderr or "No such file" in r.stderr):
        pytest.skip(f"no CUDA toolchain in this Triton install: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    usage = json.loads(r.stdout.strip().splitlines()[-1])
    assert usage["local"] == 0, usage
