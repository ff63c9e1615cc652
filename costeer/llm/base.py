"""The interface every LLM source implements (``LLMStream``), its step type and errors, and the
top-k helpers shared by the sources.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


TOPK_POLICIES = ("restrict", "floor")


# Largest vocabulary a server may announce: a client allocates rows x vocabulary floats per step
# (top-k answers are made dense), so a hostile number must not become a huge allocation. Real
# vocabularies are below 2**18.
MAX_VOCAB = 2**22


@dataclass
class LLMStep:
    """The LLM's answer for one step of a batch."""

    logits: torch.Tensor  # float32 [B, V] (log-probs or logits; -inf / floor outside a top-k)
    compute_s: float = 0.0  # time the LLM itself computed (server-side for remote streams)
    wait_s: float = 0.0  # time ``recv`` blocked the caller
    roundtrip_s: float = 0.0  # from the request leaving to the answer being decoded (remote)

    @property
    def transport_s(self) -> float:
        """Network + serialization overhead of the round trip (remote streams), else 0."""
        return max(0.0, self.roundtrip_s - self.compute_s) if self.roundtrip_s else 0.0


@dataclass
class DraftStep(LLMStep):
    """The answer to ``draft_send``: the LLM's own greedy continuation of every row and its rows.

    ``tokens`` int64 [B, n]: the LLM's greedy tokens c_1..c_n; ``logits`` [B * n, V] row-major:
    row (b, i) is the LLM's distribution at c_i's position, given the sequence and c_1..c_{i-1}
    (so row i is the LLM's answer only for a sequence that keeps c_1..c_{i-1}). n is smaller than
    requested when the engine ended a row early (its end-of-sequence token): the shortest row's
    count, every row cut to it."""

    tokens: torch.Tensor = None


class StreamError(ConnectionError):
    """The LLM source failed or refused (network error, server error message)."""


class LLMStream:
    """Base class; see the module docstring for the protocol."""

    name: str = "llm"
    vocab_size: int = 0
    max_len: Optional[int] = None
    eos_token_ids: Sequence[int] = ()
    remote: bool = False

    # open/send/recv are what a source must provide; a subclass that lacks one fails loudly at the
    # first call, naming the class, rather than at import (sources are also built by users' code)
    def open(self, prompts: Sequence[Sequence[int]]) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not implement LLMStream.open")

    def send(self, tokens: Sequence[int]) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not implement LLMStream.send")

    def recv(self) -> LLMStep:
        raise NotImplementedError(f"{type(self).__name__} does not implement LLMStream.recv")

    def finish(self) -> None:
        """End the current batch; a stream that can be reused stays open (default: close)."""
        self.close()

    @property
    def reusable(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_prompts(prompts, vocab_size: int, max_len: Optional[int]) -> List[List[int]]:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        p = [int(x) for x in p]
        if not p:
            raise ValueError(f"prompts[{i}] is empty")
        if vocab_size and any(x < 0 or x >= vocab_size for x in p):
            raise ValueError(f"prompts[{i}] has token ids outside [0, {vocab_size})")
        if max_len is not None and len(p) >= max_len:
            raise ValueError(f"prompts[{i}] has {len(p)} tokens; the LLM's window is {max_len}")
        out.append(p)
    return out


def dense_from_topk(ids: torch.Tensor, logprobs: torch.Tensor, vocab_size: int, policy: str = "restrict") -> torch.Tensor:
    """[B, V] float32 log-probs from top-k ``ids`` / ``logprobs`` [B, k] under ``policy``."""
    if policy not in TOPK_POLICIES:
        raise ValueError(f"topk_policy must be one of {TOPK_POLICIES}, got {policy!r}")
    B, k = ids.shape
    if policy == "restrict" or k >= vocab_size:
        out = torch.full((B, vocab_size), float("-inf"), dtype=torch.float32)
    else:
        lp = logprobs.double()
        rest = (1.0 - lp.exp().sum(-1)).clamp(min=1e-30)
        floor = torch.log(rest / (vocab_size - k))
        floor = torch.minimum(floor, lp.min(-1).values)
        out = floor.float()[:, None].expand(B, vocab_size).clone()
    out.scatter_(1, ids.long(), logprobs.float())
    return out
