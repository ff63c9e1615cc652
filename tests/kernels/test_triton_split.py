"""Rows split across programs: the partial (max, sum-exp, status) merge, run in the interpreter.

The barrier merge spins on other programs, which the interpreter (one program at a time)
cannot run; it shares _merge_partials/_finish_row with the "last program merges" path tested
here, and is compiled for sm_80/sm_90 in test_triton_aot.py.
"""
import pytest
import torch

import costeer_kernels as ck
from costeer_kernels import SteerConfig

from ..conftest import DEVICE, HAS_CUDA
from .helpers import check_accuracy, make_logits

pytestmark = pytest.mark.skipif("triton" not in ck.available_backends(), reason="triton not importable")


def _launch(zl, zc, zn, cfg, S, merge):
    from costeer_kernels.triton.steer import steer_triton

    out = torch.empty(zl.shape, dtype=torch.float32, device=zl.device)
    hp = cfg.packed(zl.shape[0] if cfg.per_row else None, zl.device)
    status = steer_triton(zl, zc, zn, hp, out, num_splits=S, merge=merge)
    return out, status


MERGES = ["last"] + (["barrier"] if HAS_CUDA else [])


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("S", [2, 3, 7, 40])
@pytest.mark.parametrize("shape", [(1, 49152), (3, 4099), (2, 152064)], ids=str)
def test_split_rows_match_reference(shape, S, merge):
    zl, zc, zn = make_logits(*shape, dtype=torch.bfloat16, device=DEVICE, mask_frac=0.05, seed=S)
    out, status = _launch(zl, zc, zn, SteerConfig(), S, merge)
    assert torch.all(status == 0)
    check_accuracy(out, zl, zc, zn)


@pytest.mark.parametrize("merge", MERGES)
def test_split_status_merge(merge):
    """Each bit raised in one slice reaches the row's status; bad rows come out all-NaN."""
    zl, zc, zn = make_logits(4, 20000, device=DEVICE)
    zl[0, 19999] = float("nan")  # last slice only
    zn[1, 3] = float("nan")  # first slice only
    zl[2] = float("-inf")  # empty row
    out, status = _launch(zl, zc, zn, SteerConfig(), 5, merge)
    from costeer_kernels import status as st

    assert status.tolist() == [st.NAN_LLM, st.NAN_NOCTX, st.EMPTY_ROW, 0]
    assert torch.isnan(out[:3]).all() and not torch.isnan(out[3]).any()


@pytest.mark.parametrize("merge", MERGES)
def test_repeated_launches_reset_the_counters(merge):
    zl, zc, zn = make_logits(2, 9000, device=DEVICE)
    first, _ = _launch(zl, zc, zn, SteerConfig(), 4, merge)
    for _ in range(3):
        again, _ = _launch(zl, zc, zn, SteerConfig(), 4, merge)
        assert torch.equal(first, again)
    from costeer_kernels.triton.steer import _LOCKS

    # Both merges leave the per-row counts (even slots) at 0; the barrier's generations (odd
    # slots) only grow.
    assert int(_LOCKS[zl.device][:8:2].abs().sum()) == 0


def test_last_merge_ignores_the_barrier_generations():
    """On a GPU the barrier merge (the default) and the last-program merge share the per-row
    counters; the barrier's generation slots keep growing, and a last-program launch after it
    must count only in the count slots (the bug the first H200 run found: rows >= 1 unmerged)."""
    from costeer_kernels.triton.steer import _lock_buffer

    zl, zc, zn = make_logits(3, 4099, device=DEVICE)
    lock = _lock_buffer(zl.device, 6)
    lock[1:8:2] += 7  # as if barrier launches had run before
    gens = lock[:8].clone()
    out, status = _launch(zl, zc, zn, SteerConfig(), 3, "last")
    assert torch.all(status == 0)
    check_accuracy(out, zl, zc, zn)
    assert torch.equal(lock[:8], gens)


@pytest.mark.skipif(HAS_CUDA, reason="checks the interpreter's refusal")
def test_barrier_refused_in_interpreter():
    zl, zc, zn = make_logits(1, 100)
    with pytest.raises(ValueError, match="barrier"):
        _launch(zl, zc, zn, SteerConfig(), 2, "barrier")
