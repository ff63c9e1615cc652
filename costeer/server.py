"""``costeer serve``: a WebSocket server hosting a Hugging Face causal LM (the "cloud" side).

One persistent connection per client; every message is one binary frame (``costeer.protocol``).
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

All model work runs in ONE worker thread (PyTorch CPU work from several threads fights over the
cores). Nothing received is unpickled or evaluated (JSON headers, fixed-dtype numeric payloads).

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
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Optional

from . import protocol as P

TOKEN_ENV = "COSTEER_TOKEN"


class Busy(P.ProtocolError):
    """A server-wide limit is reached (sessions, connections): retry later."""

    code = "busy"


class Expired(P.ProtocolError):
    """The session was freed after its idle timeout."""

    code = "expired"


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
    """

    OPS = {"hello": "_op_hello", "open": "_open", "step": "_step", "close": "_close", "score": "_score"}

    def __init__(self, loaded, *, max_prompt_tokens: Optional[int] = None, max_rows: int = 16,
                 max_sessions: int = 8, max_k: int = 1024, record: Optional[str] = None,
                 max_total_sessions: int = 64, idle_timeout: float = 300.0):
        self.loaded = loaded
        self.max_prompt_tokens = min(max_prompt_tokens or loaded.max_len, loaded.max_len - 1)
        self.max_rows, self.max_sessions, self.max_k = max_rows, max_sessions, max_k
        self.max_total_sessions = max_total_sessions
        self.idle_timeout = idle_timeout
        self.record = _Recorder(record)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="costeer-serve-model")
        self.registry: Dict[str, tuple] = {}  # random session id -> (the connection's sessions dict, sid)
        self.expired_total = 0  # sessions freed by the idle timeout
        self.opened_total = 0
        self._frame_limit = 4 * 2**20

    def hello(self, max_frame_bytes: int) -> dict:
        L = self.loaded
        return {"op": "hello", "protocol": P.PROTOCOL_VERSION, "model": L.name, "vocab_size": L.vocab_size,
                "max_len": L.max_len, "eos_token_ids": list(L.eos_token_ids),
                "limits": {"max_prompt_tokens": self.max_prompt_tokens, "max_rows": self.max_rows,
                           "max_sessions": self.max_sessions, "max_total_sessions": self.max_total_sessions,
                           "max_k": self.max_k, "max_frame_bytes": max_frame_bytes,
                           "idle_timeout_s": self.idle_timeout}}

    # -- sessions -------------------------------------------------------------------------------

    @property
    def session_count(self) -> int:
        return len(self.registry)

    def _forget(self, sess) -> None:
        self.registry.pop(sess.get("id"), None)
        sess["kv"] = None  # the KV cache goes with the last reference

    def drop(self, sessions: Dict[int, dict], sid) -> None:
        sess = sessions.pop(sid, None)
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

    def _logits_frame(self, sid, step, sess, logits, compute_s, extra=None) -> bytes:
        header = {"op": "logits", "sid": sid, "step": step, "rows": int(logits.shape[0]),
                  "vocab_size": int(logits.shape[1]), "format": sess["format"], "dtype": sess["dtype"],
                  "k": sess["k"], "compute_ms": compute_s * 1e3}
        if extra:
            header.update(extra)
        if sess["format"] == "full":
            payload = P.pack_full(logits, sess["dtype"])
        else:
            payload = P.pack_topk(logits, min(sess["k"], int(logits.shape[1])))
        return P.encode(header, payload)

    async def _compute(self, fn, *args):
        loop = asyncio.get_running_loop()

        def run():
            t0 = time.perf_counter()
            out = fn(*args)
            return out.logits, time.perf_counter() - t0

        return await loop.run_in_executor(self.pool, run)

    async def handle(self, frame, sessions: Dict[int, dict], max_frame_bytes: int) -> bytes:
        """Answer one received frame (never raises: errors become error frames)."""
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
            return await getattr(self, name)(frame, header, payload, sessions)
        except Exception as exc:  # a refusal, never a crash: the client gets the reason
            code = getattr(exc, "code", "bad_request" if isinstance(exc, ValueError) else "internal")
            return P.encode({"op": "error", "sid": sid if isinstance(sid, int) and not isinstance(sid, bool) else None,
                             "code": code, "message": str(exc)})

    async def _op_hello(self, frame, header, payload, sessions):
        return P.encode(self.hello(self._frame_limit))

    def _session(self, op, sid, sessions):
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
        self.drop(sessions, sid)
        return P.encode({"op": "closed", "sid": sid})

    async def _open(self, frame, header, payload, sessions):
        from .slm import KVBatch

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
        kv = KVBatch(self.loaded.model, prompts, self.loaded.pad_token_id, max_len=self.loaded.max_len)
        gid = secrets.token_hex(16)
        sess = {"kv": kv, "format": fmt, "dtype": dtype, "k": k, "step": replay, "rows": len(rows), "id": gid,
                "busy": True, "last": time.monotonic()}
        sessions[sid] = sess
        self.registry[gid] = (sessions, sid)
        self.opened_total += 1

        def prefill_and_replay():
            out = kv.prefill()
            for toks in fed:  # the very same forward calls as the uninterrupted session made
                out = kv.step(toks)
            return out

        try:
            logits, dt = await self._compute(prefill_and_replay)
        except BaseException:
            self.drop(sessions, sid)
            raise
        finally:
            sess["busy"], sess["last"] = False, time.monotonic()
        return self._logits_frame(sid, replay, sess, logits, dt, {"session": gid})

    async def _step(self, frame, header, payload, sessions):
        sid = header.get("sid")
        sess = self._session("step", sid, sessions)
        toks = P.int32_array(payload, sess["rows"])
        self.record.tokens(header, toks.tolist())
        if toks.min() < 0 or toks.max() >= self.loaded.vocab_size:
            raise P.ProtocolError(f"step: token ids must lie in [0, {self.loaded.vocab_size})")
        kv = sess["kv"]
        if int(kv.lengths.max()) + 1 > self.loaded.max_len:
            raise P.ProtocolError(f"step: the session reached the model's window of {self.loaded.max_len} tokens")
        sess["busy"], sess["last"] = True, time.monotonic()
        try:
            logits, dt = await self._compute(kv.step, toks.tolist())
        finally:
            sess["busy"], sess["last"] = False, time.monotonic()
        sess["step"] += 1
        return self._logits_frame(sid, sess["step"], sess, logits, dt)


    async def _score(self, frame, header, payload, sessions):
        """Speculative steering: roll back, then score n tokens per row in one forward
        (``costeer/spec_server.py``)."""
        from .spec_server import handle_score

        return await handle_score(self, header, payload, sessions)


