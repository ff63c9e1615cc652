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

    def close(self):
        self._kv = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


# ---------------------------------------------------------------------------------------------
# (b) costeer serve


class WebSocketLLMStream(LLMStream):
    """Client of ``costeer serve``: one persistent WebSocket, binary frames (``costeer.protocol``).

    ``response_format="full"`` receives the whole vocabulary in ``dtype`` (float16 by default,
    ~100 KB per row for V=49152); ``"topk"`` receives ``k`` ids + log-probs per row and applies
    ``topk_policy``.
    """

    remote = True
    _ids = itertools.count(1)

    def __init__(self, url: str, *, response_format: str = "full", dtype: str = "float16", k: int = 20,
                 topk_policy: str = "restrict", timeout: float = 60.0, max_frame_bytes: int = 64 * 2**20):
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            raise ValueError(f"llm_url must be a ws:// or wss:// URL (printed by `costeer serve`), got {url!r}")
        if response_format not in P.FORMATS:
            raise ValueError(f"response_format must be one of {P.FORMATS}, got {response_format!r}")
        if dtype not in P.WIRE_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(P.WIRE_DTYPES)}, got {dtype!r}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if topk_policy not in TOPK_POLICIES:
            raise ValueError(f"topk_policy must be one of {TOPK_POLICIES}, got {topk_policy!r}")
        from websockets.sync.client import connect

        self.url, self.format, self.dtype, self.k, self.policy = url, response_format, dtype, k, topk_policy
        self.timeout = timeout
        try:
            # Entered as a context manager (websockets >= 17.1 deprecates direct use); left in close().
            self._ws = connect(url, compression=None, max_size=max_frame_bytes, open_timeout=timeout,
                               close_timeout=2).__enter__()
        except Exception as exc:
            raise StreamError(
                f"cannot reach the LLM server at {url}: {exc}. Start one with "
                f"`costeer serve --host 127.0.0.1 --port PORT` and pass the URL it prints to --llm-url"
            ) from None
        hello = self._request({"op": "hello"})[0]
        if hello.get("op") != "hello" or hello.get("protocol") != P.PROTOCOL_VERSION:
            self._ws.close()
            raise StreamError(f"{url} does not speak the costeer protocol v{P.PROTOCOL_VERSION}: {hello}")
        self.info = hello
        self.name = f"{hello.get('model')}@{url}"
        self.vocab_size = int(hello["vocab_size"])
        self.max_len = int(hello["max_len"])
        self.eos_token_ids = [int(x) for x in hello.get("eos_token_ids", [])]
        self._sid = None
        self._rows = 0
        self._sent_at = None

    def _send_frame(self, header, payload=b""):
        try:
            self._ws.send(P.encode(header, payload))
        except Exception as exc:
            raise StreamError(f"lost the connection to {self.url}: {exc}") from None

    def _recv_frame(self):
        try:
            frame = self._ws.recv(timeout=self.timeout)
        except TimeoutError:
            raise StreamError(f"no answer from {self.url} within {self.timeout} s") from None
        except Exception as exc:
            raise StreamError(f"lost the connection to {self.url}: {exc}") from None
        header, payload = P.decode(frame)
        if header["op"] == "error":
            raise StreamError(f"the LLM server refused: {header.get('message')}")
        return header, payload

    def _request(self, header, payload=b""):
        self._send_frame(header, payload)
        return self._recv_frame()

    def open(self, prompts):
        prompts = _check_prompts(prompts, self.vocab_size, self.max_len)
        self._sid = next(self._ids)
        self._rows = len(prompts)
        flat = [x for p in prompts for x in p]
        self._sent_at = time.perf_counter()
        self._send_frame({"op": "open", "sid": self._sid, "rows": [len(p) for p in prompts],
                          "format": self.format, "dtype": self.dtype, "k": self.k}, P.pack_int32(flat))

    def send(self, tokens):
        tokens = [int(t) for t in tokens]
        if len(tokens) != self._rows:
            raise ValueError(f"tokens has {len(tokens)} entries, expected {self._rows}")
        self._sent_at = time.perf_counter()
        self._send_frame({"op": "step", "sid": self._sid}, P.pack_int32(tokens))

    def recv(self) -> LLMStep:
        t0 = time.perf_counter()
        header, payload = self._recv_frame()
        if header.get("op") != "logits" or header.get("sid") != self._sid:
            raise StreamError(f"unexpected answer from {self.url}: {header}")
        rows = int(header["rows"])
        if rows != self._rows:
            raise StreamError(f"server answered {rows} rows, expected {self._rows}")
        if header["format"] == "full":
            logits = P.unpack_full(payload, rows, int(header["vocab_size"]), header["dtype"])
        else:
            ids, lp = P.unpack_topk(payload, rows, int(header["k"]))
            logits = dense_from_topk(ids, lp, self.vocab_size, self.policy)
        t1 = time.perf_counter()
        return LLMStep(logits=logits, compute_s=float(header.get("compute_ms", 0.0)) / 1e3, wait_s=t1 - t0,
                       roundtrip_s=t1 - (self._sent_at or t0))

    # -- speculative steering (costeer/speculative.py, op "score" in costeer/spec_server.py)

    def score_send(self, tokens, rollback: int = 0) -> None:
        """Roll back ``rollback`` positions, then append ``tokens`` (one equal-length list per row)."""
        from .spec_server import score_frame

        header, payload = score_frame(self._sid, tokens, rollback)
        self._sent_at = time.perf_counter()
        self._send_frame(header, payload)

    def score_recv(self, n: int) -> LLMStep:
        """The answer to ``score_send``: logits [rows * n, V]."""
        rows, self._rows = self._rows, self._rows * n
        try:
            return self.recv()
        finally:
            self._rows = rows

    @property
    def reusable(self) -> bool:
        return self._ws is not None

    def finish(self):
        """Close the session on the server, keep the connection for the next batch."""
        if self._ws is None or self._sid is None:
            return
        sid, self._sid = self._sid, None
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
    "logprobs": k, "return_tokens_as_token_ids": true}``; the answer's
    ``choices[i].logprobs.top_logprobs[0]`` ({"token_id:ID": logprob}) gives row i. Tokens outside
    the top k follow ``topk_policy`` (module docstring). The HTTP connection is kept alive; the
    request is written in ``send`` and the answer read in ``recv``.
    """

    remote = True

    def __init__(self, base_url: str, *, model: str, vocab_size: int, k: int = 20, topk_policy: str = "restrict",
                 max_len: Optional[int] = None, timeout: float = 60.0, api_key: Optional[str] = None):
        u = urllib.parse.urlsplit(base_url if isinstance(base_url, str) else "")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"base_url must be an http(s):// URL, got {base_url!r}")
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if topk_policy not in TOPK_POLICIES:
            raise ValueError(f"topk_policy must be one of {TOPK_POLICIES}, got {topk_policy!r}")
        self.base_url = base_url
        self.model, self.vocab_size, self.k, self.policy = model, vocab_size, k, topk_policy
        self.max_len, self.timeout = max_len, timeout
        self.name = f"{model}@{base_url}"
        path = u.path.rstrip("/")
        self._path = (path if path.endswith("/v1") else path + "/v1") + "/completions"
        conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        self._conn = conn_cls(u.hostname, u.port, timeout=timeout)
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._prompts: List[List[int]] = []
        self._sent_at = None

    def _post(self):
        body = json.dumps({"model": self.model, "prompt": self._prompts, "max_tokens": 1, "temperature": 0.0,
                           "logprobs": self.k, "return_tokens_as_token_ids": True}).encode()
        self._sent_at = time.perf_counter()
        try:
            self._conn.request("POST", self._path, body=body, headers=self._headers)
        except OSError as exc:
            raise StreamError(f"cannot reach the completions endpoint {self.base_url}: {exc}") from None

    def open(self, prompts):
        self._prompts = _check_prompts(prompts, self.vocab_size, self.max_len)
        self._post()

    def send(self, tokens):
        tokens = [int(t) for t in tokens]
        if len(tokens) != len(self._prompts):
            raise ValueError(f"tokens has {len(tokens)} entries, expected {len(self._prompts)}")
        for p, t in zip(self._prompts, tokens):
            p.append(t)
        self._post()

    def recv(self) -> LLMStep:
        t0 = time.perf_counter()
        try:
            resp = self._conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise StreamError(f"no answer from the completions endpoint {self.base_url}: {exc}") from None
        if resp.status != 200:
            raise StreamError(f"completions endpoint {self.base_url} answered HTTP {resp.status}: {raw[:300]!r}")
        try:
            data = json.loads(raw)
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            tops = [c["logprobs"]["top_logprobs"][0] for c in choices]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise StreamError(f"completions endpoint {self.base_url} gave no top logprobs: {exc}") from None
        if len(tops) != len(self._prompts):
            raise StreamError(f"endpoint answered {len(tops)} choices for {len(self._prompts)} prompts")
        k = max(1, max(len(t) for t in tops))
        ids = torch.zeros(len(tops), k, dtype=torch.long)
        lps = torch.full((len(tops), k), float("-inf"))
        for i, top in enumerate(tops):
            items = sorted(((_parse_token_key(key), float(v)) for key, v in top.items()), key=lambda x: -x[1])
            for j, (tid, v) in enumerate(items):
                if not 0 <= tid < self.vocab_size:
                    raise StreamError(f"endpoint returned token id {tid} outside the vocabulary")
                ids[i, j] = tid
                lps[i, j] = v if math.isfinite(v) else float("-inf")
            for j in range(len(items), k):  # pad short rows with a repeat of their best entry
                ids[i, j], lps[i, j] = ids[i, 0], lps[i, 0]
        t1 = time.perf_counter()
        rt = t1 - (self._sent_at or t0)
        return LLMStep(logits=dense_from_topk(ids, lps, self.vocab_size, self.policy), compute_s=0.0,
                       wait_s=t1 - t0, roundtrip_s=rt)

    def close(self):
        try:
            self._conn.close()
        except Exception:
            pass
