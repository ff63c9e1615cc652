"""The closed form equals the literal loop: the fact the fast paths rest on."""
import pytest
import torch

from costeer_kernels import SteerConfig, closed_form_steer, reference_steer

from .helpers import make_logits


@pytest.mark.parametrize("T", [0, 1, 5, 20, 50])
@pytest.mark.parametrize("V", [1, 7, 4099])
def test_closed_form_equals_loop_float64(T, V):
    zl, zc, zn = make_logits(3, V, scale=5.0, seed=T)
    cfg = SteerConfig(T=T, alpha=1.3, beta=0.7, lam=1.5, eta=4.0)
    loop = reference_steer(zl, zc, zn, cfg, dtype=torch.float64)
    closed = closed_form_steer(zl, zc, zn, cfg, dtype=torch.float64)
    assert (loop - closed).abs().max().item() < 1e-10


def test_closed_form_equals_loop_real_width():
    zl, zc, zn = make_logits(2, 151936, scale=3.0, seed=1)
    loop = reference_steer(zl, zc, zn, dtype=torch.float64)
    closed = closed_form_steer(zl, zc, zn, dtype=torch.float64)
    assert (loop - closed).abs().max().item() < 1e-10


def test_masks_follow_the_documented_convention():
    zl = torch.tensor([[0.0, 1.0, float("-inf"), 2.0, 0.5]])
    zc = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf"), 0.3]])
    zn = torch.tensor([[1.0, 0.0, 0.0, float("-inf"), 0.1]])
    out = reference_steer(zl, zc, zn, dtype=torch.float64)
    assert torch.isneginf(out[0, 1])  # banned by the small model with context
    assert torch.isneginf(out[0, 2])  # banned by the LLM
    assert torch.isfinite(out[0, 3])  # shared small-model mask: no delta
    closed = closed_form_steer(zl, zc, zn, dtype=torch.float64)
    fin = torch.isfinite(out)
    assert torch.equal(fin, torch.isfinite(closed))
    assert (out[fin] - closed[fin]).abs().max() < 1e-12
    assert out.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_per_row_settings():
    zl, zc, zn = make_logits(3, 100, seed=4)
    cfg = SteerConfig(T=torch.tensor([0, 3, 20]), eta=torch.tensor([10.0, 2.0, 5.0]))
    out = reference_steer(zl, zc, zn, cfg, dtype=torch.float64)
    for i in range(3):
        row_cfg = SteerConfig(T=int(cfg.T[i]), eta=float(cfg.eta[i]))
        single = reference_steer(zl[i], zc[i], zn[i], row_cfg, dtype=torch.float64)
        assert (out[i] - single).abs().max() < 1e-12


def test_T0_is_llm_log_softmax():
    zl, zc, zn = make_logits(2, 50)
    out = reference_steer(zl, zc, zn, SteerConfig(T=0), dtype=torch.float64)
    assert torch.allclose(out, torch.log_softmax(zl.double(), -1))