def _auth_hook(token: Optional[str]):
    if not token:
        return None
    expected = f"Bearer {token}".encode("utf-8")

    def process_request(connection, request):
        from http import HTTPStatus

        got = request.headers.get("Authorization", "")
        if not hmac.compare_digest(got.encode("utf-8", "replace"), expected):
            return connection.respond(HTTPStatus.UNAUTHORIZED,
                                      "costeer serve: missing or wrong token: send 'Authorization: Bearer TOKEN' "
                                      f"(costeer generate --token, or {TOKEN_ENV})\n")
        return None

    return process_request


async def serve_forever(server: LLMServer, host: str, port: int, *, max_frame_bytes: int = 4 * 2**20,
                        ready=None, stop: Optional[asyncio.Event] = None, token: Optional[str] = None,
                        max_connections: int = 256, send_timeout: float = 30.0, tick: Optional[float] = None):
    """Serve until ``stop`` is set. Refuses a non-loopback ``host`` without a ``token``."""
    from websockets.asyncio.server import serve

    if not token and not is_loopback(host):
        raise ValueError(f"host {host!r} is not a loopback address: a token is required (--token or {TOKEN_ENV}), "
                         f"or bind 127.0.0.1")
    conns: Dict[object, dict] = {}

    async def handler(ws):
        if len(conns) >= max_connections:
            await ws.send(P.encode({"op": "error", "sid": None, "code": "busy",
                                    "message": f"busy: the server holds its limit of {max_connections} connections; "
                                               f"retry later"}))
            await ws.close(1013, "busy")
            return
        state = {"last": time.monotonic(), "busy": False}
        conns[ws] = state
        sessions: Dict[int, dict] = {}
        try:
            async for frame in ws:
                state["busy"] = True
                reply = await server.handle(frame, sessions, max_frame_bytes)
                # a client that does not read its answers is cut off (its sessions are freed below)
                await asyncio.wait_for(ws.send(reply), send_timeout)
                state["busy"], state["last"] = False, time.monotonic()
        except asyncio.TimeoutError:
            ws.transport.abort()
        except Exception:
            pass  # connection dropped: its sessions die with it
        finally:
            conns.pop(ws, None)
            server.drop_all(sessions)

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
    async with serve(handler, host, port, max_size=max_frame_bytes, compression=None, ping_interval=20,
                     ping_timeout=60, process_request=_auth_hook(token)) as ws_server:
        sock = next(iter(ws_server.sockets))
        bound = sock.getsockname()
        reap = asyncio.ensure_future(reaper())
        try:
            if ready is not None:
                ready(bound[0], bound[1])
            await stop.wait()
        finally:
            reap.cancel()


def main(argv=None) -> int:
    from .models import DEFAULT_MODEL, ModelNotFoundError, load_model

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
    ap.add_argument("--record", default=None, help="debug: append every received frame to this JSONL file")
    args = ap.parse_args(argv)
    if not 0 <= args.port <= 65535:
        ap.error("--port must be in [0, 65535]")
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
    print(f"costeer serve: loaded {args.model} in {time.perf_counter() - t0:.1f} s "
          f"(vocab {loaded.vocab_size}, window {loaded.max_len})", file=sys.stderr, flush=True)
    server = LLMServer(loaded, max_prompt_tokens=args.max_prompt_tokens, max_rows=args.max_rows,
                       max_sessions=args.max_sessions, record=args.record,
                       max_total_sessions=args.max_total_sessions, idle_timeout=args.idle_timeout)

    def ready(host, port):
        print(f"costeer serve: listening on ws://{host}:{port}" + (" (token required)" if token else ""), flush=True)
        print(f"  use: costeer generate --llm-url ws://{host}:{port} --prompt ... --context-file ..."
              + (f" (with --token or {TOKEN_ENV})" if token else ""), flush=True)

    async def run():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # pragma: no cover
                pass
        await serve_forever(server, args.host, args.port, max_frame_bytes=args.max_frame_bytes, ready=ready,
                            stop=stop, token=token, max_connections=args.max_connections,
                            send_timeout=args.send_timeout)

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
