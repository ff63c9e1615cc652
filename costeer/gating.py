"""Confidence gating (the paper's AdaCoSteer): stop the small-model passes once the LLM is sure.

The paper's rule: once the LLM's top next-token probability exceeds 0.9 for 3 consecutive tokens,
steering (and with it both small-model forward passes) is switched off for the rest of the
sequence. ``ConfidenceGate`` keeps that state per row of a batch, as tensors on the device of the
probabilities it is fed, so the update never reads anything back to the host.

Per step, with the LLM's max probability p of each row (``steer_sample(...,
return_llm_max_prob=True)`` gives it from the kernel's online-softmax statistics):

    streak = streak + 1 if p > threshold else 0        (NaN counts as not confident)
    off    = off or streak >= patience                 (reenable=False: off stays off)
    off    = streak >= patience                        (reenable=True: a drop turns it back on)
    needs_slm = not off                                 (what update() returns)

``update`` returns a bool tensor [B]: True where the next step still needs the small model's
passes. A row that is off can be steered with a zero delta (or, better, skipped: the plain LLM
distribution is what steering with c_T = 0 gives).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["ConfidenceGate"]


class ConfidenceGate:
    """Per-row AdaCoSteer gate.

    Args:
        threshold: a step counts as confident when the LLM's max probability is > threshold
            (paper: 0.9).
        patience: consecutive confident steps before the small model is switched off (paper: 3).
        reenable: False (paper): off for the rest of the sequence. True: a non-confident step
            switches the row back on (the streak restarts from zero).
    """

    def __init__(self, threshold: float = 0.9, patience: int = 3, reenable: bool = False):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (0.0 <= threshold <= 1.0):
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        self.threshold = float(threshold)
        self.patience = int(patience)
        self.reenable = bool(reenable)
        self.streak: Optional[torch.Tensor] = None  # int32 [B]
        self.off: Optional[torch.Tensor] = None  # bool [B]

    def _init(self, batch: int, device) -> None:
        self.streak = torch.zeros(batch, dtype=torch.int32, device=device)
        self.off = torch.zeros(batch, dtype=torch.bool, device=device)

    def reset(self, rows: Optional[torch.Tensor] = None, batch: Optional[int] = None, device=None) -> None:
        """Start new sequences: every row (``rows=None``), or the rows where the bool mask [B] is
        True (continuous batching). ``batch`` (and ``device``) pre-allocate the state."""
        if rows is None:
            if batch is None:
                self.streak = None
                self.off = None
            else:
                self._init(batch, device if device is not None else "cpu")
            return
        if self.streak is None:
            self._init(rows.shape[0], rows.device)
        rows = rows.to(device=self.streak.device, dtype=torch.bool)
        self.streak = torch.where(rows, torch.zeros_like(self.streak), self.streak)
        self.off = self.off & ~rows

    @property
    def needs_slm(self) -> Optional[torch.Tensor]:
        """bool [B]: rows whose next step still needs the small-model passes (None before the first step)."""
        return None if self.off is None else ~self.off

    def update(self, llm_max_prob: torch.Tensor, active: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Feed one step's LLM max probability per row (float [B]); returns ``needs_slm`` (bool [B]).

        ``active`` (optional bool [B]): rows that actually produced a token this step; the others
        keep their state (finished or padded rows).
        """
        if not isinstance(llm_max_prob, torch.Tensor) or llm_max_prob.dim() != 1:
            raise ValueError("llm_max_prob must be a 1-D tensor [B]")
        if self.streak is None or self.streak.shape[0] != llm_max_prob.shape[0]:
            if self.streak is not None:
                raise ValueError(
                    f"llm_max_prob has {llm_max_prob.shape[0]} rows but the gate tracks {self.streak.shape[0]}; "
                    "call reset() for a new batch"
                )
            self._init(llm_max_prob.shape[0], llm_max_prob.device)
        confident = llm_max_prob > self.threshold  # NaN -> False
        streak = torch.where(confident, self.streak + 1, torch.zeros_like(self.streak))
        streak = torch.clamp(streak, max=self.patience)  # bounded, no overflow on long sequences
        if self.reenable:
            off = streak >= self.patience
        else:
            off = self.off | (streak >= self.patience)
        if active is not None:
            active = active.to(device=streak.device, dtype=torch.bool)
            streak = torch.where(active, streak, self.streak)
            off = torch.where(active, off, self.off)
        self.streak, self.off = streak, off
        return ~off

    def __repr__(self) -> str:
        return f"ConfidenceGate(threshold={self.threshold}, patience={self.patience}, reenable={self.reenable})"
