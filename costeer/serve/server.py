"""``costeer serve``: a WebSocket server hosting a Hugging Face causal LM (the "cloud" side).

One persistent connection per client; every message is one binary frame (``costeer.serve.protocol``).
A client opens a session with the public prompts' token ids (one row per request), receives the
next-token logits (full vocabulary in float16/bfloat16/float32, or top-k ids + log-probs), sends
back the chosen token of every row, and so on. Each session has its own KV cache (a ``KVBatch``),
so concurrent sessions never share state: each produces exactly what it produces alone.

Sessions are bound to the connection that opened them: a client's ``sid`` is a handle inside its
own connection only, so no other connection can read or continue it. Each session also gets a
random 128-bit server id (``session`` in the answer to ``open``, for logs), never accepted as input.
A client that lost its connection (or whose server restarted) resumes by opening again with
``replay``: the prompt plus every token it already fed; the server re-runs those steps and answers
the logits the lost request would have got (bit-identical: the same forward calls in the same order).

Memory budget (``--memory-budget``, default half of the machine's available memory when the server
starts): every session's KV cache (bytes per token from the model config: 2 x layers x KV heads x
head dim x dtype size, times rows x positions), every pending reply (the float32 logits and the
encoded frame, until the socket took it) and every connection's input buffer (two frames of
``--max-frame-bytes``) are charged against it. A request that does not fit is refused with ``busy``
before any work; the charge is released on close, idle expiry and disconnect.

Scheduling: all model work runs in ONE thread (PyTorch CPU work from several threads fights over the
cores), one forward at a time. Long work is cut into forwards: a prompt prefill into chunks of
``--prefill-chunk`` tokens (all rows counted), a replay into its steps, a ``score`` into chunks of
the same size; between two forwards of a long job the scheduler runs the forwards of newly arrived
requests (alternating between new and continuing jobs), so a small session's step waits for at most
one chunk however big the others' requests are; a step and its small answer take one turn. Chunk
boundaries depend only on the request and the server's chunk size, so a replay recomputes exactly
what the lost session computed. A connection that closes while its request computes cancels it:
its job stops at its next forward.

Limits (each refusal is an ``error`` frame naming the limit; ``code`` is ``"bad_request"``,
``"busy"`` or ``"expired"``): frame size (``--max-frame-bytes``; a larger frame closes that
connection with code 1009), prompt length (``--max-prompt-tokens``, never more than the model's
window), rows per session, sessions per connection, sessions in all (``--max-total-sessions``:
``busy``), connections (``--max-connections``: ``busy``), top-k size. Idle sessions are freed after
``--idle-timeout`` s (their KV cache goes); a connection that sends nothing for that long is closed;
a client that does not read an answer within ``--send-timeout`` s is disconnected.

Authentication: with ``--token`` (or ``COSTEER_TOKEN``) every client must send
``Authorization: Bearer TOKEN`` in the WebSocket handshake (HTTP 401 otherwise). Binding a
non-loopback address without a token is refused at start.

TLS: ``--ssl-certfile`` / ``--ssl-keyfile`` serve ``wss://`` (the standard library's ``ssl``).

Nothing received is unpickled or evaluated (JSON headers, fixed-dtype numeric payloads).

``--record FILE`` (debugging, privacy tests): appends one JSON line per received frame, with the
frame's raw bytes (base64), its header and the token ids it carried.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import ipaddress
import json
import os
import secrets
import signal
import sys
import threading
import time
from collections import deque
from typing import Dict, Optional

from . import protocol as P

TOKEN_ENV = "COSTEER_TOKEN"
# Tokens per forward of a long job, all rows counted. On a CPU a forward of n tokens costs about n
# steps once n passes a few tokens (compute-bound), so a small chunk keeps a victim's wait near one
# step; 16 = the default --max-rows, the size of one step of a full session (docs/reliability.md).
DEFAULT_PREFILL_CHUNK = 16
# Frames a connection may have buffered before the server reads them (websockets' ``max_queue``):
# with one queued and one being received, a connection holds at most two frames of input.
INPUT_FRAMES = 2
SEND_FRAGMENT = 2**20  # bytes per fragment of a large answer
ENCODE_BLOCK = 2**21  # logits (rows x vocabulary) encoded per slice of the model thread
# Budget bytes an answer holds beyond its frame while it is sent: one fragment serialized by
# websockets, one in the transport's buffer, and the header.
SEND_SLACK = 2 * SEND_FRAGMENT + 4096
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


class Busy(P.ProtocolError):
    """A server-wide limit is reached (sessions, connections): retry later."""

    code = "busy"


class Expired(P.ProtocolError):
    """The session was freed after its idle timeout."""

    code = "expired"


def parse_bytes(text: str) -> int:
    """``"4GiB"``, ``"512MB"``, ``"1e9"`` -> bytes (binary units with ``i``, decimal without)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"memory size {text!r}: expected a number with an optional unit (B, KB, KiB, MB, MiB, "
                         f"GB, GiB, TB, TiB), e.g. 4GiB")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 1:
        raise ValueError(f"memory size {text!r} must be at least 1 byte")
    return n


