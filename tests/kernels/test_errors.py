"""Bad input: a ValueError or TypeError naming the argument, never a crash or a silent NaN."""
import pytest
import torch

import costeer_kernels as ck
from costeer_kernels import SteerConfig, steer

from ..conftest import DEVICE
from .helpers import device_for

BACKENDS = list(ck.available_backends())


def _good(B=2, V=50, device=DEVICE):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, V, generator=g).to(device) for _ in range(3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "which,bad,exc,match",
    [
        (0, lambda t: t[:, :-1], ValueError, "shape"),
        (1, lambda t: t[:1], ValueError, "slm_ctx_logits"),
        (2, lambda t: t[:, :-1], ValueError, "slm_noctx_logits"),
        (0, lambda t: t[None], ValueError, "llm_logits"),
        (1, lambda t: t[0], ValueError, "slm_ctx_logits"),
        (0, lambda t: t.long(), TypeError, "llm_logits"),
        (1, lambda t: t.double(), TypeError, "slm_ctx_logits"),
        (2, lambda t: t.numpy() if t.device.type == "cpu" else t.cpu().numpy(), TypeError, "slm_noctx_logits"),
        (2, lambda t: t.to("meta"), ValueError, "slm_noctx_logits"),
    ],
)
def test_metadata_errors(backend, which, bad, exc, match):
    args = _good(device=device_for(backend))
    args[which] = bad(args[which])
    with pytest.raises(exc, match=match):
        steer(*args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["closed_form", "iterative"])
@pytest.mark.parametrize(
    "which,value,match",
    [
        (0, float("nan"), "llm_logits contains NaN"),
        (1, float("nan"), "slm_ctx_logits contains NaN"),
        (2, float("nan"), "slm_noctx_logits contains NaN"),
        (0, float("inf"), r"llm_logits contains \+inf"),
        (1, float("inf"), r"slm_ctx_logits contains \+inf"),
        (2, float("inf"), r"slm_noctx_logits contains \+inf"),
        (2, float("-inf"), "slm_noctx_logits is -inf"),
    ],
)
def test_value_errors_from_kernel_statistics(backend, mode, which, value, match):
    args = _good(3, 41, device=device_for(backend))
    args[which][1, 17] = value
    with pytest.raises(ValueError, match=match):
        steer(*args, backend=backend, mode=mode)
    # validate=False: no host sync, the bad row is all-NaN and the others are intact.
    out = steer(*args, backend=backend, mode=mode, validate=False)
    assert torch.isnan(out[1]).all()
    assert not torch.isnan(out[0]).any() and not torch.isnan(out[2]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_llm_row(backend):
    args = _good(device=device_for(backend))
    args[0][0] = float("-inf")
    with pytest.raises(ValueError, match="row 0.*llm_logits has no finite entry"):
        steer(*args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_per_row_hparams(backend):
    dev = device_for(backend)
    args = _good(3, device=dev)
    cfg = SteerConfig(lam=torch.tensor([2.0, -1.0, 2.0], device=dev))
    with pytest.raises(ValueError, match="row 1.*per-row setting"):
        steer(*args, cfg, backend=backend)
    with pytest.raises(ValueError, match="one per row"):
        steer(*_good(2, device=dev), cfg, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_checks(backend):
    dev = device_for(backend)
    args = _good(device=dev)
    with pytest.raises(ValueError, match="out has shape"):
        steer(*args, backend=backend, out=torch.empty(2, 49, device=dev))
    with pytest.raises(TypeError, match="out must be float32"):
        steer(*args, backend=backend, out=torch.empty(2, 50, dtype=torch.float16, device=dev))
    with pytest.raises(ValueError, match="unit stride"):
        steer(*args, backend=backend, out=torch.empty(50, 2, device=dev).t())


def test_option_errors():
    args = _good()
    with pytest.raises(ValueError, match="mode"):
        steer(*args, mode="fast")
    with pytest.raises(ValueError, match="backend"):
        steer(*args, backend="nope")
    with pytest.raises(TypeError, match="cfg"):
        steer(*args, {"T": 3})
    with pytest.raises(ValueError, match="V = 0"):
        steer(*[torch.empty(2, 0) for _ in range(3)])


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    if "triton" not in ck.available_backends():
        pytest.skip("triton not importable")
    import costeer_kernels.triton.steer as ts

    monkeypatch.setattr(ts, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        steer(*[t.cpu() for t in _good()], backend="triton")


@pytest.mark.parametrize("mode", ["closed_form", "iterative"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_coefficient_still_steers_infinite_deltas(backend, mode):
    """c_T = 1.1e-168 is 0 in float32, but not 0: a lone no-context -inf still makes the steered
    logit +inf, so every backend (and the sampler) names the row (found by the fuzzer)."""
    from costeer_kernels import steer_sample

    cfg = SteerConfig(T=1, alpha=0.0, beta=2.26e-168, lam=1.0, eta=1.0)
    dev = device_for(backend)
    zl, zc = torch.zeros(2, 3, device=dev), torch.zeros(2, 3, device=dev)
    zn = zc.clone()
    zn[1, 1] = float("-inf")
    with pytest.raises(ValueError, match="row 1"):
        steer(zl, zc, zn, cfg, backend=backend, mode=mode)
    out = steer(zl[:1], zc[:1], zn[:1], cfg, backend=backend, mode=mode)  # finite deltas: no effect
    torch.testing.assert_close(out, torch.log_softmax(zl[:1], -1))
    if mode == "closed_form":
        with pytest.raises(ValueError, match="row 1"):
            steer_sample(zl, zc, zn, cfg)
