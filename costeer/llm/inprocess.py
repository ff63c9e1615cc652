"""The LLM as a Hugging Face causal LM in this process, with its own KV cache (the embedded default).
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional


from ..kv import KVBatch
import torch

import costeer_kernels
from costeer_kernels import SteerConfig

from .base import DraftStep, LLMStep, LLMStream, _check_prompts


_UNSTEERED = SteerConfig(T=0)

# ---------------------------------------------------------------------------------------------
# (a) in process


class InProcessLLMStream(LLMStream):
    """A Hugging Face causal LM in this process with one KV cache for the batch.

    ``threaded=True`` runs each step in one worker thread so that ``send`` returns at once (useful
    when the LLM is on a GPU). On a CPU the default is ``False``: the forward runs inside ``recv``,
    because two threads of PyTorch CPU work fight over the cores (measured: slower, not faster).
    """

    def __init__(self, loaded, threaded: Optional[bool] = None):
        self.loaded = loaded
        self.name = loaded.name
        self.vocab_size = loaded.vocab_size
        self.max_len = loaded.max_len
        self.eos_token_ids = list(loaded.eos_token_ids)
        self.threaded = (loaded.device.type != "cpu") if threaded is None else bool(threaded)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="costeer-llm") if self.threaded else None
        self._kv: Optional[KVBatch] = None
        self._pending = None

    def _run(self, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        return out, time.perf_counter() - t0

    def _start(self, fn, *args):
        self._pending = self._pool.submit(self._run, fn, *args) if self._pool else (fn, args)

    def open(self, prompts):
        prompts = _check_prompts(prompts, self.vocab_size, self.max_len)
        self._kv = KVBatch(self.loaded.model, prompts, self.loaded.pad_token_id, max_len=self.max_len)
        self._start(self._kv.prefill)

    def send(self, tokens):
        if self._kv is None:
            raise RuntimeError("send before open")
        self._start(self._kv.step, list(tokens))

    def recv(self) -> LLMStep:
        if self._pending is None:
            raise RuntimeError("recv without a pending request")
        t0 = time.perf_counter()
        pending, self._pending = self._pending, None
        if isinstance(pending, Future):
            out, compute = pending.result()
        else:
            out, compute = self._run(pending[0], *pending[1])
        if isinstance(out, DraftStep):
            out.compute_s, out.wait_s = compute, time.perf_counter() - t0
            return out
        return LLMStep(logits=out.logits, compute_s=compute, wait_s=time.perf_counter() - t0)

    # -- speculative steering (costeer/speculative.py): several positions per request

    def score_send(self, tokens, rollback: int = 0) -> None:
        """Drop the last ``rollback`` positions of every row, then append ``tokens`` (one
        equal-length list per row) in one forward; ``score_recv`` returns their logits."""
        if self._kv is None:
            raise RuntimeError("score_send before open")
        rows = [[int(t) for t in r] for r in tokens]
        if len(rows) != self._kv.rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
            raise ValueError(f"score: one equal-length (>= 1) token list per row ({self._kv.rows} rows)")
        self._start(self._score, rows, int(rollback))

    def _score(self, rows, rollback: int):
        self._kv.rollback(rollback)
        out = self._kv.extend(rows)
        out.logits = out.logits.reshape(-1, out.logits.shape[-1])  # row-major (row, appended token)
        return out

    def score_recv(self, n: int) -> LLMStep:
        """The answer to ``score_send``: logits [rows * n, V]."""
        return self.recv()

    def draft_send(self, tokens, n: int, rollback: int = 0, live=None) -> None:
        """Drop the last ``rollback`` positions of every row, append ``tokens`` (one per row) and
        continue every row greedily for ``n`` positions (n one-token forwards); ``draft_recv``
        returns the continuation and its rows (``DraftStep``). Afterwards the cache holds the
        appended token and the first n - 1 drafted ones. ``live`` is accepted for the OpenAI
        stream's signature: no row ends early here."""
        if self._kv is None:
            raise RuntimeError("draft_send before open")
        toks = [int(t) for t in tokens]
        if len(toks) != self._kv.rows:
            raise ValueError(f"tokens has {len(toks)} entries, expected one per row ({self._kv.rows})")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        self._start(self._draft, toks, n, int(rollback))

    def _draft(self, tokens, n: int, rollback: int) -> DraftStep:
        self._kv.rollback(rollback)
        rows, ids = [], []
        for i in range(n):
            logits = self._kv.step(tokens).logits
            # the LLM's own greedy choice, picked by the kernels' sampler as every token (unsteered)
            w = logits[:, :self.vocab_size]  # never a padded column of the head
            c = costeer_kernels.steer_sample(w, w, w, _UNSTEERED, validate=False)[0]
            rows.append(logits)
            ids.append(c)
            if i < n - 1:
                tokens = c
        logits = torch.stack(rows, 1)
        return DraftStep(logits=logits.reshape(-1, logits.shape[-1]), tokens=torch.stack(ids, 1))

    def draft_recv(self, n: int) -> DraftStep:
        """The answer to ``draft_send``: ``DraftStep`` with tokens [rows, n], logits [rows * n, V]."""
        out = self.recv()
        if not isinstance(out, DraftStep) or out.tokens.shape[1] != n:
            raise RuntimeError(f"draft_recv({n}) does not match the pending request")
        return out

    def close(self):
        self._kv = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