def available_memory() -> int:
    """Bytes the kernel reports as available (``MemAvailable``), else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_memory_budget() -> int:
    """Half of the memory available now (after the model loaded): room for the rest of the machine."""
    return available_memory() // 2


def kv_bytes_per_token(model) -> int:
    """KV cache bytes one token of one row costs: 2 (K and V) x layers x KV heads x head dim x dtype size."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    layers = int(cfg.num_hidden_layers)
    heads = int(getattr(cfg, "num_attention_heads"))
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    item = next(model.parameters()).element_size()
    return 2 * layers * kv_heads * head_dim * item


def _sizeof(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


class MemoryBudget:
    """Bytes charged against one limit; ``charge`` refuses with ``Busy`` what does not fit."""

    def __init__(self, limit: int):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"memory budget must be a positive int of bytes, got {limit!r}")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.refused = 0
        self._lock = threading.Lock()

    def charge(self, n: int, what: str) -> int:
        n = int(n)
        with self._lock:
            if self.used + n > self.limit:
                self.refused += 1
                raise Busy(f"busy: {what} needs {_sizeof(n)}, the memory budget has {_sizeof(self.limit - self.used)} "
                           f"of {_sizeof(self.limit)} free (--memory-budget); retry later or ask for less")
            self.used += n
            self.peak = max(self.peak, self.used)
        return n

    def release(self, n: int) -> None:
        with self._lock:
            self.used -= int(n)


def _timed(steps):
    """Run the generator ``steps`` slice by slice (yielding between), return ``(its value, seconds
    spent in its own slices)``."""
    spent = 0.0
    while True:
        t0 = time.perf_counter()
        try:
            next(steps)
        except StopIteration as done:
            return done.value, spent + time.perf_counter() - t0
        spent += time.perf_counter() - t0
        yield


def _fragments(frame: bytes):
    """A large answer as SEND_FRAGMENT-byte fragments of one message: websockets then serializes and
    buffers one fragment at a time (waiting for the socket between), not a copy of the whole frame."""
    view = memoryview(frame)
    return [view[i:i + SEND_FRAGMENT] for i in range(0, len(view), SEND_FRAGMENT)]


class _Job:
    __slots__ = ("steps", "loop", "future", "compute_s")

    def __init__(self, steps, loop, future):
        self.steps, self.loop, self.future, self.compute_s = steps, loop, future, 0.0


def _settle(future, ok: bool, value):
    if not future.done():
        future.set_result(value) if ok else future.set_exception(value)


def _hand_back(job, ok: bool, value) -> None:
    """Settle the job's future on its event loop. A loop already closed (its server stopped while
    the forward ran) has no one waiting: the result is dropped, and the model thread lives on."""
    try:
        job.loop.call_soon_threadsafe(_settle, job.future, ok, value)
    except RuntimeError:
        close = getattr(job.steps, "close", None)
        if close is not None:
            close()


class Scheduler:
    """The one model thread. A job is a generator whose every ``next()`` runs one forward.

    Two queues: jobs not yet started (each new request) and jobs that already ran a forward (long
    prefills, replays, scores). When both hold work the thread alternates between them, so a new
    request waits for at most one forward of a long job, and long jobs still get half the forwards.
    """

    def __init__(self):
        self._new: deque = deque()
        self._running: deque = deque()
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="costeer-serve-model", daemon=True)
        self._thread.start()

    def submit(self, steps) -> "asyncio.Future":
        """Queue the generator ``steps``; the future gets ``(its return value, compute seconds)``."""
        loop = asyncio.get_running_loop()
        job = _Job(steps, loop, loop.create_future())
        with self._cv:
            if self._stopped:
                raise RuntimeError("the model thread is stopped")
            self._new.append(job)
            self._cv.notify()
        return job.future

    def _loop(self):
        took_running = False
        while True:
            with self._cv:
                while not (self._new or self._running or self._stopped):
                    self._cv.wait()
                if self._stopped:
                    return
                if self._new and (took_running or not self._running):
                    job, took_running = self._new.popleft(), False
                else:
                    job, took_running = self._running.popleft(), True
            if job.future.cancelled():  # its request was abandoned: do no more of its work
                job.steps.close()
                continue
            t0 = time.perf_counter()
            try:
                next(job.steps)
            except StopIteration as stop:
                job.compute_s += time.perf_counter() - t0
                _hand_back(job, True, (stop.value, job.compute_s))
                continue
            except BaseException as exc:  # noqa: BLE001 - handed to the request that asked
                _hand_back(job, False, exc)
                continue
            job.compute_s += time.perf_counter() - t0
            with self._cv:
                self._running.append(job)

    def shutdown(self, wait: bool = True) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        if wait and self._thread is not threading.current_thread():
            self._thread.join(60)


