"""LLM logits streams: where the cloud LLM's next-token logits come from.

One interface, three sources:

* ``InProcessLLMStream``  a Hugging Face causal LM in this process, KV cache (the embedded default);
* ``WebSocketLLMStream``  a client of ``costeer serve`` (one persistent WebSocket, binary frames);
* ``OpenAICompletionsStream``  any OpenAI-compatible ``/v1/completions`` endpoint with logprobs
  (vLLM, SGLang): prompt as token ids, ``max_tokens=1``, ``logprobs=k``,
  ``return_tokens_as_token_ids=true``; the endpoint re-reads the growing prefix every step (its
  prefix cache makes that cheap).

The protocol of a stream, for a batch of B requests:

    stream.open(prompts)        # B public prompts (token ids); starts the step-0 request
    out = stream.recv()         # LLMStep: logits [B, V] of the next token
    stream.send(tokens)         # the B chosen tokens; starts the next request (does not wait)
    out = stream.recv()
    ...
    stream.close()

``send`` returns as soon as the request is on its way, so the caller runs the local small-model
passes between ``send`` and ``recv``: that is the overlap of local and remote work.

Top-k sources (an OpenAI endpoint, or ``costeer serve`` in "topk" format) give only the k best
tokens. Policy for the other tokens (``topk_policy``):

* ``"restrict"`` (default): they get -inf. The steered token is always one of the LLM's top k;
  the small model re-ranks inside that set. Safe: steering can never pick a token the LLM
  considers implausible.
* ``"floor"``: they share the probability mass the top k leave, uniformly:
  ``log((1 - sum(p_topk)) / (V - k))``, capped at the smallest returned log-prob. A strong enough
  small-model delta can then promote a token outside the top k.
"""
from __future__ import annotations

import http.client
import itertools
import json
import math
import os
import threading
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from . import protocol as P
from .slm import KVBatch

TOPK_POLICIES = ("restrict", "floor")
TOKEN_ENV = "COSTEER_TOKEN"  # the `costeer serve` token, also read by the server
CA_ENV = "COSTEER_CA_FILE"  # PEM file of a private CA that signed a `costeer serve --ssl-certfile`
# Largest vocabulary a server may announce: a client allocates rows x vocabulary floats per step
# (top-k answers are made dense), so a hostile number must not become a huge allocation. Real
# vocabularies are below 2**18.
MAX_VOCAB = 2**22
# How long an OpenAI-compatible stream keeps resending a step whose connection broke. An engine
# restart is the long case: vLLM's CPU build is back in 1-2 minutes on 2 cores, a GPU engine loading a
# large model takes minutes; costeer serve (WebSocketLLMStream, 30 s) starts in seconds.
OPENAI_RECONNECT_TIMEOUT = 300.0


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


class StreamError(ConnectionError):
    """The LLM source failed or refused (network error, server error message)."""


class LLMStream:
    """Base class; see the module docstring for the protocol."""

    name: str = "llm"
    vocab_size: int = 0
    max_len: Optional[int] = None
    eos_token_ids: Sequence[int] = ()
    remote: bool = False

    def open(self, prompts: Sequence[Sequence[int]]) -> None:
        raise NotImplementedError

    def send(self, tokens: Sequence[int]) -> None:
        raise NotImplementedError

    def recv(self) -> LLMStep:
        raise NotImplementedError

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
        return out.logits, time.perf_counter() - t0

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
            logits, compute = pending.result()
        else:
            logits, compute = self._run(pending[0], *pending[1])
        return LLMStep(logits=logits, compute_s=compute, wait_s=time.perf_counter() - t0)

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

    def close(self):
        self._kv = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


# ---------------------------------------------------------------------------------------------
# (b) costeer serve


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _ConnectionLost(StreamError):
    """The connection broke (not a refusal): the stream may reconnect and resume."""


class _SessionExpired(StreamError):
    """The server freed the session after its idle timeout: open it again with the replay prefix."""


