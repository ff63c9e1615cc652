import math

import pytest
import torch

from costeer_kernels import SteerConfig, steer_coefficient
from costeer_kernels.config import coefficient_rows

# c_T from ../shared/notes/closed_form.md (alpha=2, beta=1, lambda=2, eta=10).
PUBLISHED = {0: 0.0, 1: 0.476190, 2: 0.731707, 5: 1.125616, 10: 1.448781, 20: 1.783257, 50: 2.234015, 200: 2.923433}


@pytest.mark.parametrize("T,c", sorted(PUBLISHED.items()))
def test_coefficient_matches_published_table(T, c):
    assert SteerConfig(T=T).coefficient == pytest.approx(c, abs=1e-6)


def test_defaults_are_the_papers():
    cfg = SteerConfig()
    assert (cfg.T, cfg.alpha, cfg.beta, cfg.lam, cfg.eta) == (20, 2.0, 1.0, 2.0, 10.0)
    assert isinstance(cfg.coefficient, float)


@pytest.mark.parametrize(
    "kwargs,exc",
    [
        ({"T": -1}, ValueError),
        ({"T": 2.5}, ValueError),
        ({"T": "3"}, TypeError),
        ({"lam": 0.0}, ValueError),
        ({"eta": -1.0}, ValueError),
        ({"alpha": float("nan")}, ValueError),
        ({"beta": float("inf")}, ValueError),
        ({"alpha": True}, TypeError),
        ({"alpha": torch.ones(2, 2)}, ValueError),
    ],
)
def test_invalid_settings_raise_naming_the_field(kwargs, exc):
    with pytest.raises(exc, match=next(iter(kwargs))):
        SteerConfig(**kwargs)


def test_per_row_coefficients_match_scalar_recurrence():
    T = torch.tensor([0, 1, 5, 20, 50])
    alpha = torch.tensor([2.0, 0.5, 1.0, 3.0, 2.0])
    cfg = SteerConfig(T=T, alpha=alpha)
    got = cfg.coefficient
    assert got.dtype == torch.float64
    for i in range(5):
        assert got[i].item() == pytest.approx(steer_coefficient(int(T[i]), float(alpha[i]), 1.0, 2.0, 10.0), rel=1e-14)


def test_invalid_per_row_values_give_nan_coefficient():
    hp = torch.tensor([[20, 2, 1, 2, 10], [20, 2, 1, 0, 10], [1.5, 2, 1, 2, 10]], dtype=torch.float64)
    c = coefficient_rows(hp)
    assert math.isfinite(c[0].item()) and math.isnan(c[1].item()) and math.isnan(c[2].item())


def test_packed_rows_length_mismatch():
    cfg = SteerConfig(alpha=torch.ones(3))
    with pytest.raises(ValueError, match="alpha"):
        cfg.packed(4, "cpu")