def _chunked_kv_class():
    from ..kv import KVBatch

    class ChunkedKV(KVBatch):
        """A ``KVBatch`` whose prefill can run as several forwards (chunked prefill)."""

        def prefill_chunks(self, chunk_tokens: int):
            """Generator: the prefill in forwards of ``max(1, chunk_tokens // rows)`` positions;
            yields between forwards, returns the last one's ``StepOutput`` (a prompt that fits
            one chunk is the plain one-forward ``prefill``)."""
            columns = max(1, chunk_tokens // self.rows)
            L = int(self._ids.shape[1])
            if L <= columns:
                return self.prefill()
            if self._prefilled:
                raise RuntimeError("KVBatch.prefill called twice")
            self._prefilled = True
            ids, pos = self._ids, self._pos
            for a in range(0, L, columns):
                b = min(L, a + columns)
                out = self._forward(ids[:, a:b], self._mask[:, :b], pos[:, a:b])
                if b < L:
                    yield
            self._next_pos = pos[:, -1] + 1
            self._ids = None
            return out

    return ChunkedKV


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, "localhost")."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or "" (all interfaces): treat as reachable from outside


class _Recorder:
    def __init__(self, path: Optional[str]):
        self.path = path
        self._lock = threading.Lock()

    def frame(self, frame):
        if not self.path:
            return
        raw = frame.encode("utf-8") if isinstance(frame, str) else bytes(frame)
        self._write({"t": time.time(), "kind": "frame", "bytes_b64": base64.b64encode(raw).decode("ascii")})

    def tokens(self, header, tokens):
        if self.path:
            self._write({"t": time.time(), "kind": "tokens", "header": header, "tokens": [int(x) for x in tokens]})

    def _write(self, rec):
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


