"""The decoding loop's request, result, streaming and error types.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence


# ---------------------------------------------------------------------------------------------
# Requests, results, timings


@dataclass
class Request:
    """One generation request. ``context`` is private: only the small model ever reads it."""

    prompt: str
    context: str = ""
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off


@dataclass
class StepTiming:
    """Seconds spent in one decoding step of a batch."""

    step: int
    llm_s: float  # waiting for the LLM's logits (its compute, or the rest of the round trip)
    llm_compute_s: float  # the LLM's own compute (server-side for costeer serve; 0 if unknown)
    transport_s: float  # round trip minus LLM compute (remote streams)
    local_s: float  # small-model passes (and the co-batched LLM rows)
    steer_s: float  # the fused op: projection of the delta, steering and the token choice
    sample_s: float  # the token ids' read-back, detokenization, stop checks
    total_s: float


@dataclass
class Result:
    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "eos", "stop", "length", "error"
    error: Optional[str] = None
    prompt_tokens: int = 0
    context_tokens: int = 0
    elapsed_s: float = 0.0
    prefill_s: float = 0.0
    timings: List[StepTiming] = field(default_factory=list)  # shared by the requests of a batch
    steered_tokens: int = 0  # tokens chosen from the steered distribution (the rest: gated off)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def timing_summary(self) -> Dict[str, float]:
        """Mean milliseconds per decoding step of each component."""
        n = max(1, len(self.timings))
        keys = ("llm_s", "llm_compute_s", "transport_s", "local_s", "steer_s", "sample_s", "total_s")
        out = {k.replace("_s", "_ms"): 1e3 * sum(getattr(t, k) for t in self.timings) / n for k in keys}
        out["steps"] = len(self.timings)
        out["prefill_ms"] = 1e3 * self.prefill_s
        return out


@dataclass
class TextChunk:
    index: int  # which request
    text: str  # new text (may be "")
    done: bool = False
    result: Optional[Result] = None  # set when done
    token: Optional[int] = None  # the token id this step appended to the request (None: none, e.g. EOS)


class GenerationError(RuntimeError):
    """Generation failed part way; ``results`` hold everything produced before the failure."""

    def __init__(self, message: str, results: List[Result]):
        super().__init__(message)
        self.results = results
