"""The op as torch sees it: registered, with a fake implementation, traceable by torch.compile."""
import pytest
import torch

import costeer_kernels as ck
from costeer_kernels import SteerConfig, steer

from ..conftest import DEVICE
from .helpers import make_logits


def test_registered_ops():
    assert hasattr(torch.ops.costeer, "steer")
    assert hasattr(torch.ops.costeer, "steer_out")


def test_opcheck():
    zl, zc, zn = make_logits(2, 33, device=DEVICE)
    hp = SteerConfig().packed(None, DEVICE)
    torch.library.opcheck(torch.ops.costeer.steer.default, (zl, zc, zn, hp, "closed_form", "torch"))
    out = torch.empty(2, 33, device=DEVICE)
    torch.library.opcheck(torch.ops.costeer.steer_out.default, (zl, zc, zn, hp, out, "closed_form", "torch"))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        zl, zc, zn = (torch.empty(4, 1000, dtype=torch.bfloat16) for _ in range(3))
        hp = torch.empty(1, 5, dtype=torch.float64)
        out, status = torch.ops.costeer.steer(zl, zc, zn, hp, "closed_form", "auto")
        assert out.shape == (4, 1000) and out.dtype == torch.float32
        assert status.shape == (4,) and status.dtype == torch.int32


def test_compile_fullgraph_traces_a_function_calling_the_op():
    hp = SteerConfig().packed(None, DEVICE)

    def step(zl, zc, zn):
        out, status = torch.ops.costeer.steer(zl, zc, zn, hp, "closed_form", "torch")
        return out.argmax(-1), status

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    zl, zc, zn = make_logits(3, 257, device=DEVICE)
    tok, status = compiled(zl, zc, zn)
    expect = steer(zl, zc, zn, backend="torch").argmax(-1)
    assert torch.equal(tok, expect) and torch.all(status == 0)


def test_compile_fullgraph_public_api_without_validation():
    def step(zl, zc, zn):
        return steer(zl, zc, zn, backend="torch", validate=False)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    zl, zc, zn = make_logits(2, 100, device=DEVICE)
    assert torch.allclose(compiled(zl, zc, zn), steer(zl, zc, zn, backend="torch"))
