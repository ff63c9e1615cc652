"""Test setup shared by every test module.

Without a GPU, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set
before triton is imported anywhere, hence here, before any project import.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def device():
    return DEVICE


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none on this machine)")
