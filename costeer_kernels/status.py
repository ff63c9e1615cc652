"""Per-row status bits that every backend reports, and the errors they turn into.

The kernels derive these from statistics they compute anyway (no extra pass over the inputs).
``steer(validate=True)`` reads them back with one host sync and raises; with ``validate=False``
invalid rows come out all-NaN and nothing is read back.
"""
from __future__ import annotations

import torch

NAN_LLM = 1
NAN_CTX = 2
NAN_NOCTX = 4
POSINF_LLM = 8
POSINF_CTX = 16
POSINF_NOCTX = 32
EMPTY_ROW = 64  # no finite steered logit: the LLM row is all -inf (or every live token is banned)
NOCTX_MASK = 128  # a steered logit is +inf/NaN: slm_noctx -inf where slm_ctx is finite, or float32 overflow
BAD_HPARAMS = 256

_MESSAGES = (
    (NAN_LLM, ValueError, "llm_logits contains NaN"),
    (NAN_CTX, ValueError, "slm_ctx_logits contains NaN"),
    (NAN_NOCTX, ValueError, "slm_noctx_logits contains NaN"),
    (POSINF_LLM, ValueError, "llm_logits contains +inf (only -inf, a banned token, is allowed)"),
    (POSINF_CTX, ValueError, "slm_ctx_logits contains +inf (only -inf is allowed)"),
    (POSINF_NOCTX, ValueError, "slm_noctx_logits contains +inf (only -inf is allowed)"),
    (EMPTY_ROW, ValueError, "llm_logits has no finite entry left to sample (all -inf, or every finite token banned by slm_ctx_logits)"),
    (NOCTX_MASK, ValueError, "a steered logit is +inf or NaN: slm_noctx_logits is -inf where slm_ctx_logits is finite, or the logits overflow float32"),
    (BAD_HPARAMS, ValueError, "cfg has an invalid per-row setting (T must be an integer in [0, 100000], lam > 0, eta > 0, all finite)"),
)


def describe(status_row: int) -> str:
    return "; ".join(msg for bit, _, msg in _MESSAGES if status_row & bit)


def raise_for_status(status: torch.Tensor) -> None:
    """One host sync: raise ValueError naming the first invalid row and what is wrong with it."""
    if not bool(status.any()):
        return
    bad = torch.nonzero(status).flatten().tolist()
    row = bad[0]
    value = int(status[row].item())
    more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
    raise ValueError(f"row {row}{more}: {describe(value)}")


def check_status(status: torch.Tensor, validate: bool, rename=None) -> None:
    """``validate=True``: raise for invalid rows. Eager: one host sync, a ValueError naming the
    first invalid row and why (``rename`` may reword the message for the caller's argument
    names). Under torch.compile a host read cannot be traced, so the check becomes an in-graph
    assertion (``torch._assert_async``): a RuntimeError without the row's details (on CUDA a
    device-side assert, fatal to the process: use ``validate=False`` and read the status there)."""
    if not validate:
        return
    if torch.compiler.is_compiling():
        torch._assert_async((status == 0).all(), COMPILED_MESSAGE)
        return
    if rename is None:
        raise_for_status(status)
        return
    try:
        raise_for_status(status)
    except ValueError as exc:
        raise ValueError(rename(str(exc))) from None


COMPILED_MESSAGE = ("costeer: a row is invalid (NaN/+inf inputs, no finite LLM logit, or an invalid per-row "
                    "setting); call the op eagerly for the row and the reason")
