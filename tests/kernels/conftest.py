"""Fixtures of the C++ CPU kernels' tests: the loaded extension and each instruction-set path."""
import pytest
import torch

from costeer_kernels._extension import build_status

from .helpers import ISAS


@pytest.fixture(scope="module")
def ext():
    s = build_status()
    assert s["loaded"], f"C++ extension unavailable: {s['reason']}"
    return s


@pytest.fixture(params=ISAS)
def isa(ext, request):
    """Runs a test on one instruction-set path of the CPU kernels (skipped where the CPU lacks it)."""
    paths = list(torch.ops.costeer_ext.cpu_isas())
    if request.param not in paths:
        pytest.skip(f"the {request.param} path needs CPU features this machine lacks (paths here: {', '.join(paths)})")
    before = torch.ops.costeer_ext.cpu_isa()
    assert torch.ops.costeer_ext.cpu_isa(request.param) == request.param
    yield request.param
    torch.ops.costeer_ext.cpu_isa(before)


@pytest.fixture(params=["permute", "nibbles"])
def q4_1_form(ext, request):
    """Runs a test with each form of the avx512 path's Q4_1 weights (csrc/cpu_isa.cpp; the other
    paths always use the nibbles, so there both runs check the same code)."""
    before = torch.ops.costeer_ext.cpu_q4_1_form()
    assert torch.ops.costeer_ext.cpu_q4_1_form(request.param) == request.param
    yield request.param
    torch.ops.costeer_ext.cpu_q4_1_form(before)
