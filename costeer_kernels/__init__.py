"""costeer_kernels: fused CoSteer steering ops (Triton, C++/CUDA, PyTorch) registered as torch ops.

Public API:
    SteerConfig, steer_coefficient   the update's settings and its closed-form coefficient c_T
    reference_steer                  the literal T-step loop (ground truth of every test)
    steer                            the fused op (torch.ops.costeer.steer / steer_out)
    available_backends               which backends run in this process
"""
from .config import SteerConfig, steer_coefficient
from .dispatch import available_backends
from .ops import steer
from .reference import closed_form_steer, reference_steer

__all__ = [
    "SteerConfig",
    "steer_coefficient",
    "reference_steer",
    "closed_form_steer",
    "steer",
    "available_backends",
]
__version__ = "0.1.0"
