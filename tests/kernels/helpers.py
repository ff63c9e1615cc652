"""Shared input generators and the accuracy rule of the op issue."""
from __future__ import annotations

import torch

from costeer_kernels import SteerConfig, closed_form_steer, reference_steer

from ..conftest import DEVICE

P_MIN = 1e-6  # errors are measured over tokens with reference probability >= P_MIN
EPS32 = torch.finfo(torch.float32).eps
ULPS = 4  # float32 ulps of the reference's magnitude that any fp32 path may be off by
ISAS = ["portable", "avx2", "avx512"]  # the C++ CPU kernels' instruction-set paths (conftest.py: isa)


def device_for(backend) -> str:
    """Where a test's inputs live for ``backend``: the C++ CPU kernel ("cpu") needs CPU tensors
    (and rejects others), every other backend runs on the test device (cuda on a GPU machine)."""
    return "cpu" if backend == "cpu" else DEVICE


def config_to(cfg, device):
    """``cfg`` with its per-row tensors on ``device`` (SteerConfig.packed rejects a mismatch)."""
    if cfg is None or not cfg.per_row:
        return cfg
    return SteerConfig(*(v.to(device) if isinstance(v, torch.Tensor) else v for v in cfg.values()))


def make_logits(B, V, dtype=torch.float32, scale=3.0, seed=0, device="cpu", row_stride=None, mask_frac=0.0):
    """Three [B, V] logit rows (LLM, SLM with context, SLM without); optional padded row stride."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        if row_stride is None:
            t = torch.randn(B, V, generator=g) * scale
        else:
            t = (torch.randn(B, row_stride, generator=g) * scale)[:, :V]
        out.append(t)
    if mask_frac > 0:
        m = torch.rand(B, V, generator=g) < mask_frac
        m[:, 0] = False  # keep each row alive
        out[0][m] = float("-inf")
        shared = torch.rand(B, V, generator=g) < mask_frac
        out[1][shared] = float("-inf")
        out[2][shared] = float("-inf")
    return [t.to(device=device, dtype=dtype) if row_stride is None else t.to(device=device).to(dtype) for t in out]


def masked_err(x: torch.Tensor, ref64: torch.Tensor) -> float:
    """Max abs error over tokens with reference probability >= P_MIN (-inf must match exactly)."""
    x = x.double().cpu()
    ref64 = ref64.cpu()
    neg = torch.isneginf(ref64)
    assert torch.equal(torch.isneginf(x) & neg, neg) or not neg.any(), "a -inf token came out finite"
    keep = ref64.exp() >= P_MIN
    if not keep.any():
        return 0.0
    return (x - ref64)[keep].abs().max().item()


def ulp_slack(ref64: torch.Tensor) -> float:
    """A few float32 ulps of the largest |reference| over the measured tokens: the eager fp32
    error can be accidentally tiny (a lucky summation order), while a kernel that sums in
    another order (vector lanes, split rows, another ISA) is off by that much, legitimately."""
    ref64 = ref64.cpu()
    keep = ref64.exp() >= P_MIN
    if not keep.any():
        return 0.0
    return ULPS * EPS32 * ref64[keep].abs().max().item()


def check_accuracy(out, zl, zc, zn, cfg=None, mode="closed_form", ref=None, base=None, slack=None):
    """The op issue's rule: error <= 2x that of the eager fp32 formula + 1e-6 + a few float32
    ulps of the reference's magnitude (``ulp_slack``); same argmax."""
    if ref is None:
        ref = reference_steer(zl, zc, zn, cfg, dtype=torch.float64)
    if base is None:
        if mode == "closed_form":
            base = closed_form_steer(zl, zc, zn, cfg, dtype=torch.float32)
        else:
            base = reference_steer(zl, zc, zn, cfg, dtype=torch.float32)
    e_out, e_base = masked_err(out, ref), masked_err(base, ref)
    bound = 2 * e_base + 1e-6 + (slack or ulp_slack)(ref)
    assert e_out <= bound, f"error {e_out:.3g} > 2 x eager fp32 error {e_base:.3g} + 1e-6 + ulps = {bound:.3g}"
    assert not torch.isnan(out).any()
    # Same argmax, except for exact ties in the reference.
    a_out = out.double().cpu().argmax(-1)
    ref_c = ref.cpu()
    picked = ref_c.gather(-1, a_out.unsqueeze(-1)).squeeze(-1)
    assert torch.all(picked >= ref_c.max(-1).values - 1e-5)
    return e_out, e_base