class WebSocketLLMStream(LLMStream):
    """Client of ``costeer serve``: one persistent WebSocket, binary frames (``costeer.protocol``).

    ``response_format="full"`` receives the whole vocabulary in ``dtype`` (float16 by default,
    ~100 KB per row for V=49152); ``"topk"`` receives ``k`` ids + log-probs per row and applies
    ``topk_policy``.

    Faults: when the connection breaks mid-generation (the server restarted, the network dropped),
    the stream reconnects with bounded exponential backoff (``backoff`` s doubling up to
    ``max_backoff``, for at most ``reconnect_timeout`` s) and resumes: it opens the session again
    with its prompts and every token already fed (``replay``), so the server re-runs exactly the
    steps it lost and the answer is the one the lost request would have got. ``reconnect_timeout=0``
    turns this off. Refusals (error frames, HTTP 401) are never retried. ``reconnects`` counts them.

    ``token`` (default ``$COSTEER_TOKEN``) is sent as ``Authorization: Bearer TOKEN``.

    ``wss://`` URLs (``costeer serve --ssl-certfile``) verify the server's certificate and host
    name against the system's CAs, or against ``ca_file`` (default ``$COSTEER_CA_FILE``): the PEM
    file of a private CA or of a self-signed certificate. A failed verification is a refusal.
    """

    remote = True
    _ids = itertools.count(1)

    def __init__(self, url: str, *, response_format: str = "full", dtype: str = "float16", k: int = 20,
                 topk_policy: str = "restrict", timeout: float = 60.0, max_frame_bytes: int = 64 * 2**20,
                 token: Optional[str] = None, reconnect_timeout: float = 30.0, backoff: float = 0.05,
                 max_backoff: float = 2.0, ca_file: Optional[str] = None):
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            raise ValueError(f"llm_url must be a ws:// or wss:// URL (printed by `costeer serve`), got {url!r}")
        ca_file = ca_file if ca_file is not None else (os.environ.get(CA_ENV) or None)
        self._ssl = None
        if url.startswith("wss://"):
            import ssl

            try:
                self._ssl = ssl.create_default_context(cafile=ca_file)  # verifies certificate and host name
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"ca_file {ca_file!r} ({CA_ENV}): not a readable PEM file of CA certificates: "
                                 f"{exc}") from None
        if response_format not in P.FORMATS:
            raise ValueError(f"response_format must be one of {P.FORMATS}, got {response_format!r}")
        if dtype not in P.WIRE_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(P.WIRE_DTYPES)}, got {dtype!r}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if topk_policy not in TOPK_POLICIES:
            raise ValueError(f"topk_policy must be one of {TOPK_POLICIES}, got {topk_policy!r}")
        for name, v in (("reconnect_timeout", reconnect_timeout), ("backoff", backoff), ("max_backoff", max_backoff)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {v!r}")
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("token must be a non-empty string or None")

        self.url, self.format, self.dtype, self.k, self.policy = url, response_format, dtype, k, topk_policy
        self.timeout, self.max_frame_bytes = timeout, max_frame_bytes
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.reconnect_timeout, self.backoff, self.max_backoff = float(reconnect_timeout), float(backoff), float(max_backoff)
        self.reconnects = 0
        self._ws = None
        self._sid = None
        self._rows = 0
        self._prompts: List[List[int]] = []
        self._fed: List[List[int]] = []  # every token row sent since open: the resume prefix
        self._scores = 0  # speculative "score" requests since open (not replayable)
        self._broken = False
        self._sent_at = None
        self._connect()
        hello = self.info
        self.name = f"{hello.get('model')}@{url}"
        self.vocab_size = hello["vocab_size"]
        self.max_len = hello["max_len"]
        self.eos_token_ids = hello.get("eos_token_ids", [])

    # -- connection -----------------------------------------------------------------------------

    def _connect(self):
        """Connect and say hello (sets ``info``); raises ``_ConnectionLost`` or ``StreamError``."""
        import ssl

        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            # Entered as a context manager (websockets >= 17.1 deprecates direct use); left in close().
            ws = connect(self.url, compression=None, max_size=self.max_frame_bytes, open_timeout=self.timeout,
                         close_timeout=2, additional_headers=headers, ssl=self._ssl).__enter__()
        except ssl.SSLCertVerificationError as exc:
            raise StreamError(f"{self.url}: the server's TLS certificate is not trusted ({exc.verify_message}): for a "
                              f"private CA or a self-signed certificate pass its PEM file with --ca-file or "
                              f"{CA_ENV}") from None
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 401:
                raise StreamError(f"{self.url} refused the token (HTTP 401): pass the server's token with --token "
                                  f"or {TOKEN_ENV}" if self.token else
                                  f"{self.url} requires a token (HTTP 401): pass it with --token or {TOKEN_ENV}") from None
            raise StreamError(f"{self.url} refused the connection: HTTP {status}") from None
        except Exception as exc:
            raise _ConnectionLost(
                f"cannot reach the LLM server at {self.url}: {exc}. Start one with "
                f"`costeer serve --host 127.0.0.1 --port PORT` and pass the URL it prints to --llm-url"
            ) from None
        self._ws = ws
        try:
            try:
                self._send_frame({"op": "hello"})
            except _ConnectionLost:
                pass  # a server at its connection limit answers "busy" and closes: read that answer
            hello = self._recv_frame()[0]
        except StreamError:
            self._drop()
            raise
        if hello.get("op") != "hello" or hello.get("protocol") != P.PROTOCOL_VERSION:
            self._drop()
            raise StreamError(f"{self.url} does not speak the costeer protocol v{P.PROTOCOL_VERSION}: {hello}")
        V, W, eos = hello.get("vocab_size"), hello.get("max_len"), hello.get("eos_token_ids", [])
        if not (_is_int(V) and 1 <= V <= MAX_VOCAB and _is_int(W) and W >= 2 and isinstance(eos, list)
                and all(_is_int(e) and 0 <= e < V for e in eos)):
            self._drop()
            raise StreamError(f"{self.url} announced an impossible model (vocab_size {V!r}, at most {MAX_VOCAB}; "
                              f"max_len {W!r}; eos_token_ids {str(eos)[:80]}): refused")
        old = getattr(self, "info", None)
        if old is not None and (old.get("model"), old.get("vocab_size")) != (hello.get("model"), hello.get("vocab_size")):
            self._drop()
            raise StreamError(f"{self.url} came back with another model ({hello.get('model')}, vocab "
                              f"{hello.get('vocab_size')}) than before ({old.get('model')}): cannot resume")
        self.info = hello

    def _drop(self):
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                ws.close()
            except Exception:
                pass

    def _resume(self, cause: StreamError):
        """Reconnect with bounded backoff and re-open the session with its replay prefix."""
        self._drop()
        if self.reconnect_timeout <= 0:
            raise StreamError(str(cause)) from None
        deadline = time.monotonic() + self.reconnect_timeout
        delay, tries, last = self.backoff, 0, cause
        while True:
            tries += 1
            try:
                self._connect()
                break
            except _ConnectionLost as exc:
                last = exc
            if time.monotonic() + delay > deadline:
                raise StreamError(f"lost the connection to {self.url} and could not reconnect within "
                                  f"{self.reconnect_timeout:g} s ({tries} attempts): {last}") from None
            time.sleep(delay)
            delay = min(self.max_backoff, max(delay * 2, 0.01))
        self.reconnects += 1
        self._broken = False
        if self._sid is not None:
            self._send_open()

    # -- frames ---------------------------------------------------------------------------------

    def _send_frame(self, header, payload=b""):
        if self._ws is None:
            raise _ConnectionLost(f"no connection to {self.url}")
        try:
            self._ws.send(P.encode(header, payload))
        except Exception as exc:
            raise _ConnectionLost(f"lost the connection to {self.url}: {exc}") from None

    def _recv_frame(self):
        if self._ws is None:
            raise _ConnectionLost(f"no connection to {self.url}")
        try:
            frame = self._ws.recv(timeout=self.timeout)
        except TimeoutError:
            raise StreamError(f"no answer from {self.url} within {self.timeout} s") from None
        except Exception as exc:
            raise _ConnectionLost(f"lost the connection to {self.url}: {exc}") from None
        header, payload = P.decode(frame)
        if header["op"] == "error":
            cls = _SessionExpired if header.get("code") == "expired" else StreamError
            raise cls(f"the LLM server refused: {header.get('message')}")
        return header, payload

    def _request(self, header, payload=b""):
        self._send_frame(header, payload)
        return self._recv_frame()

    def _send_open(self):
        flat = [x for p in self._prompts for x in p] + [x for row in self._fed for x in row]
        header = {"op": "open", "sid": self._sid, "rows": [len(p) for p in self._prompts],
                  "format": self.format, "dtype": self.dtype, "k": self.k}
        if self._fed:
            header["replay"] = len(self._fed)
        self._send_frame(header, P.pack_int32(flat))

    # -- the stream protocol --------------------------------------------------------------------

    def open(self, prompts):
        prompts = _check_prompts(prompts, self.vocab_size, self.max_len)
        self._sid = next(self._ids)
        self._rows = len(prompts)
        self._prompts, self._fed = prompts, []
        self._scores = 0  # speculative "score" requests of this session (they are not replayable)
        self._sent_at = time.perf_counter()
        try:
            self._send_open()
        except _ConnectionLost:
            self._broken = True  # recv() reconnects and opens again

    def send(self, tokens):
        tokens = [int(t) for t in tokens]
        if len(tokens) != self._rows:
            raise ValueError(f"tokens has {len(tokens)} entries, expected {self._rows}")
        self._fed.append(tokens)
        self._sent_at = time.perf_counter()
        if self._broken:
            return
        try:
            self._send_frame({"op": "step", "sid": self._sid}, P.pack_int32(tokens))
        except _ConnectionLost:
            self._broken = True

    def recv(self) -> LLMStep:
        t0 = time.perf_counter()
        reopened = reopen = False
        while True:
            try:
                if self._broken and self._scores:
                    raise _ConnectionLost(f"lost the connection to {self.url}")
                if self._broken:
                    self._resume(StreamError(f"lost the connection to {self.url}"))
                elif reopen:
                    reopen = False
                    self._send_open()
                header, payload = self._recv_frame()
                break
            except _SessionExpired:
                if reopened or self._scores:
                    raise
                reopened = reopen = True  # we were idle too long: the server freed the KV cache; replay
            except _ConnectionLost as exc:
                self._broken = True
                if self._scores:
                    # A speculative session's cache went through rollbacks: the replay of sent
                    # steps cannot rebuild it. Fail (the caller keeps the text so far).
                    self._drop()
                    raise StreamError(f"{exc} (a speculative session cannot be resumed; restart the "
                                      "generation, e.g. with costeer generate --resume)") from None
                if self.reconnect_timeout <= 0:
                    self._drop()
                    raise StreamError(str(exc)) from None
        if header.get("op") != "logits" or header.get("sid") != self._sid or \
                header.get("step") != len(self._fed) + self._scores:
            raise StreamError(f"unexpected answer from {self.url}: {header}")
        rows = int(header["rows"])
        if rows != self._rows:
            raise StreamError(f"server answered {rows} rows, expected {self._rows}")
        if header.get("vocab_size") != self.vocab_size:
            raise StreamError(f"server answered vocab_size {header.get('vocab_size')!r}, announced {self.vocab_size}")
        if header["format"] == "full":
            logits = P.unpack_full(payload, rows, self.vocab_size, header["dtype"])
        else:
            ids, lp = P.unpack_topk(payload, rows, int(header["k"]))
            logits = dense_from_topk(ids, lp, self.vocab_size, self.policy)
        t1 = time.perf_counter()
        return LLMStep(logits=logits, compute_s=float(header.get("compute_ms", 0.0)) / 1e3, wait_s=t1 - t0,
                       roundtrip_s=t1 - (self._sent_at or t0))

    # -- speculative steering (costeer/speculative.py, op "score" in costeer/spec_server.py)

    def score_send(self, tokens, rollback: int = 0) -> None:
        """Roll back ``rollback`` positions, then append ``tokens`` (one equal-length list per row)."""
        header, payload = P.score_frame(self._sid, tokens, rollback)
        if self._broken:
            raise StreamError(f"lost the connection to {self.url} (a speculative session cannot be resumed)")
        self._scores += 1
        self._sent_at = time.perf_counter()
        try:
            self._send_frame(header, payload)
        except _ConnectionLost:
            self._broken = True  # score_recv reports it

    def score_recv(self, n: int) -> LLMStep:
        """The answer to ``score_send``: logits [rows * n, V]."""
        rows, self._rows = self._rows, self._rows * n
        try:
            return self.recv()
        finally:
            self._rows = rows

    @property
    def reusable(self) -> bool:
        return self._ws is not None and not self._broken

    def finish(self):
        """Close the session on the server, keep the connection for the next batch."""
        sid, self._sid = self._sid, None
        self._prompts, self._fed = [], []
        if self._ws is None or sid is None:
            return
        if self._broken:
            self.close()
            return
        try:
            self._send_frame({"op": "close", "sid": sid})
            header, _ = self._recv_frame()
            if header.get("op") != "closed":
                raise StreamError(f"unexpected answer to close: {header}")
        except Exception:
            self.close()

    def close(self):
        ws, self._ws = getattr(self, "_ws", None), None
        if ws is None:
            return
        try:
            if self._sid is not None:
                ws.send(P.encode({"op": "close", "sid": self._sid}))
            ws.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------
# (c) OpenAI-compatible completions endpoint

API_KEY_ENVS = ("COSTEER_API_KEY", "OPENAI_API_KEY")  # read in this order when api_key is not given
_RETRY_STATUSES = (502, 503, 504)  # a proxy or an engine that is (re)starting: send the request again


def _parse_token_key(key: str) -> int:
    # vLLM with return_tokens_as_token_ids: "token_id:123"; accept a bare integer too.
    s = key.split(":", 1)[1] if key.startswith("token_id:") else key
    try:
        return int(s)
    except ValueError:
        raise StreamError(
            f"the endpoint returned token {key!r}, not a token id: it must support "
            f"return_tokens_as_token_ids (vLLM) or return ids"
        ) from None


class OpenAICompletionsStream(LLMStream):
    """``POST {base_url}/v1/completions`` per step, batch prompts as lists of token ids.

    Request: ``{"model", "prompt": [[ids...], ...], "max_tokens": 1, "temperature": 0,
    "logprobs": k, "return_tokens_as_token_ids": true}`` (one request for the whole batch); the
    answer's ``choices[i].logprobs.top_logprobs[0]`` ({"token_id:ID": logprob}) gives row i. Tokens
    outside the top k follow ``topk_policy`` (module docstring). The request is written in ``send``
    and the answer read in ``recv``.

    Faults: the request is idempotent (the whole prefix, greedy, one token), so when the HTTP
    connection turns out closed (an engine closes an idle keep-alive connection, vLLM after 5 s;
    the engine restarted) or the answer is 502/503/504, the stream reconnects and sends it again,
    at once and then with exponential backoff (``backoff`` s doubling up to ``max_backoff``) for at
    most ``reconnect_timeout`` s (0: never; the default, 300 s, covers an engine restart: nothing is
    lost, the prompt is the whole state). Other HTTP errors, an answer slower than ``timeout`` s
    and malformed answers raise ``StreamError`` naming the URL. ``reconnects`` counts the resends.

    ``api_key`` (default ``$COSTEER_API_KEY``, then ``$OPENAI_API_KEY``) is sent as
    ``Authorization: Bearer KEY``. ``max_len="auto"`` asks ``GET /v1/models`` for the model's
    ``max_model_len`` (vLLM and SGLang report it; None when the endpoint does not); an int sets it;
    None means unknown. The prompt plus the generated tokens must stay below it.

    Speculative steering (``costeer.speculative``): ``score_send`` / ``score_recv`` score several
    appended tokens in one request with ``prompt_logprobs=k`` (vLLM): the next-token top k after each
    of them. Engines compute every position of such a request (no prefix-cache reuse).

    Timing: ``LLMStep.roundtrip_s`` is the last attempt's request-to-answer time; ``compute_s`` is
    the engine's own time when its answer reports one (vLLM started with
    ``--enable-per-request-metrics``: its queue time plus scheduled-to-first-token), else 0.
    ``last_usage`` keeps the answer's ``usage`` (``prompt_tokens_details.cached_tokens`` is vLLM's
    prefix-cache hit when it runs with ``--enable-prompt-tokens-details``).
    """

    remote = True

    def __init__(self, base_url: str, *, model: str, vocab_size: int, k: int = 20, topk_policy: str = "restrict",
                 max_len: int | str | None = "auto", timeout: float = 60.0, api_key: Optional[str] = None,
                 reconnect_timeout: float = OPENAI_RECONNECT_TIMEOUT, backoff: float = 0.05, max_backoff: float = 2.0):
        u = urllib.parse.urlsplit(base_url if isinstance(base_url, str) else "")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"base_url must be an http(s):// URL, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be the endpoint's model name (a non-empty string), got {model!r}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if topk_policy not in TOPK_POLICIES:
            raise ValueError(f"topk_policy must be one of {TOPK_POLICIES}, got {topk_policy!r}")
        if not (max_len is None or max_len == "auto" or (isinstance(max_len, int) and not isinstance(max_len, bool)
                                                         and max_len > 1)):
            raise ValueError(f"max_len must be an int > 1, 'auto' or None, got {max_len!r}")
        for name, v in (("timeout", timeout), ("reconnect_timeout", reconnect_timeout), ("backoff", backoff),
                        ("max_backoff", max_backoff)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {v!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 s, got {timeout!r}")
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise ValueError("api_key must be a non-empty string or None")
        if api_key is None:
            api_key = next((os.environ[e] for e in API_KEY_ENVS if os.environ.get(e)), None)
        self.base_url = base_url
        self.model, self.vocab_size, self.k, self.policy = model, vocab_size, k, topk_policy
        self.timeout = float(timeout)
        self.reconnect_timeout, self.backoff, self.max_backoff = float(reconnect_timeout), float(backoff), float(max_backoff)
        self.name = f"{model}@{base_url}"
        path = u.path.rstrip("/")
        self._root = path[:-3] if path.endswith("/v1") else path
        self._path = self._root + "/v1/completions"
        self.url = f"{u.scheme}://{u.netloc}{self._path}"
        self._conn_args = (http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection,
                           u.hostname, u.port)
        self._conn = self._new_conn()
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.reconnects = 0
        self.last_usage: Optional[dict] = None
        self._prompts: List[List[int]] = []
        self._body: Optional[bytes] = None
        self._written = False
        self._score_n: Optional[int] = None
        self._sent_at = None
        self._server_s = 0.0
        self.max_len = self._discover_max_len() if max_len == "auto" else max_len

    # -- HTTP -----------------------------------------------------------------------------------

    def _new_conn(self):
        cls, host, port = self._conn_args
        return cls(host, port, timeout=self.timeout)

    def _reset(self):
        try:
            self._conn.close()  # the next request opens a new connection
        except Exception:
            pass

    def _discover_max_len(self) -> Optional[int]:
        """``max_model_len`` of ``self.model`` from ``GET /v1/models``; None when not reported."""
        url = self.url[: -len("/completions")] + "/models"
        try:
            self._conn.request("GET", self._root + "/v1/models", headers=self._headers)
            resp = self._conn.getresponse()
            raw = resp.read()
        except TimeoutError:
            self._reset()
            raise StreamError(f"no answer from {url} within {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            self._reset()
            raise StreamError(f"cannot reach the completions endpoint at {url}: {exc}") from None
        if resp.status in (401, 403):
            raise StreamError(f"{url} refused the API key (HTTP {resp.status}): pass it with --api-key or "
                              f"{' / '.join(API_KEY_ENVS)}: {raw[:200]!r}")
        if resp.status != 200:
            return None  # an endpoint without the model list: the length is unknown
        try:
            models = json.loads(raw)["data"]
            entry = next((m for m in models if m.get("id") == self.model), None)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        if entry is None:
            raise StreamError(f"{url} does not serve a model named {self.model!r} (it serves "
                              f"{[m.get('id') for m in models]}): pass one of them with --remote-model")
        n = entry.get("max_model_len")
        return int(n) if isinstance(n, int) and n > 1 else None

    def _post(self, body: dict) -> None:
        self._body = json.dumps(body).encode()
        self._written = self._write()

    def _write(self) -> bool:
        """Write the pending request; False when the connection turned out to be broken."""
        self._sent_at = time.perf_counter()
        try:
            self._conn.request("POST", self._path, body=self._body, headers=self._headers)
            return True
        except (OSError, http.client.HTTPException):
            self._reset()
            return False

    def _answer(self) -> dict:
        """The parsed JSON answer to the pending request, resending it as the class docstring says."""
        if self._body is None:
            raise RuntimeError("recv without a pending request")
        deadline = time.monotonic() + self.reconnect_timeout
        delay, attempts = self.backoff, 1
        while True:
            if self._written:
                try:
                    resp = self._conn.getresponse()
                    raw = resp.read()
                except TimeoutError:
                    self._reset()
                    raise StreamError(f"no answer from {self.url} within {self.timeout:g} s (raise --timeout "
                                      f"for slow steps)") from None
                except (OSError, http.client.HTTPException) as exc:
                    self._reset()
                    cause = f"{type(exc).__name__}: {exc}"
                else:
                    if resp.status == 200:
                        break
                    if resp.status in (401, 403):
                        raise StreamError(f"{self.url} answered HTTP {resp.status}: {_error_text(raw)} (pass the "
                                          f"endpoint's key with --api-key or {' / '.join(API_KEY_ENVS)})")
                    if resp.status not in _RETRY_STATUSES:
                        raise StreamError(f"{self.url} answered HTTP {resp.status}: {_error_text(raw)}")
                    cause = f"HTTP {resp.status}: {_error_text(raw)}"
            else:
                cause = "the connection was closed before the request could be written"
            if self.reconnect_timeout <= 0:
                raise StreamError(f"lost the connection to {self.url}: {cause}")
            if attempts > 1:  # the first resend goes at once: a keep-alive close needs no wait
                if time.monotonic() + delay > deadline:
                    raise StreamError(f"lost the connection to {self.url} and got no answer within "
                                      f"{self.reconnect_timeout:g} s ({attempts} attempts): {cause}")
                time.sleep(delay)
                delay = min(self.max_backoff, max(2 * delay, 0.01))
            attempts += 1
            self.reconnects += 1
            self._written = self._write()
        self._body = None
        try:
            data = json.loads(raw)
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StreamError(f"{self.url} gave a malformed answer ({type(exc).__name__}: {exc}): {raw[:200]!r}") from None
        if len(choices) != len(self._prompts):
            raise StreamError(f"{self.url} answered {len(choices)} choices for {len(self._prompts)} prompts")
        self.last_usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
        data["choices"] = choices
        return data

    # -- the stream protocol --------------------------------------------------------------------

    def _request(self, **extra) -> dict:
        return {"model": self.model, "prompt": self._prompts, "max_tokens": 1, "temperature": 0.0,
                "logprobs": self.k, "return_tokens_as_token_ids": True, **extra}

    def _check_room(self, n: int) -> None:
        if self.max_len is not None and max(len(p) for p in self._prompts) + n > self.max_len - 1:
            raise ValueError(f"the sequence would reach the endpoint's max_len of {self.max_len} tokens "
                             f"(prompt + generated); generate fewer tokens or serve a longer window")

    def open(self, prompts):
        self._prompts = _check_prompts(prompts, self.vocab_size, self.max_len)
        self._score_n = None
        self._post(self._request())

    def send(self, tokens):
        tokens = [int(t) for t in tokens]
        if len(tokens) != len(self._prompts):
            raise ValueError(f"tokens has {len(tokens)} entries, expected {len(self._prompts)}")
        self._check_room(1)
        for p, t in zip(self._prompts, tokens):
            p.append(t)
        self._score_n = None
        self._post(self._request())

    def _step(self, t0: float, rows: List[dict]) -> LLMStep:
        k = max(1, max(len(r) for r in rows))
        ids = torch.zeros(len(rows), k, dtype=torch.long)
        lps = torch.full((len(rows), k), float("-inf"))
        for i, top in enumerate(rows):
            for j, (tid, v) in enumerate(sorted(top.items(), key=lambda x: -x[1])):
                if not 0 <= tid < self.vocab_size:
                    raise StreamError(f"{self.url} returned token id {tid} outside the vocabulary [0, {self.vocab_size})")
                ids[i, j] = tid
                lps[i, j] = v if math.isfinite(v) else float("-inf")
            for j in range(len(top), k):  # pad short rows with a repeat of their best entry
                ids[i, j], lps[i, j] = ids[i, 0], lps[i, 0]
        t1 = time.perf_counter()
        return LLMStep(logits=dense_from_topk(ids, lps, self.vocab_size, self.policy), compute_s=self._server_s,
                       wait_s=t1 - t0, roundtrip_s=t1 - (self._sent_at or t0))

    def _generated_top(self, choice: dict) -> dict:
        try:
            top = choice["logprobs"]["top_logprobs"][0]
            return {_parse_token_key(key): float(v) for key, v in top.items()}
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            raise StreamError(f"{self.url} gave no top logprobs ({type(exc).__name__}: {exc}): it must support "
                              f"\"logprobs\" up to {self.k} (vLLM: --max-logprobs)") from None

    def _read(self) -> dict:
        data = self._answer()
        self._server_s = _server_seconds(data)
        return data

    def recv(self) -> LLMStep:
        if self._score_n is not None:
            raise RuntimeError("the pending request is a score request: read it with score_recv")
        t0 = time.perf_counter()
        data = self._read()
        return self._step(t0, [self._generated_top(c) for c in data["choices"]])

    # -- speculative steering (costeer/speculative.py's rounds)

    def score_send(self, tokens, rollback: int = 0) -> None:
        """Drop the last ``rollback`` tokens of every row, append ``tokens`` (one equal-length list per row)
        and request the next-token top k after each appended token (``prompt_logprobs``)."""
        if not isinstance(tokens, (list, tuple)) or len(tokens) != len(self._prompts):
            raise ValueError(f"tokens must hold one list per row ({len(self._prompts)} rows)")
        rows = [[int(t) for t in r] for r in tokens]
        n = len(rows[0]) if rows else 0
        if n < 1 or any(len(r) != n for r in rows):
            raise ValueError("score: every row needs the same number (>= 1) of tokens")
        if isinstance(rollback, bool) or not isinstance(rollback, int) or rollback < 0 or \
                any(rollback >= len(p) for p in self._prompts):
            raise ValueError(f"rollback must be an int in [0, prompt length), got {rollback!r}")
        for p in self._prompts:
            del p[len(p) - rollback:]
        self._check_room(n)
        for p, r in zip(self._prompts, rows):
            p.extend(r)
        self._score_n = n
        self._post(self._request(prompt_logprobs=self.k))

    def score_recv(self, n: int) -> LLMStep:
        """The answer to ``score_send``: log-probs [rows * n, V], row-major (row, appended token)."""
        if self._score_n is None or n != self._score_n:
            raise RuntimeError(f"score_recv({n}) does not match the pending score request ({self._score_n})")
        t0 = time.perf_counter()
        data = self._read()
        self._score_n = None
        out = []
        for p, c in zip(self._prompts, data["choices"]):
            plp = c.get("prompt_logprobs")
            if not isinstance(plp, list) or len(plp) != len(p):
                raise StreamError(f"{self.url} gave no prompt_logprobs for the {len(p)} prompt positions (got "
                                  f"{type(plp).__name__}{'' if not isinstance(plp, list) else f' of {len(plp)}'}): "
                                  f"the endpoint must support \"prompt_logprobs\" (vLLM)")
            # position j's entry is the distribution of token j given tokens < j: the answer after the
            # appended token at j - 1. The one after the last token is the generated token's top k.
            out.extend(self._prompt_top(plp[j]) for j in range(len(p) - n + 1, len(p)))
            out.append(self._generated_top(c))
        return self._step(t0, out)

    def _prompt_top(self, entry) -> dict:
        """A ``prompt_logprobs`` entry ({id: {"logprob", "rank"}}) as {id: logprob}, top k only: vLLM adds the
        prompt's own token with its rank when it lies outside the top k."""
        try:
            items = [(_parse_token_key(str(key)), v) for key, v in entry.items()]
            items = [(tid, float(v["logprob"]) if isinstance(v, dict) else float(v),
                      v.get("rank") if isinstance(v, dict) else None) for tid, v in items]
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise StreamError(f"{self.url} gave a malformed prompt_logprobs entry ({type(exc).__name__}: {exc})") from None
        if all(r is not None for _, _, r in items):
            return {tid: v for tid, v, r in items if r <= self.k}
        return dict(sorted(((tid, v) for tid, v, _ in items), key=lambda x: -x[1])[: self.k])

    def close(self):
        self._reset()


def _server_seconds(data: dict) -> float:
    """The engine's own time for a one-token request, when the answer reports it: vLLM with
    ``--enable-per-request-metrics`` (``metrics``: queue time + scheduled-to-first-token), else 0."""
    m = data.get("metrics")
    if not isinstance(m, dict):
        return 0.0
    parts = [m.get("queue_time_ms"), m.get("time_to_first_token_ms")]
    return sum(float(x) for x in parts if isinstance(x, (int, float))) / 1e3


def _error_text(raw: bytes) -> str:
    """The message of an error answer (OpenAI style ``{"error": {"message"}}``, or the raw start)."""
    try:
        data = json.loads(raw)
        msg = data.get("error", data) if isinstance(data, dict) else data
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
        return str(msg)[:300]
    except ValueError:
        return repr(raw[:300])
