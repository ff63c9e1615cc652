"""Fuzzing the steer op with hypothesis: random shapes, dtypes, strides, masks, magnitudes, ties and
per-row settings. Valid input: no crash, no NaN, the float64 answer within the accuracy rule.
Invalid input: a ValueError, never a crash. >= 2000 cases per backend (FUZZ_CASES to change)."""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import costeer_kernels as ck
from costeer_kernels import SteerConfig, closed_form_steer, steer

from ..conftest import DEVICE
from .helpers import config_to, device_for, masked_err

CASES = int(os.environ.get("FUZZ_CASES", "2000"))
BACKENDS = [b for b in ck.available_backends()]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FUZZ = settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def steer_inputs(draw):
    B = draw(st.integers(1, 4))
    V = draw(st.sampled_from([1, 2, 3, 7, 16, 31, 64, 100, 257, 1000, 4097]))
    dtypes = [draw(st.sampled_from(DTYPES)) for _ in range(3)]
    magnitude = draw(st.sampled_from(["normal", "large", "extreme", "ties"]))
    pad = draw(st.sampled_from([0, 0, 1, 13]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    rows = []
    for dt in dtypes:
        base = torch.randn(B, V + pad, generator=g, dtype=torch.float64)
        if magnitude == "large":
            base = base * 30
        elif magnitude == "extreme":
            limit = 65504.0 if dt == torch.float16 else 1e30
            base = torch.sign(base) * limit * torch.rand(B, V + pad, generator=g, dtype=torch.float64)
        elif magnitude == "ties":
            base = torch.round(base)  # many exactly equal logits
        rows.append(base.to(dt)[:, :V])
    zl, zc, zn = rows
    if draw(st.booleans()):
        m = torch.rand(B, V, generator=g) < draw(st.sampled_from([0.1, 0.5, 0.95]))
        m[torch.arange(B), torch.randint(0, V, (B,), generator=g)] = False
        zl = zl.masked_fill(m, float("-inf"))
    if draw(st.booleans()):
        shared = torch.rand(B, V, generator=g) < 0.3
        zc, zn = zc.masked_fill(shared, float("-inf")), zn.masked_fill(shared, float("-inf"))
    per_row = draw(st.booleans())
    if per_row:
        cfg = SteerConfig(
            T=torch.randint(0, 30, (B,), generator=g),
            alpha=torch.rand(B, generator=g, dtype=torch.float64) * 3,
            beta=torch.rand(B, generator=g, dtype=torch.float64) * 2,
            lam=torch.rand(B, generator=g, dtype=torch.float64) * 3 + 0.05,
            eta=torch.rand(B, generator=g, dtype=torch.float64) * 20 + 0.05,
        )
    else:
        cfg = SteerConfig(T=draw(st.integers(0, 60)), alpha=draw(st.floats(0, 4)), beta=draw(st.floats(0, 3)),
                          lam=draw(st.floats(0.05, 4)), eta=draw(st.floats(0.05, 30)))
    return zl, zc, zn, cfg  # CPU tensors: _on() moves them to the backend's device


def _on(case, backend):
    """The case on the backend's device: CPU tensors for the C++ CPU kernel, DEVICE otherwise."""
    dev = device_for(backend)
    zl, zc, zn, cfg = case
    return zl.to(dev), zc.to(dev), zn.to(dev), config_to(cfg, dev)


def _check_valid(out, zl, zc, zn, cfg, ref):
    assert not torch.isnan(out).any(), "NaN output for valid input"
    base = closed_form_steer(zl.cpu(), zc.cpu(), zn.cpu(), _cpu(cfg), dtype=torch.float32)
    e_out, e_base = masked_err(out, ref), masked_err(base, ref)
    # float32 resolves the steered logits x only to ~|x| * 2^-24: when that spacing is large (|x|
    # ~ 1e29 here), one rounding (an FMA or not) moves log-probs by up to that much, so the error
    # rule is relative to it.
    ulp = 2.0 ** -23 * _steered_x(zl, zc, zn, cfg).abs().nan_to_num(0.0, 0.0, 0.0).max().item()
    assert e_out <= 2 * e_base + 1e-6 + 1e-6 * ref[torch.isfinite(ref)].abs().max().item() + 4 * ulp, (e_out, e_base)
    # fp32 log-probs of magnitude M are exact to ~M * 6e-8 only: normalization error scales too.
    lse = torch.logsumexp(out.double().cpu(), dim=-1)
    M = ref[torch.isfinite(ref)].abs().max().item()
    assert torch.allclose(lse, torch.zeros_like(lse), atol=1e-4 + 1e-6 * M + 4 * ulp)


def _cpu(cfg):
    if not cfg.per_row:
        return cfg
    return SteerConfig(*(v.cpu() if isinstance(v, torch.Tensor) else v for v in cfg.values()))


def _steered_x(zl, zc, zn, cfg):
    """The steered logits x = z_L + c_T (z_c - z_n) in float64."""
    c = torch.as_tensor(_cpu(cfg).coefficient, dtype=torch.float64).reshape(-1, 1)
    zl64, zc64, zn64 = (t.cpu().double() for t in (zl, zc, zn))
    d = torch.where(zc64 == zn64, torch.zeros_like(zc64), zc64 - zn64)
    return zl64 + torch.where(c == 0, torch.zeros_like(d), c * d)


def _steered_valid(zl, zc, zn, cfg):
    """Whether the float64 closed form gives a valid distribution (a live token, no +inf) whose
    steered logits fit float32 (the kernels compute in fp32; c_T explodes when alpha >> lam)."""
    ref = closed_form_steer(zl.cpu(), zc.cpu(), zn.cpu(), _cpu(cfg), dtype=torch.float64)
    if not bool(torch.isfinite(ref).any(-1).all()) or bool(torch.isnan(ref).any()):
        return None
    c = torch.as_tensor(_cpu(cfg).coefficient, dtype=torch.float64).reshape(-1, 1)
    zl64, zc64, zn64 = (t.cpu().double() for t in (zl, zc, zn))
    d = torch.where(zc64 == zn64, torch.zeros_like(zc64), zc64 - zn64)
    cd = torch.where(c == 0, torch.zeros_like(d), c * d)
    x = zl64 + cd
    fin = torch.isfinite(x)
    # The steering term itself counts too: on a token the LLM masks (-inf), float32 turns a term
    # beyond its range into -inf + inf = NaN.
    if bool((c.abs() > 1e36).any()) or bool((x[fin].abs() > 1e36).any()) or bool(
            (cd[torch.isfinite(cd)].abs() > 1e36).any()):
        return "overflow"  # at the edge of float32: raising or a valid answer are both right
    return ref


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(case=steer_inputs())
def test_fuzz_valid_inputs(backend, case):
    zl, zc, zn, cfg = _on(case, backend)
    ref = _steered_valid(zl, zc, zn, cfg)
    if isinstance(ref, str):
        try:
            out = steer(zl, zc, zn, cfg, backend=backend)
        except ValueError:
            return
        assert not torch.isnan(out).any()
        return
    if ref is None:
        with pytest.raises(ValueError):
            steer(zl, zc, zn, cfg, backend=backend)
        return
    out = steer(zl, zc, zn, cfg, backend=backend)
    _check_valid(out, zl, zc, zn, cfg, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=max(CASES // 10, 50), deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=steer_inputs(), poison=st.sampled_from(["nan", "+inf", "noctx-only -inf", "all -inf"]),
       which=st.integers(0, 2), mode=st.sampled_from(["closed_form", "iterative"]))
def test_fuzz_invalid_inputs_raise(backend, case, poison, which, mode):
    zl, zc, zn, cfg = _on(case, backend)
    if not isinstance(_steered_valid(zl, zc, zn, cfg), torch.Tensor):
        return  # another row is already invalid or at the float32 edge: the poisoned row may not be named first
    if backend == "triton" and DEVICE == "cpu" and mode == "iterative" and zl.shape[1] > 300:
        mode = "closed_form"  # the interpreter runs T sweeps of numpy per row: keep CI fast
    rows = [zl.clone(), zc.clone(), zn.clone()]
    B, V = zl.shape
    r = B - 1
    if poison == "nan":
        rows[which][r, V // 2] = float("nan")
    elif poison == "+inf":
        rows[which][r, V // 2] = float("inf")
    elif poison == "noctx-only -inf":
        rows[1][r, V // 2] = 0.0
        rows[2][r, V // 2] = float("-inf")
        if not cfg.per_row and cfg.coefficient == 0:
            return  # no steering: the small model's rows are not used
        if cfg.per_row and float(cfg.coefficient[r]) == 0:
            return
    else:
        rows[0][r] = float("-inf")
    with pytest.raises(ValueError, match=f"row {r}"):
        steer(*rows, cfg, backend=backend, mode=mode)
    out = steer(*rows, cfg, backend=backend, mode=mode, validate=False)
    assert torch.isnan(out[r]).all()
