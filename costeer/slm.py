"""Batched KV-cached forward passes: the local small-model runner.

``KVBatch`` keeps R left-padded rows in ONE KV cache: the prefill runs all prompts in one forward
(attention mask zero on the padding, position ids counted from each row's first real token), and
every decode step feeds one token per row in one forward. It returns the final logits and the
final (post-norm) hidden states, the input of the later fused projection op ``steer_from_hidden``.

``LocalRunner`` is the small model's side of CoSteer: for B requests it holds the with-context and
the without-context prompt of each request as 2B rows of one batch (optionally plus B rows of the
public prompt when the "LLM" is the very same in-process model: co-batching, one forward for all
three passes), so one decode step of the small model is one forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from .kv import KVBatch, StepOutput


@dataclass
class LocalOutput:
    """One step of the local passes for B requests, grouped by role ([B, V] / [B, H] each)."""

    logits: Dict[str, torch.Tensor]
    hidden: Dict[str, Optional[torch.Tensor]]

    @property
    def ctx_logits(self) -> torch.Tensor:
        return self.logits["ctx"]

    @property
    def noctx_logits(self) -> torch.Tensor:
        return self.logits["noctx"]


class LocalRunner:
    """Several groups of B prompts each (e.g. "ctx", "noctx"; optionally "llm") in ONE KV batch.

    ``step(tokens)`` takes one token per request and feeds it to every row of that request.
    ``head=False`` returns the final hidden states only (``logits`` stays empty) when the model
    splits into base + vocabulary projection: the caller projects (``steer_from_hidden`` reads
    the head's weight once for both passes).
    """

    def __init__(self, model, groups: Dict[str, List[List[int]]], pad_token_id: int, max_len: Optional[int] = None,
                 head: bool = True):
        if not groups:
            raise ValueError("groups must name at least one group of prompts")
        sizes = {name: len(p) for name, p in groups.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"every group needs one prompt per request, got sizes {sizes}")
        self.batch = next(iter(sizes.values()))
        self.names = list(groups)
        rows: List[List[int]] = []
        for name in self.names:
            rows.extend(groups[name])
        self.kv = KVBatch(model, rows, pad_token_id, max_len=max_len)
        # Without a split there are no hidden states: the full model's logits are the output.
        self.head = bool(head) or self.kv.head is None
        self.last: Optional[LocalOutput] = None

    def _split(self, out: StepOutput) -> LocalOutput:
        B = self.batch
        logits, hidden = {}, {}
        for g, name in enumerate(self.names):
            if out.logits is not None:
                logits[name] = out.logits[g * B:(g + 1) * B]
            hidden[name] = None if out.hidden is None else out.hidden[g * B:(g + 1) * B]
        self.last = LocalOutput(logits, hidden)
        return self.last

    def prefill(self) -> LocalOutput:
        return self._split(self.kv.prefill(self.head))

    def step(self, tokens: Sequence[int]) -> LocalOutput:
        ids = [int(t) for t in tokens]
        if len(ids) != self.batch:
            raise ValueError(f"tokens has {len(ids)} entries, expected one per request ({self.batch})")
        # Every group's rows get the same token: one tensor from the list (Tensor.repeat costs tens of us a step)
        return self._split(self.kv.step(torch.tensor(ids * len(self.names), dtype=torch.long), self.head))

    def extend(self, tokens: Sequence[Sequence[int]]) -> LocalOutput:
        """Append n tokens per request (``tokens`` [B][n]) to every group in ONE forward; the
        output's tensors are per position, [B, n, V] / [B, n, H] (speculative rounds whose drafts
        come from the cloud: all of them are known before the local passes run)."""
        rows = [[int(t) for t in r] for r in tokens]
        if len(rows) != self.batch or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
            raise ValueError(f"tokens needs one equal-length (>= 1) list per request ({self.batch})")
        return self._split(self.kv.extend(torch.tensor(rows * len(self.names), dtype=torch.long), self.head))

    def edit(self, rollback: Sequence[int], tokens: Sequence[Sequence[int]]) -> LocalOutput:
        """Per request: forget its last ``rollback[i]`` tokens and append ``tokens[i]`` in every
        group (``KVBatch.edit``). A request that appends nothing keeps its previous output."""
        if len(rollback) != self.batch or len(tokens) != self.batch:
            raise ValueError(f"rollback and tokens need one entry per request ({self.batch})")
        G = len(self.names)
        out = self.kv.edit(list(rollback) * G, [list(t) for t in tokens] * G, self.head)
        prev = self.last
        if prev is not None and any(not t for t in tokens):
            keep = torch.tensor([bool(t) for t in tokens] * G)[:, None]
            old_l = torch.cat([prev.logits[n] for n in self.names]) if prev.logits else None
            old_h = torch.cat([prev.hidden[n] for n in self.names]) if prev.hidden.get(self.names[0]) is not None else None
            if out.logits is None and out.hidden is None:  # nobody appended anything
                return prev
            if old_l is not None and out.logits is not None:
                out.logits = torch.where(keep, out.logits, old_l)
            if old_h is not None and out.hidden is not None:
                out.hidden = torch.where(keep.to(old_h.device), out.hidden, old_h)
        return self._split(out)
