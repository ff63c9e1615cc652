"""ConfidenceGate: the paper's AdaCoSteer rule, vectorized over rows, state kept on the device."""
import pytest
import torch

from costeer.gating import ConfidenceGate


def _run(gate, steps):
    return [gate.update(torch.tensor(p, dtype=torch.float32)).tolist() for p in steps]


def test_paper_rule_three_confident_steps_then_off_for_good():
    gate = ConfidenceGate()  # threshold 0.9, patience 3, no re-enable
    out = _run(gate, [[0.95, 0.95], [0.95, 0.5], [0.95, 0.95], [0.2, 0.95], [0.1, 0.95]])
    # row 0: confident at steps 0, 1, 2 -> off after step 2, stays off although confidence drops
    assert [r[0] for r in out] == [True, True, False, False, False]
    # row 1: the streak restarts at step 1, three in a row at steps 2, 3, 4
    assert [r[1] for r in out] == [True, True, True, True, False]


def test_strictly_greater_than_threshold_and_nan():
    gate = ConfidenceGate(threshold=0.9, patience=1)
    assert _run(gate, [[0.9, float("nan"), 0.9001]]) == [[True, True, False]]


def test_reenable():
    gate = ConfidenceGate(threshold=0.8, patience=2, reenable=True)
    out = _run(gate, [[0.9], [0.9], [0.9], [0.5], [0.9], [0.9]])
    assert [r[0] for r in out] == [True, False, False, True, True, False]


def test_active_mask_and_reset_rows():
    gate = ConfidenceGate(patience=2)
    gate.update(torch.tensor([0.99, 0.99, 0.99]))
    # row 1 finished: its state is frozen
    needs = gate.update(torch.tensor([0.99, 0.99, 0.1]), active=torch.tensor([True, False, True]))
    assert needs.tolist() == [False, True, True]
    gate.reset(rows=torch.tensor([True, False, False]))
    assert gate.needs_slm.tolist() == [True, True, True]
    assert gate.update(torch.tensor([0.99, 0.99, 0.99])).tolist() == [True, False, True]


def test_state_stays_on_device_and_is_bool():
    gate = ConfidenceGate()
    p = torch.rand(16)
    needs = gate.update(p)
    assert needs.dtype == torch.bool and needs.shape == (16,) and needs.device == p.device
    for _ in range(1000):  # long sequences: the streak is bounded
        gate.update(torch.ones(16))
    assert int(gate.streak.max()) <= gate.patience and not gate.needs_slm.any()


def test_batch_size_change_needs_reset():
    gate = ConfidenceGate()
    gate.update(torch.rand(4))
    with pytest.raises(ValueError, match="reset"):
        gate.update(torch.rand(5))
    gate.reset()
    assert gate.update(torch.rand(5)).shape == (5,)


@pytest.mark.parametrize("kw", [dict(threshold=1.5), dict(threshold=-0.1), dict(patience=0), dict(patience=2.0)])
def test_bad_settings(kw):
    with pytest.raises(ValueError):
        ConfidenceGate(**kw)


def test_with_steer_sample_max_prob():
    from costeer_kernels.sampling import steer_sample

    zl = torch.randn(3, 50)
    zl[0, 7] += 20.0  # a confident row
    z0 = torch.zeros_like(zl)
    gate = ConfidenceGate(patience=1)
    _, _, mp = steer_sample(zl, z0, z0, backend="torch", return_llm_max_prob=True)
    assert gate.update(mp).tolist() == [False, True, True]
