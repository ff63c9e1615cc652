"""steer() on every backend against the float64 reference loop (the op issue's accuracy rule)."""
import pytest
import torch

import costeer_kernels as ck
from costeer_kernels import SteerConfig, steer

from ..conftest import DEVICE
from .helpers import check_accuracy, config_to, device_for, make_logits

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FAST = [b for b in ck.available_backends() if b != "triton" or DEVICE == "cuda"]
# Under the interpreter Triton executes numpy per block: modest shapes there, the widest rows
# through the compiled backends.
TRITON = ["triton"] if "triton" in ck.available_backends() else []
# Every backend once (on a GPU FAST already holds "triton"). The C++ CPU kernel ("cpu") runs on
# CPU tensors everywhere (device_for), the others on DEVICE.
ALL = list(dict.fromkeys(FAST + TRITON))
WIDE = [(1, 151936), (3, 152064), (64, 151936)]
SHAPES = [(1, 1), (3, 7), (64, 4099), (3, 49152)]
INTERP_SHAPES = [(1, 1), (3, 7), (3, 4099), (1, 49152), (1, 152064)]


def _run(backend, shape, dtype, mode="closed_form", cfg=None, scale=3.0, seed=0, **kw):
    B, V = shape
    dev = device_for(backend)
    zl, zc, zn = make_logits(B, V, dtype, scale=scale, seed=seed, device=dev, **kw)
    cfg = config_to(cfg, dev)
    out = steer(zl, zc, zn, cfg, backend=backend, mode=mode)
    assert out.dtype == torch.float32 and out.shape == (B, V)
    return check_accuracy(out, zl, zc, zn, cfg, mode)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + WIDE[:2], ids=str)
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mode", ["closed_form", "iterative"])
def test_matches_reference(backend, shape, dtype, mode):
    _run(backend, shape, dtype, mode)


@pytest.mark.parametrize("backend", FAST)
def test_batch64_widest(backend):
    _run(backend, WIDE[2], torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", INTERP_SHAPES, ids=str)
@pytest.mark.parametrize("backend", TRITON)
def test_triton_matches_reference(backend, shape, dtype):
    _run(backend, shape, dtype)


@pytest.mark.parametrize("shape", [(1, 7), (3, 4099), (1, 49152)], ids=str)
@pytest.mark.parametrize("backend", TRITON)
def test_triton_iterative(backend, shape):
    _run(backend, shape, torch.float32, mode="iterative", cfg=SteerConfig(T=5))


@pytest.mark.parametrize("T", [0, 1, 5, 20, 50])
@pytest.mark.parametrize("scale", [1.0, 8.0, 30.0])
@pytest.mark.parametrize("backend", ALL)
def test_hyperparameters_and_scales(backend, T, scale):
    g = torch.Generator().manual_seed(T)
    cfg = SteerConfig(
        T=T,
        alpha=float(torch.rand(1, generator=g) * 3),
        beta=float(torch.rand(1, generator=g) * 2),
        lam=float(torch.rand(1, generator=g) * 3 + 0.1),
        eta=float(torch.rand(1, generator=g) * 20 + 0.5),
    )
    _run(backend, (3, 1031), torch.float32, cfg=cfg, scale=scale, seed=T)
    _run(backend, (2, 517), torch.float32, mode="iterative", cfg=cfg, scale=scale, seed=T)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("mode", ["closed_form", "iterative"])
def test_per_row_settings(backend, mode):
    B = 4
    cfg = SteerConfig(
        T=torch.tensor([0, 1, 7, 20], device=device_for(backend)),
        alpha=torch.tensor([2.0, 0.5, 1.0, 3.0], device=device_for(backend)),
        eta=torch.tensor([10.0, 1.0, 3.0, 0.7], device=device_for(backend)),
        beta=0.8,
    )
    _run(backend, (B, 777), torch.float32, mode=mode, cfg=cfg)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masks_and_strided_rows(backend, dtype):
    _run(backend, (3, 3001), dtype, mask_frac=0.3, row_stride=3001 + 77)
    _run(backend, (2, 1001), dtype, mode="iterative", mask_frac=0.2, cfg=SteerConfig(T=4))


@pytest.mark.parametrize("backend", ALL)
def test_mixed_dtypes_and_1d(backend):
    zl, zc, zn = make_logits(1, 2053, device=device_for(backend))
    out = steer(zl[0], zc[0].half(), zn[0].bfloat16(), backend=backend)
    assert out.shape == (2053,)
    check_accuracy(out[None], zl, zc.half(), zn.bfloat16())


@pytest.mark.parametrize("backend", ALL)
def test_out_argument_with_row_stride(backend):
    zl, zc, zn = make_logits(3, 999, device=device_for(backend))
    buf = torch.full((3, 1200), 7.0, device=device_for(backend))
    res = steer(zl, zc, zn, backend=backend, out=buf[:, :999])
    assert res.data_ptr() == buf.data_ptr()
    assert torch.all(buf[:, 999:] == 7.0)
    check_accuracy(buf[:, :999], zl, zc, zn)


@pytest.mark.parametrize("backend", ALL)
def test_delta_given_directly(backend):
    zl, zc, zn = make_logits(2, 500, device=device_for(backend))
    out = steer(zl, zc - zn, None, backend=backend)
    ref = steer(zl, zc, zn, backend="torch")
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("backend", ALL)
def test_small_model_ban_and_shared_mask(backend):
    dev = device_for(backend)
    zl = torch.tensor([[0.0, 1.0, float("-inf"), 2.0, 0.5]], device=dev)
    zc = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf"), 0.3]], device=dev)
    zn = torch.tensor([[1.0, 0.0, 0.0, float("-inf"), 0.1]], device=dev)
    out = steer(zl, zc, zn, backend=backend).cpu()
    ref = ck.reference_steer(zl.cpu(), zc.cpu(), zn.cpu(), dtype=torch.float64)
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref))
    fin = torch.isfinite(ref)
    assert (out.double()[fin] - ref[fin]).abs().max() < 1e-5


@pytest.mark.parametrize("backend", ALL)
def test_T0_returns_llm_log_softmax_exactly(backend):
    zl, zc, zn = make_logits(2, 300, device=device_for(backend))
    zc[0, 5] = float("-inf")  # c_0 = 0: no steering at all, so no ban either
    out = steer(zl, zc, zn, SteerConfig(T=0), backend=backend)
    assert torch.allclose(out, torch.log_softmax(zl.float(), -1), atol=2e-6)
