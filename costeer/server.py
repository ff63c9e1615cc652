"""``costeer serve``: a WebSocket server hosting a Hugging Face causal LM (the "cloud" side).

One persistent connection per client; every message is one binary frame (``costeer.protocol``).
A client opens a session with the public prompts' token ids (one row per request), receives the
next-token logits (full vocabulary in float16/bfloat16/float32, or top-k ids + log-probs), sends
back the chosen token of every row, and so on. Each session has its own KV cache (a ``KVBatch``).

Limits: frame size (``--max-frame-bytes``), prompt length (``--max-prompt-tokens``, and never more
than the model's window), rows per session, sessions per connection, top-k size. All model work
runs in ONE worker thread (PyTorch CPU work from several threads fights over the cores).

``--record FILE`` (debugging, privacy tests): appends one JSON line per received frame, with the
frame's raw bytes (base64), its header and the token ids it carried.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Optional

from . import protocol as P


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
    """The model side, independent of the transport (used by the WebSocket handler)."""

    def __init__(self, loaded, *, max_prompt_tokens: Optional[int] = None, max_rows: int = 16,
                 max_sessions: int = 8, max_k: int = 1024, record: Optional[str] = None):
        self.loaded = loaded
        self.max_prompt_tokens = min(max_prompt_tokens or loaded.max_len, loaded.max_len - 1)
        self.max_rows, self.max_sessions, self.max_k = max_rows, max_sessions, max_k
        self.record = _Recorder(record)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="costeer-serve-model")

    def hello(self, max_frame_bytes: int) -> dict:
        L = self.loaded
        return {"op": "hello", "protocol": P.PROTOCOL_VERSION, "model": L.name, "vocab_size": L.vocab_size,
                "max_len": L.max_len, "eos_token_ids": list(L.eos_token_ids),
                "limits": {"max_prompt_tokens": self.max_prompt_tokens, "max_rows": self.max_rows,
                           "max_sessions": self.max_sessions, "max_k": self.max_k,
                           "max_frame_bytes": max_frame_bytes}}

    def _logits_frame(self, sid, step, sess, logits, compute_s) -> bytes:
        header = {"op": "logits", "sid": sid, "step": step, "rows": int(logits.shape[0]),
                  "vocab_size": int(logits.shape[1]), "format": sess["format"], "dtype": sess["dtype"],
                  "k": sess["k"], "compute_ms": compute_s * 1e3}
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
            if op == "hello":
                return P.encode(self.hello(max_frame_bytes))
            if op == "open":
                return await self._open(frame, header, payload, sessions)
            if op == "step":
                return await self._step(frame, header, payload, sessions)
            if op == "score":  # speculative steering: costeer/spec_server.py
                from .spec_server import handle_score

                return await handle_score(self, header, payload, sessions)
            if op == "close":
                sessions.pop(sid, None)
                return P.encode({"op": "closed", "sid": sid})
            raise P.ProtocolError(f"unknown op {op!r}")
        except Exception as exc:  # a refusal, never a crash: the client gets the reason
            return P.encode({"op": "error", "sid": sid if isinstance(sid, int) else None, "message": str(exc)})

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
        k = header.get("k", 20)
        if fmt not in P.FORMATS:
            raise P.ProtocolError(f"open: format must be one of {P.FORMATS}")
        if dtype not in P.WIRE_DTYPES:
            raise P.ProtocolError(f"open: dtype must be one of {tuple(P.WIRE_DTYPES)}")
        if not isinstance(k, int) or not 1 <= k <= self.max_k:
            raise P.ProtocolError(f"open: k must be an integer in [1, {self.max_k}]")
        if len(rows) > self.max_rows:
            raise P.ProtocolError(f"open: at most {self.max_rows} rows per session")
        if sid not in sessions and len(sessions) >= self.max_sessions:
            raise P.ProtocolError(f"open: at most {self.max_sessions} sessions per connection")
        for r in rows:
            if r < 1 or r > self.max_prompt_tokens:
                raise P.ProtocolError(f"open: prompt length {r} outside [1, {self.max_prompt_tokens}] (server limit)")
        ids = P.int32_array(payload, sum(rows))
        self.record.tokens(header, ids.tolist())
        V = self.loaded.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise P.ProtocolError(f"open: token ids must lie in [0, {V})")
        prompts, at = [], 0
        for r in rows:
            prompts.append(ids[at:at + r].tolist())
            at += r
        kv = KVBatch(self.loaded.model, prompts, self.loaded.pad_token_id, max_len=self.loaded.max_len)
        sess = {"kv": kv, "format": fmt, "dtype": dtype, "k": k, "step": 0, "rows": len(rows)}
        sessions[sid] = sess
        logits, dt = await self._compute(kv.prefill)
        return self._logits_frame(sid, 0, sess, logits, dt)

    async def _step(self, frame, header, payload, sessions):
        sid = header.get("sid")
        sess = sessions.get(sid)
        if sess is None:
            raise P.ProtocolError(f"step: no open session {sid!r}")
        toks = P.int32_array(payload, sess["rows"])
        self.record.tokens(header, toks.tolist())
        if toks.min() < 0 or toks.max() >= self.loaded.vocab_size:
            raise P.ProtocolError(f"step: token ids must lie in [0, {self.loaded.vocab_size})")
        kv = sess["kv"]
        if int(kv.lengths.max()) + 1 > self.loaded.max_len:
            raise P.ProtocolError(f"step: the session reached the model's window of {self.loaded.max_len} tokens")
        logits, dt = await self._compute(kv.step, toks.tolist())
        sess["step"] += 1
        return self._logits_frame(sid, sess["step"], sess, logits, dt)


async def serve_forever(server: LLMServer, host: str, port: int, *, max_frame_bytes: int = 4 * 2**20,
                        ready=None, stop: Optional[asyncio.Event] = None):
    from websockets.asyncio.server import serve

    async def handler(ws):
        sessions: Dict[int, dict] = {}
        try:
            async for frame in ws:
                await ws.send(await server.handle(frame, sessions, max_frame_bytes))
        except Exception:
            pass  # connection dropped: its sessions die with it
        finally:
            sessions.clear()

    stop = stop or asyncio.Event()
    async with serve(handler, host, port, max_size=max_frame_bytes, compression=None, ping_interval=20,
                     ping_timeout=60) as ws_server:
        sock = next(iter(ws_server.sockets))
        bound = sock.getsockname()
        if ready is not None:
            ready(bound[0], bound[1])
        await stop.wait()


def main(argv=None) -> int:
    from .models import DEFAULT_MODEL, ModelNotFoundError, load_model

    ap = argparse.ArgumentParser(prog="costeer serve", description="Serve an LLM's next-token logits over WebSocket.")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="alias, Hugging Face id or local path (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-prompt-tokens", type=int, default=None)
    ap.add_argument("--max-frame-bytes", type=int, default=4 * 2**20)
    ap.add_argument("--max-rows", type=int, default=16)
    ap.add_argument("--max-sessions", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--record", default=None, help="debug: append every received frame to this JSONL file")
    args = ap.parse_args(argv)
    if not 0 <= args.port <= 65535:
        ap.error("--port must be in [0, 65535]")
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
                       max_sessions=args.max_sessions, record=args.record)

    def ready(host, port):
        print(f"costeer serve: listening on ws://{host}:{port}", flush=True)
        print(f"  use: costeer generate --llm-url ws://{host}:{port} --prompt ... --context-file ...", flush=True)

    async def run():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # pragma: no cover
                pass
        await serve_forever(server, args.host, args.port, max_frame_bytes=args.max_frame_bytes, ready=ready, stop=stop)

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
