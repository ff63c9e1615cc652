"""``costeer serve`` side of speculative steering (``costeer/speculative.py``): one op, "score".

Client -> server
    {"op": "score", "sid": S, "n": n, "rollback": r}      payload int32[B * n] (row-major [B, n])
        drop the last r positions of every row of session S (the drafts rejected last round), then
        append the n tokens of each row in ONE forward
                                                         -> logits, "rows": B * n
Server -> client
    the usual "logits" frame with rows = B * n: row b * n + i holds the next-token logits after
    token i of row b (full or top-k, the session's format)

Rollback rides on the next request, so a speculative round is still one round trip. The op keeps
the session's limits: tokens in range, window never exceeded, at most ``MAX_SCORE_TOKENS`` per row
and request, and the rollback never reaches the first token of a row. The answer is charged to the
server's memory budget (``B * n`` rows of logits) before any work; more than ``prefill_chunk``
tokens (all rows counted) are scored in several forwards between other sessions' steps.

The op uses the server's public hooks only (``LLMServer.session``, ``answer_logits``, ``record``);
the client's frame builder is ``costeer.serve.protocol.score_frame``.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Dict

import torch

from . import protocol as P

MAX_SCORE_TOKENS = 64


async def handle_score(server, header: dict, payload, sessions: Dict[int, dict]):
    """Answer a "score" frame for ``LLMServer`` ``server``: ``(frame, its budget charge)`` (raises
    ProtocolError on a bad request, Busy when the memory budget cannot take it)."""
    sid = header.get("sid")
    sess = server.session("score", sid, sessions)  # the step op's checks, expiry included
    n, r = header.get("n"), header.get("rollback", 0)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SCORE_TOKENS:
        raise P.ProtocolError(f"score: 'n' must be an integer in [1, {MAX_SCORE_TOKENS}]")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise P.ProtocolError("score: 'rollback' must be an integer >= 0")
    rows = sess["rows"]
    toks = P.int32_array(payload, rows * n)
    server.record.tokens(header, toks.tolist())
    V = server.loaded.vocab_size
    if toks.min() < 0 or toks.max() >= V:
        raise P.ProtocolError(f"score: token ids must lie in [0, {V})")
    kv = sess["kv"]
    if r and int(kv.lengths.min()) - r < 1:
        raise P.ProtocolError(f"score: cannot roll back {r} positions")
    if int(kv.lengths.max()) - r + n > server.loaded.max_len:
        raise P.ProtocolError(f"score: the session would exceed the model's window of {server.loaded.max_len} tokens")
    grid = toks.reshape(rows, n)
    columns = max(1, server.prefill_chunk // rows)

    def run():
        # ``n`` positions in forwards of at most ``prefill_chunk`` tokens (one forward for the
        # usual few drafts), so a large score never holds the model thread for long
        yield from ()
        kv.rollback(r)
        if n <= columns:
            logits = kv.extend(grid.tolist()).logits
        else:  # filled in place: one [rows, n, V] tensor, not the chunks and their concatenation
            logits = None
            for a in range(0, n, columns):
                if a:
                    yield
                part = kv.extend(grid[:, a:a + columns].tolist()).logits
                if logits is None:
                    logits = torch.empty((rows, n, part.shape[-1]), dtype=part.dtype)
                logits[:, a:a + part.shape[1]] = part
        return SimpleNamespace(logits=logits.reshape(rows * n, logits.shape[-1]))

    positions = kv.cached - r + n
    return await server.answer_logits(run(), sid, sess, rows * n, max(positions, kv.cached), f"score of session {sid}")