class LLMServer:
    """The model side, independent of the transport (used by the WebSocket handler).

    ``handle(frame, sessions, max_frame_bytes)`` answers one frame; ``sessions`` is the calling
    connection's own ``{sid: session}`` dict. ``OPS`` maps each message type to its handler
    ``(frame, header, payload, sessions) -> bytes``: a new message type is one more entry.
    ``memory_budget`` (bytes; default ``default_memory_budget()``) bounds the KV caches and pending
    replies; ``prefill_chunk`` is the most tokens (all rows counted) one forward of a long job takes.
    """

    OPS = {"hello": "_op_hello", "open": "_open", "step": "_step", "close": "_close", "score": "_score"}

    def __init__(self, loaded, *, max_prompt_tokens: Optional[int] = None, max_rows: int = 16,
                 max_sessions: int = 8, max_k: int = 1024, record: Optional[str] = None,
                 max_total_sessions: int = 64, idle_timeout: float = 300.0, memory_budget: Optional[int] = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be an int >= 1 (tokens per forward), got {prefill_chunk!r}")
        self.loaded = loaded
        self.max_prompt_tokens = min(max_prompt_tokens or loaded.max_len, loaded.max_len - 1)
        self.max_rows, self.max_sessions, self.max_k = max_rows, max_sessions, max_k
        self.max_total_sessions = max_total_sessions
        self.idle_timeout = idle_timeout
        self.record = _Recorder(record)
        self.budget = MemoryBudget(default_memory_budget() if memory_budget is None else memory_budget)
        self.prefill_chunk = prefill_chunk
        self.kv_token_bytes = kv_bytes_per_token(loaded.model)
        self.pool = Scheduler()
        self.registry: Dict[str, tuple] = {}  # random session id -> (the connection's sessions dict, sid)
        self.expired_total = 0  # sessions freed by the idle timeout
        self.opened_total = 0
        self._frame_limit = 4 * 2**20
        self._kv_class = _chunked_kv_class()

    def hello(self, max_frame_bytes: int) -> dict:
        L = self.loaded
        return {"op": "hello", "protocol": P.PROTOCOL_VERSION, "model": L.name, "vocab_size": L.vocab_size,
                "max_len": L.max_len, "eos_token_ids": list(L.eos_token_ids),
                "limits": {"max_prompt_tokens": self.max_prompt_tokens, "max_rows": self.max_rows,
                           "max_sessions": self.max_sessions, "max_total_sessions": self.max_total_sessions,
                           "max_k": self.max_k, "max_frame_bytes": max_frame_bytes,
                           "idle_timeout_s": self.idle_timeout, "memory_budget_bytes": self.budget.limit,
                           "kv_bytes_per_token": self.kv_token_bytes, "prefill_chunk": self.prefill_chunk}}

    # -- memory ---------------------------------------------------------------------------------

    def reply_bytes(self, rows: int, sess: dict) -> int:
        """Budget for one answer of ``rows`` rows while it is made: the float32 logits, their copy in
        the wire dtype (full) or their log-softmax (top-k), and the encoded frame."""
        V = self.loaded.vocab_size
        logits = rows * V * 4
        if sess["format"] == "full":
            wire = rows * V * P.WIRE_DTYPES[sess["dtype"]].itemsize
            converted = 0 if sess["dtype"] == "float32" else wire
        else:
            wire, converted = rows * sess["k"] * 8, logits
        return logits + converted + wire + SEND_SLACK

    def _charge_kv(self, sess: dict, positions: int, what: str) -> None:
        """Grow the session's KV charge to ``positions`` cached positions per row (refuses with Busy)."""
        need = sess["rows"] * positions * self.kv_token_bytes - sess["charge"]
        if need > 0:
            self.budget.charge(need, what)
            sess["charge"] += need

    def _release(self, sess: dict) -> None:
        self.budget.release(sess.pop("charge", 0))

    # -- sessions -------------------------------------------------------------------------------

    @property
    def session_count(self) -> int:
        return len(self.registry)

    def _forget(self, sess) -> None:
        self.registry.pop(sess.get("id"), None)
        sess["kv"] = None  # the KV cache goes with the last reference
        sess["dead"] = True  # a job still computing for it stops at its next forward
        if not sess.get("busy"):
            self._release(sess)  # else the computing request releases it when the model lets go

    def drop(self, sessions: Dict[int, dict], sid) -> None:
        sess = sessions.pop(sid, None) if isinstance(sid, int) and not isinstance(sid, bool) else None
        if sess is not None:
            self._forget(sess)

    def drop_all(self, sessions: Dict[int, dict]) -> None:
        for sid in list(sessions):
            self.drop(sessions, sid)

    def expire_idle(self, now: Optional[float] = None) -> int:
        """Free every session idle for ``idle_timeout`` s (not while a request of it is computing)."""
        now = time.monotonic() if now is None else now
        n = 0
        for gid, (sessions, sid) in list(self.registry.items()):
            sess = sessions.get(sid)
            if sess is None or sess.get("id") != gid:
                self.registry.pop(gid, None)
                continue
            if not sess["busy"] and now - sess["last"] > self.idle_timeout:
                sessions[sid] = {"expired": True}  # a later step gets a clear "expired" error
                self._forget(sess)
                n += 1
        self.expired_total += n
        return n

    # -- frames ---------------------------------------------------------------------------------

    def _logits_frame(self, sid, step, sess, logits, compute_s, extra=None):
        """Generator (model thread): the "logits" answer, encoded in place ``ENCODE_BLOCK`` logits
        at a time with a yield between blocks; returns the frame (a bytearray)."""
        rows, V = int(logits.shape[0]), int(logits.shape[1])
        header = {"op": "logits", "sid": sid, "step": step, "rows": rows, "vocab_size": V,
                  "format": sess["format"], "dtype": sess["dtype"], "k": sess["k"], "compute_ms": compute_s * 1e3}
        if extra:
            header.update(extra)
        full = sess["format"] == "full"
        item = P.WIRE_DTYPES[sess["dtype"]].itemsize
        k = min(sess["k"], V)
        frame, payload = P.frame_buffer(header, rows * V * item if full else rows * k * 8)
        block = max(1, ENCODE_BLOCK // V)
        for a in range(0, rows, block):
            if a:
                yield
            part = logits[a:a + block]
            b = a + int(part.shape[0])
            if full:
                payload[a * V * item:b * V * item] = P.pack_full(part, sess["dtype"])
            else:  # layout: every row's ids, then every row's log-probs
                ids, vals = P.topk_arrays(part, k)
                payload[a * k * 4:b * k * 4] = memoryview(ids).cast("B")
                payload[(rows + a) * k * 4:(rows + b) * k * 4] = memoryview(vals).cast("B")
        return frame

    def _reserve(self, sess: dict, reply_rows: int, positions: int, what: str) -> int:
        """Charge the session's KV growth to ``positions`` and one reply of ``reply_rows`` rows
        (returns the reply's charge), or refuse with Busy and charge nothing."""
        before = sess["charge"]
        self._charge_kv(sess, positions, what)
        try:
            return self.budget.charge(self.reply_bytes(reply_rows, sess), f"{what}'s answer")
        except Busy:
            self.budget.release(sess["charge"] - before)
            sess["charge"] = before
            raise

    async def _compute(self, steps, sess: dict, reply_rows: int, positions: int, what: str, frame_of,
                       reply: Optional[int] = None):
        """Run the generator ``steps`` on the model thread after ``_reserve`` (unless ``reply``
        says it was done), then, as one more slice there, ``frame_of(logits, compute_s)``; answers
        ``(frame, its budget charge)``. The event loop never touches the big tensors."""
        if reply is None:
            reply = self._reserve(sess, reply_rows, positions, what)

        def job():
            out, spent = yield from _timed(steps)
            if out is None:  # the session went away while it computed
                return None
            if out.logits.numel() > ENCODE_BLOCK:
                yield  # encoding a large answer takes slices of its own
            # a small answer (a step's) is encoded in its forward's slice: the request is served in
            # one turn of the model thread, not two with another job's forward between them
            return (yield from frame_of(out.logits, spent))

        sess["busy"], sess["last"] = True, time.monotonic()
        future = self.pool.submit(job())
        try:
            frame, _ = await future
        except BaseException:
            future.cancel()
            self.budget.release(reply)
            raise
        finally:
            sess["busy"], sess["last"] = False, time.monotonic()
            if sess.get("dead"):
                self._release(sess)
        if frame is None:
            self.budget.release(reply)
            raise P.ProtocolError(f"{what}: the session was closed while it computed")
        keep = min(reply, len(frame) + SEND_SLACK)  # the logits are gone; the frame waits for the socket
        self.budget.release(reply - keep)
        return frame, keep

    async def handle(self, frame, sessions: Dict[int, dict], max_frame_bytes: int) -> bytes:
        """Answer one received frame (never raises: errors become error frames)."""
        reply, charge = await self.handle_charged(frame, sessions, max_frame_bytes)
        self.budget.release(charge)
        return reply

    async def handle_charged(self, frame, sessions: Dict[int, dict], max_frame_bytes: int):
        """``(answer, budget bytes it holds)``: release them once the socket took the answer."""
        sid = None
        self.record.frame(frame)
        try:
            header, payload = P.decode(frame)
            op = header["op"]
            sid = header.get("sid")
            name = self.OPS.get(op)
            if name is None:
                raise P.ProtocolError(f"unknown op {op!r}: expected one of {sorted(self.OPS)}")
            self._frame_limit = max_frame_bytes
            out = await getattr(self, name)(frame, header, payload, sessions)
            return out if isinstance(out, tuple) else (out, 0)
        except Exception as exc:  # a refusal, never a crash: the client gets the reason
            code = getattr(exc, "code", "bad_request" if isinstance(exc, ValueError) else "internal")
            return P.encode({"op": "error", "sid": sid if isinstance(sid, int) and not isinstance(sid, bool) else None,
                             "code": code, "message": str(exc)}), 0

    async def _op_hello(self, frame, header, payload, sessions):
        return P.encode(self.hello(self._frame_limit))

    # -- public hooks of an op (``OPS``): the step op and the "score" op (``spec_server.py``) use them

    def session(self, op: str, sid, sessions: Dict[int, dict]) -> dict:
        """The open session ``sid`` of this connection for op ``op`` (raises ProtocolError for an
        unknown one, Expired for one freed after its idle timeout)."""
        if not isinstance(sid, int) or isinstance(sid, bool):
            raise P.ProtocolError(f"{op}: 'sid' must be an integer")
        sess = sessions.get(sid)
        if sess is None:
            raise P.ProtocolError(f"{op}: no open session {sid!r} on this connection")
        if sess.get("expired"):
            sessions.pop(sid, None)
            raise Expired(f"{op}: session {sid} was closed after {self.idle_timeout:g} s idle; open it again "
                          f"(with 'replay' to resume)")
        return sess

    async def _close(self, frame, header, payload, sessions):
        sid = header.get("sid")
        if not isinstance(sid, int) or isinstance(sid, bool):
            raise P.ProtocolError("close: 'sid' must be an integer")
        self.drop(sessions, sid)
        return P.encode({"op": "closed", "sid": sid})

    async def _open(self, frame, header, payload, sessions):
        sid = header.get("sid")
        if not isinstance(sid, int) or isinstance(sid, bool):
            raise P.ProtocolError("open: 'sid' must be an integer")
        rows = header.get("rows")
        if not isinstance(rows, list) or not rows or not all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
            raise P.ProtocolError("open: 'rows' must be a non-empty list of prompt lengths")
        fmt = header.get("format", "full")
        dtype = header.get("dtype", "float16")
        k = header.get("k", min(20, self.max_k))
        replay = header.get("replay", 0)
        if fmt not in P.FORMATS:
            raise P.ProtocolError(f"open: format must be one of {P.FORMATS}")
        if dtype not in P.WIRE_DTYPES:
            raise P.ProtocolError(f"open: dtype must be one of {tuple(P.WIRE_DTYPES)}")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.max_k:
            raise P.ProtocolError(f"open: k must be an integer in [1, {self.max_k}]")
        if len(rows) > self.max_rows:
            raise P.ProtocolError(f"open: at most {self.max_rows} rows per session")
        if not isinstance(replay, int) or isinstance(replay, bool) or replay < 0:
            raise P.ProtocolError("open: 'replay' must be an integer >= 0 (the number of steps already fed)")
        for r in rows:
            if r < 1 or r > self.max_prompt_tokens:
                raise P.ProtocolError(f"open: prompt length {r} outside [1, {self.max_prompt_tokens}] (server limit)")
        if max(rows) + replay >= self.loaded.max_len:
            raise P.ProtocolError(f"open: prompt + {replay} replayed tokens exceed the model's window of "
                                  f"{self.loaded.max_len} tokens")
        reopen = sid in sessions and not sessions[sid].get("expired")
        live = sum(1 for s in sessions.values() if not s.get("expired"))
        if not reopen and live >= self.max_sessions:
            raise P.ProtocolError(f"open: at most {self.max_sessions} sessions per connection")
        if not reopen and len(self.registry) >= self.max_total_sessions:
            raise Busy(f"busy: the server holds its limit of {self.max_total_sessions} sessions; retry later")
        n_prompt = sum(rows)
        ids = P.int32_array(payload, n_prompt + replay * len(rows))
        self.record.tokens(header, ids.tolist())
        V = self.loaded.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise P.ProtocolError(f"open: token ids must lie in [0, {V})")
        prompts, at = [], 0
        for r in rows:
            prompts.append(ids[at:at + r].tolist())
            at += r
        fed = ids[n_prompt:].reshape(replay, len(rows)).tolist() if replay else []
        self.drop(sessions, sid)  # a re-opened (or expired) sid starts afresh
        gid = secrets.token_hex(16)
        sess = {"kv": None, "format": fmt, "dtype": dtype, "k": k, "step": replay, "rows": len(rows), "id": gid,
                "busy": False, "last": time.monotonic(), "charge": 0}
        positions = max(rows) + replay
        what = f"open ({len(rows)} rows x {positions} positions)"
        reply = self._reserve(sess, len(rows), positions, what)  # refused here, before any work
        kv = self._kv_class(self.loaded.model, prompts, self.loaded.pad_token_id, max_len=self.loaded.max_len)
        sess["kv"] = kv
        sessions[sid] = sess
        self.registry[gid] = (sessions, sid)
        self.opened_total += 1

        def prefill_and_replay():
            chunks = kv.prefill_chunks(self.prefill_chunk)
            while True:
                try:
                    next(chunks)
                except StopIteration as done:
                    out = done.value
                    break
                if sess.get("dead"):  # the client went away: stop spending the model on it
                    return None
                yield
            for toks in fed:  # the very same forward calls as the uninterrupted session made
                if sess.get("dead"):
                    return None
                yield
                out = kv.step(toks)
            return out

        try:
            return await self._compute(prefill_and_replay(), sess, len(rows), positions, what,
                                       lambda logits, dt: self._logits_frame(sid, replay, sess, logits, dt,
                                                                             {"session": gid}), reply)
        except BaseException:
            self.drop(sessions, sid)
            raise

    async def _step(self, frame, header, payload, sessions):
        sid = header.get("sid")
        sess = self.session("step", sid, sessions)
        toks = P.int32_array(payload, sess["rows"])
        self.record.tokens(header, toks.tolist())
        if toks.min() < 0 or toks.max() >= self.loaded.vocab_size:
            raise P.ProtocolError(f"step: token ids must lie in [0, {self.loaded.vocab_size})")
        kv = sess["kv"]
        if int(kv.lengths.max()) + 1 > self.loaded.max_len:
            raise P.ProtocolError(f"step: the session reached the model's window of {self.loaded.max_len} tokens")
        tokens = toks.tolist()

        def one_step():
            yield from ()  # a job of one forward
            return kv.step(tokens)

        return await self.answer_logits(one_step(), sid, sess, sess["rows"], kv.cached + 1, f"step of session {sid}")

    async def answer_logits(self, job, sid: int, sess: dict, reply_rows: int, positions: int, what: str):
        """Run ``job`` (a generator: its slices run on the model thread, its return value has
        ``.logits`` [reply_rows, V]) for session ``sid`` once the memory budget took the session's
        growth to ``positions`` and the answer; returns ``(the "logits" frame of the session's next
        step, its budget charge)``."""
        step = sess["step"] + 1
        out = await self._compute(job, sess, reply_rows, positions, what,
                                  lambda logits, dt: self._logits_frame(sid, step, sess, logits, dt))
        sess["step"] = step
        return out

    async def _score(self, frame, header, payload, sessions):
        """Speculative steering: roll back, then score n tokens per row in one forward
        (``costeer/serve/score.py``)."""
        from .score import handle_score

        return await handle_score(self, header, payload, sessions)


def _auth_hook(token: Optional[str]):
    if not token:
        return None
    expected = f"Bearer {token}".encode("utf-8")

    def process_request(connection, request):
        from http import HTTPStatus

        # get_all: a repeated header is a wrong token (``get`` raises on it: HTTP 500 and a traceback)
        got = request.headers.get_all("Authorization")
        if len(got) != 1 or not hmac.compare_digest(got[0].encode("utf-8", "replace"), expected):
            return connection.respond(HTTPStatus.UNAUTHORIZED,
                                      "costeer serve: missing or wrong token: send 'Authorization: Bearer TOKEN' "
                                      f"(costeer generate --token, or {TOKEN_ENV})\n")
        return None

    return process_request


def bind_host(host: str) -> str:
    """The ``host`` argument for binding: brackets stripped (``[::1]``)."""
    h = host.strip()
    return h[1:-1] if h.startswith("[") and h.endswith("]") else h


def _dual_stack_socket(port: int):
    """A listening socket on ``::`` that also takes IPv4 (asyncio would bind ``::`` as IPv6 only)."""
    import socket

    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
    except OSError:
        sock.close()
        raise
    return sock


def url_host(host: str) -> str:
    """``host`` as it goes in a URL: IPv6 addresses in brackets."""
    h = host.strip("[]")
    return f"[{h}]" if ":" in h else h


async def serve_forever(server: LLMServer, host: str, port: int, *, max_frame_bytes: int = 4 * 2**20,
                        ready=None, stop: Optional[asyncio.Event] = None, token: Optional[str] = None,
                        max_connections: int = 256, send_timeout: float = 30.0, tick: Optional[float] = None,
                        ssl_context=None):
    """Serve until ``stop`` is set. Refuses a non-loopback ``host`` without a ``token``.

    ``ssl_context`` (an ``ssl.SSLContext`` for the server side) serves ``wss://``. Each connection
    charges its input buffer (``INPUT_FRAMES`` frames of ``max_frame_bytes``) to the memory budget.
    """
    from websockets.asyncio.server import serve

    if not token and not is_loopback(host):
        raise ValueError(f"host {host!r} is not a loopback address: a token is required (--token or {TOKEN_ENV}), "
                         f"or bind 127.0.0.1")
    conns: Dict[object, dict] = {}
    input_bytes = INPUT_FRAMES * max_frame_bytes

    async def refuse(ws, message):
        await ws.send(P.encode({"op": "error", "sid": None, "code": "busy", "message": message}))
        await ws.close(1013, "busy")

    async def handler(ws):
        if len(conns) >= max_connections:
            await refuse(ws, f"busy: the server holds its limit of {max_connections} connections; retry later")
            return
        try:
            server.budget.charge(input_bytes, "a connection's input buffer")
        except Busy as exc:
            await refuse(ws, str(exc))
            return
        state = {"last": time.monotonic(), "busy": False}
        conns[ws] = state
        sessions: Dict[int, dict] = {}
        closed = asyncio.ensure_future(ws.wait_closed())
        try:
            async for frame in ws:
                state["busy"] = True
                work = asyncio.ensure_future(server.handle_charged(frame, sessions, max_frame_bytes))
                await asyncio.wait({work, closed}, return_when=asyncio.FIRST_COMPLETED)
                if not work.done():
                    # the client went away while its request computes: cancelling it stops that
                    # work at its next forward (a replay or prefill would otherwise run to its end)
                    work.cancel()
                    await asyncio.gather(work, return_exceptions=True)
                    break
                reply, charge = work.result()
                try:
                    # a client that does not read its answers is cut off (its sessions are freed below)
                    await asyncio.wait_for(ws.send(reply if len(reply) <= SEND_FRAGMENT else _fragments(reply)),
                                           send_timeout)
                finally:
                    del reply
                    server.budget.release(charge)
                state["busy"], state["last"] = False, time.monotonic()
        except asyncio.TimeoutError:
            ws.transport.abort()
        except Exception:
            pass  # connection dropped: its sessions die with it
        finally:
            closed.cancel()
            conns.pop(ws, None)
            server.drop_all(sessions)
            server.budget.release(input_bytes)

    async def reaper():
        period = tick if tick is not None else min(5.0, max(0.05, server.idle_timeout / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            server.expire_idle(now)
            for ws, st in list(conns.items()):
                if not st["busy"] and now - st["last"] > server.idle_timeout:
                    conns.pop(ws, None)
                    asyncio.ensure_future(ws.close(1001, "idle timeout"))

    stop = stop or asyncio.Event()
    where = {"sock": _dual_stack_socket(port)} if bind_host(host) == "::" else {"host": bind_host(host), "port": port}
    async with serve(handler, **where, max_size=max_frame_bytes, max_queue=INPUT_FRAMES - 1,
                     compression=None, ping_interval=20, ping_timeout=60, process_request=_auth_hook(token),
                     ssl=ssl_context) as ws_server:
        sock = next(iter(ws_server.sockets))
        bound = sock.getsockname()
        reap = asyncio.ensure_future(reaper())
        try:
            if ready is not None:
                ready(bound[0], bound[1])
            await stop.wait()
        finally:
            reap.cancel()


def _unbindable(host: str, port: int) -> Optional[str]:
    """Why ``host``:``port`` cannot be bound (None if it can): a probe bind before the model loads."""
    import socket

    h = bind_host(host)
    if h == "::":
        try:
            _dual_stack_socket(port).close()
        except OSError as exc:
            return str(exc)
        return None
    try:
        infos = socket.getaddrinfo(h or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"{h!r} is not an address or host name of this machine ({exc})"
    family, kind, proto, _, addr = infos[0]
    s = socket.socket(family, kind, proto)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
    except OSError as exc:
        return str(exc)
    finally:
        s.close()
    return None


def main(argv=None) -> int:
    from ..models import DEFAULT_MODEL, ModelNotFoundError, load_model
    from ..startup import resume_gc

    ap = argparse.ArgumentParser(prog="costeer serve", description="Serve an LLM's next-token logits over WebSocket.")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="alias, Hugging Face id or local path (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--host", default="127.0.0.1", help="a non-loopback address requires --token")
    ap.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    ap.add_argument("--token", default=None,
                    help=f"clients must send 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV}); required "
                         f"when --host is not a loopback address")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-prompt-tokens", type=int, default=None)
    ap.add_argument("--max-frame-bytes", type=int, default=4 * 2**20)
    ap.add_argument("--max-rows", type=int, default=16)
    ap.add_argument("--max-sessions", type=int, default=8, help="sessions per connection")
    ap.add_argument("--max-total-sessions", type=int, default=64, help="sessions in all; more get a 'busy' error")
    ap.add_argument("--max-connections", type=int, default=256, help="more get a 'busy' error")
    ap.add_argument("--idle-timeout", type=float, default=300.0,
                    help="seconds: an idle session is freed, a silent connection closed")
    ap.add_argument("--send-timeout", type=float, default=30.0,
                    help="seconds: a client that does not read an answer for this long is disconnected")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--memory-budget", default=None, metavar="SIZE",
                    help="bytes for KV caches, pending replies and connection buffers, e.g. 4GiB; requests that "
                         "do not fit get a 'busy' error (default: half the memory available at start)")
    ap.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                    help="tokens (all rows counted) per forward of a long prefill, replay or score, interleaved "
                         "with other sessions' steps")
    ap.add_argument("--ssl-certfile", default=None, help="PEM certificate (chain): serve wss:// (TLS)")
    ap.add_argument("--ssl-keyfile", default=None, help="PEM private key of --ssl-certfile (if not in that file)")
    ap.add_argument("--record", default=None, help="debug: append every received frame to this JSONL file")
    args = ap.parse_args(argv)
    if not 0 <= args.port <= 65535:
        ap.error("--port must be in [0, 65535]")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.prefill_chunk < 1:
        ap.error("--prefill-chunk must be >= 1")
    budget = None
    if args.memory_budget is not None:
        try:
            budget = parse_bytes(args.memory_budget)
        except ValueError as exc:
            ap.error(f"--memory-budget: {exc}")
    if args.ssl_keyfile and not args.ssl_certfile:
        ap.error("--ssl-keyfile needs --ssl-certfile")
    ssl_context = None
    if args.ssl_certfile:
        import ssl

        ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ssl_context.load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
        except (OSError, ssl.SSLError) as exc:
            ap.error(f"--ssl-certfile/--ssl-keyfile: cannot load the certificate and key: {exc}")
    args.host = args.host.strip()
    if args.host.startswith("[") and args.host.endswith("]"):
        args.host = args.host[1:-1]
    for name in ("max_frame_bytes", "max_rows", "max_sessions", "max_total_sessions", "max_connections"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        ap.error("--max-prompt-tokens must be >= 1")
    if not args.idle_timeout > 0 or not args.send_timeout > 0:
        ap.error("--idle-timeout and --send-timeout must be > 0 seconds")
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if not token and not is_loopback(args.host):
        print(f"costeer serve: error: --host {args.host} is not a loopback address: set a token with --token or "
              f"{TOKEN_ENV} (clients pass the same with --token / {TOKEN_ENV}), or bind 127.0.0.1",
              file=sys.stderr, flush=True)
        return 2
    bad = _unbindable(args.host, args.port)
    if bad:  # found before the model loads
        print(f"costeer serve: error: cannot listen on {args.host}:{args.port}: {bad}", file=sys.stderr, flush=True)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"costeer serve: loading {args.model} ...", file=sys.stderr, flush=True)
    try:
        loaded = load_model(args.model, device=args.device)
    except (ModelNotFoundError, ValueError, TypeError) as exc:
        print(f"costeer serve: error: {exc}", file=sys.stderr, flush=True)
        return 2
    resume_gc()  # the model is loaded (costeer/startup.py: paused only on `costeer serve`'s own command line)
    print(f"costeer serve: loaded {args.model} in {time.perf_counter() - t0:.1f} s "
          f"(vocab {loaded.vocab_size}, window {loaded.max_len})", file=sys.stderr, flush=True)
    server = LLMServer(loaded, max_prompt_tokens=args.max_prompt_tokens, max_rows=args.max_rows,
                       max_sessions=args.max_sessions, record=args.record,
                       max_total_sessions=args.max_total_sessions, idle_timeout=args.idle_timeout,
                       memory_budget=budget, prefill_chunk=args.prefill_chunk)
    print(f"costeer serve: memory budget {_sizeof(server.budget.limit)} (KV cache {server.kv_token_bytes} bytes "
          f"per token and row), prefill chunk {server.prefill_chunk} tokens", file=sys.stderr, flush=True)
    scheme = "wss" if ssl_context else "ws"

    def ready(host, port):
        url = f"{scheme}://{url_host(host)}:{port}"
        print(f"costeer serve: listening on {url}" + (" (token required)" if token else ""), flush=True)
        print(f"  use: costeer generate --llm-url {url} --prompt ... --context-file ..."
              + (f" (with --token or {TOKEN_ENV})" if token else "")
              + (" (a private CA: --ca-file or COSTEER_CA_FILE)" if ssl_context else ""), flush=True)

    async def run():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # pragma: no cover
                pass  # no signal handlers on this platform's event loop (Windows): Ctrl-C still stops it
        await serve_forever(server, args.host, args.port, max_frame_bytes=args.max_frame_bytes, ready=ready,
                            stop=stop, token=token, max_connections=args.max_connections,
                            send_timeout=args.send_timeout, ssl_context=ssl_context)

    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"costeer serve: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        server.pool.shutdown(wait=False)
    print("costeer serve: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
