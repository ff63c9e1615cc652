"""The LLM behind any OpenAI-compatible ``/v1/completions`` endpoint with logprobs (vLLM, SGLang's
OpenAI server): prompt as token ids, ``max_tokens=1``, ``logprobs=k``,
``return_tokens_as_token_ids=true``; resends on a closed keep-alive connection.
"""
from __future__ import annotations

import http.client
import json
import math
import os
import time
import urllib.parse
from typing import List, Optional, Tuple

import torch

from .base import DraftStep, LLMStep, LLMStream, StreamError, TOPK_POLICIES, _check_prompts, dense_from_topk

# How score_send asks for the top k after each of n appended tokens (OpenAICompletionsStream).
SCORE_MODES = ("prompts", "prompt_logprobs")


# How long an OpenAI-compatible stream keeps resending a step whose connection broke. An engine
# restart is the long case: vLLM's CPU build is back in 1-2 minutes on 2 cores, a GPU engine loading a
# large model takes minutes; costeer serve (WebSocketLLMStream, 30 s) starts in seconds.
OPENAI_RECONNECT_TIMEOUT = 300.0


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

    Speculative steering (``costeer.speculative``): ``score_send`` / ``score_recv`` score n appended
    tokens in one request. ``score="prompts"`` (the default) sends one prompt per appended token, each
    ending at it, with ``max_tokens=1``: any OpenAI-compatible engine answers that, and its prefix
    cache computes only each prompt's uncached tail (vLLM caches whole KV blocks: on its CPU build,
    whose default block is 128 tokens, start it with ``--block-size 32`` as ``scripts/vllm_cpu.py``
    does, or a prompt shorter than a block is computed whole n times). ``score="prompt_logprobs"``
    sends the whole sequence once with ``prompt_logprobs=k`` (vLLM only); the engine computes every
    position of such a request, and the logits and top k of all of them (no prefix-cache reuse).
    ``draft_send`` / ``draft_recv`` (the "cloud" proposal) ask the engine to continue every row
    greedily for n tokens (``max_tokens=n``, ``logprobs=k``) and return its tokens and the top k at
    each: a plain completion request, on the prefix cache, any OpenAI-compatible engine.

    Timing: ``LLMStep.roundtrip_s`` is the last attempt's request-to-answer time; ``compute_s`` is
    the engine's own time when its answer reports one (vLLM started with
    ``--enable-per-request-metrics``: its queue time plus scheduled-to-first-token), else 0.
    ``last_usage`` keeps the answer's ``usage`` (``prompt_tokens_details.cached_tokens`` is vLLM's
    prefix-cache hit when it runs with ``--enable-prompt-tokens-details``).
    """

    remote = True

    def __init__(self, base_url: str, *, model: str, vocab_size: int, k: int = 20, topk_policy: str = "restrict",
                 max_len: int | str | None = "auto", timeout: float = 60.0, api_key: Optional[str] = None,
                 reconnect_timeout: float = OPENAI_RECONNECT_TIMEOUT, backoff: float = 0.05, max_backoff: float = 2.0,
                 score: str = "prompts", stream_drafts: bool = True):
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
        if score not in SCORE_MODES:
            raise ValueError(f"score must be one of {SCORE_MODES}, got {score!r}")
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
        self.model, self.vocab_size, self.k, self.policy, self.score = model, vocab_size, k, topk_policy, score
        self.streams_drafts = bool(stream_drafts)
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
        self._draft_n: Optional[int] = None
        self._draft_live: List[bool] = []
        self._choices = 0
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
        self._choices = len(body["prompt"])
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
        raw = self._response()[1]
        try:
            data = json.loads(raw)
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StreamError(f"{self.url} gave a malformed answer ({type(exc).__name__}: {exc}): {raw[:200]!r}") from None
        if len(choices) != self._choices:
            raise StreamError(f"{self.url} answered {len(choices)} choices for {self._choices} prompts")
        self.last_usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
        data["choices"] = choices
        return data

    def _response(self, read: bool = True):
        """(response, body) of the pending request once its status is 200, resending it as the class
        docstring says; ``read=False`` leaves a 200 answer's body unread (b"": a streamed answer)."""
        if self._body is None:
            raise RuntimeError("recv without a pending request")
        deadline = time.monotonic() + self.reconnect_timeout
        delay, attempts = self.backoff, 1
        while True:
            if self._written:
                try:
                    resp = self._conn.getresponse()
                    raw = resp.read() if read or resp.status != 200 else b""
                except TimeoutError:
                    raise self._timed_out("no answer") from None
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
        return resp, raw

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
        self._score_n = self._draft_n = None
        self._post(self._request())

    def send(self, tokens):
        tokens = [int(t) for t in tokens]
        if len(tokens) != len(self._prompts):
            raise ValueError(f"tokens has {len(tokens)} entries, expected {len(self._prompts)}")
        self._check_room(1)
        for p, t in zip(self._prompts, tokens):
            p.append(t)
        self._score_n = self._draft_n = None
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
        if self._score_n is not None or self._draft_n is not None:
            raise RuntimeError("the pending request is a score or draft request: read it with score_recv / draft_recv")
        t0 = time.perf_counter()
        data = self._read()
        return self._step(t0, [self._generated_top(c) for c in data["choices"]])

    # -- speculative steering (costeer/speculative.py's rounds)

    def _roll_and_append(self, rollback, rows: List[List[int]], n: int) -> None:
        """Drop the last ``rollback`` tokens of every row, check that ``n`` more positions fit the
        window, append ``rows`` (one list per row)."""
        if isinstance(rollback, bool) or not isinstance(rollback, int) or rollback < 0 or \
                any(rollback >= len(p) for p in self._prompts):
            raise ValueError(f"rollback must be an int in [0, prompt length), got {rollback!r}")
        for p in self._prompts:
            del p[len(p) - rollback:]
        self._check_room(n)
        for p, r in zip(self._prompts, rows):
            p.extend(r)

    def score_send(self, tokens, rollback: int = 0) -> None:
        """Drop the last ``rollback`` tokens of every row, append ``tokens`` (one equal-length list per row)
        and request the next-token top k after each appended token (as ``score`` says)."""
        if not isinstance(tokens, (list, tuple)) or len(tokens) != len(self._prompts):
            raise ValueError(f"tokens must hold one list per row ({len(self._prompts)} rows)")
        rows = [[int(t) for t in r] for r in tokens]
        n = len(rows[0]) if rows else 0
        if n < 1 or any(len(r) != n for r in rows):
            raise ValueError("score: every row needs the same number (>= 1) of tokens")
        self._roll_and_append(rollback, rows, n)
        self._score_n, self._draft_n = n, None
        if self.score == "prompts":  # row-major: row r's prompts end at its 1st, ..., n-th appended token
            self._post(self._request(prompt=[p[:len(p) - n + 1 + i] for p in self._prompts for i in range(n)]))
        else:
            self._post(self._request(prompt_logprobs=self.k))

    def score_recv(self, n: int) -> LLMStep:
        """The answer to ``score_send``: log-probs [rows * n, V], row-major (row, appended token)."""
        if self._score_n is None or n != self._score_n:
            raise RuntimeError(f"score_recv({n}) does not match the pending score request ({self._score_n})")
        t0 = time.perf_counter()
        data = self._read()
        self._score_n = None
        if self.score == "prompts":
            return self._step(t0, [self._generated_top(c) for c in data["choices"]])
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

    def draft_send(self, tokens, n: int, rollback: int = 0, live=None) -> None:
        """Drop the last ``rollback`` tokens of every row, append ``tokens`` (one per row) and ask the
        engine to continue every row greedily for ``n`` tokens with the top k at each
        (``max_tokens=n``): the cloud drafts. A plain completion request: the engine's prefix cache
        serves the known sequence and its own decoding the n tokens. ``live`` (one bool per row,
        default all): False marks a row whose generation already ended; the engine may end it at
        once, so it never shortens the round, and its answer is replaced by a live row's (filler)."""
        toks = [int(t) for t in tokens] if isinstance(tokens, (list, tuple)) else None
        if toks is None or len(toks) != len(self._prompts):
            raise ValueError(f"tokens must hold one token id per row ({len(self._prompts)} rows)")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        live = [True] * len(toks) if live is None else [bool(x) for x in live]
        if len(live) != len(toks) or not any(live):
            raise ValueError(f"live must hold one bool per row ({len(toks)} rows), at least one True")
        self._roll_and_append(rollback, [[t] for t in toks], n)
        self._score_n, self._draft_n, self._draft_live = None, n, live
        extra = {"stream": True} if self.streams_drafts else {}
        self._post(self._request(max_tokens=n, **extra))

    def draft_recv(self, n: int) -> DraftStep:
        """The answer to ``draft_send``: the engine's tokens [rows, n'] and log-probs [rows * n', V]
        (row-major), n' <= n the shortest row's count (the engine ends a row at its end of sequence).
        The sequence keeps the first n' - 1 drafted tokens (the next request rolls back the rejected)."""
        if self._draft_n is None or n != self._draft_n:
            raise RuntimeError(f"draft_recv({n}) does not match the pending draft request ({self._draft_n})")
        t0 = time.perf_counter()
        if self.streams_drafts:
            got = list(self.draft_iter(n))
            logits = torch.stack([g[1].logits for g in got], 1)
            return DraftStep(logits=logits.reshape(-1, logits.shape[-1]), wait_s=time.perf_counter() - t0,
                             roundtrip_s=time.perf_counter() - (self._sent_at or t0),
                             tokens=torch.stack([g[0] for g in got], 1))
        data = self._read()
        self._draft_n = None
        seqs = []
        for c in data["choices"]:
            ids, tops = self._choice_tokens(c.get("logprobs") if isinstance(c, dict) else None, "gave")
            if not ids or len(tops) != len(ids) or len(ids) > n:
                raise StreamError(f"{self.url} answered {len(ids)} tokens with {len(tops)} top-logprob entries "
                                  f"for max_tokens={n}")
            seqs.append((ids, tops))
        live = self._draft_live
        m = min(len(ids) for (ids, _), on in zip(seqs, live) if on)
        ref = seqs[live.index(True)]
        seqs = [seq if on else ref for seq, on in zip(seqs, live)]  # an ended generation's row: filler
        step = self._step(t0, [tops[i] for _, tops in seqs for i in range(m)])
        for p, (ids, _) in zip(self._prompts, seqs):
            p.extend(ids[:m - 1])
        tokens = torch.tensor([ids[:m] for ids, _ in seqs], dtype=torch.long)
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size:
            raise StreamError(f"{self.url} returned a token id outside the vocabulary [0, {self.vocab_size})")
        return DraftStep(logits=step.logits, compute_s=step.compute_s, wait_s=step.wait_s,
                         roundtrip_s=step.roundtrip_s, tokens=tokens)

    def draft_iter(self, n: int):
        """The answer to a streamed ``draft_send`` (``stream_drafts=True``: ``"stream": true``, the
        engine's server-sent events), position by position as the engine decodes: yields
        ``(tokens int64 [rows], LLMStep)`` for position i once every row has its i-th token, so the
        caller's local passes of c_i run while the engine decodes c_{i+1}. Ends after n positions or
        where the shortest row ended; the sequence then keeps all but the last position's tokens.
        The caller may close the iteration early (``.close()``): the connection is dropped, so the
        engine stops decoding the answer, and the sequence keeps the yielded positions but the last.

        An answer cut mid-stream (connection lost, engine restarted) is requested again, as any
        request (the class docstring's reconnects): greedy decoding of the same sequence gives the
        same tokens, so the positions already yielded are checked and skipped (a different token is
        a ``StreamError``: the engine is not deterministic)."""
        if self._draft_n is None or n != self._draft_n:
            raise RuntimeError(f"draft_iter({n}) does not match the pending draft request ({self._draft_n})")
        if not self.streams_drafts:
            raise RuntimeError("draft_iter needs stream_drafts=True")
        t0 = time.perf_counter()
        body = self._body
        self._draft_n = None
        self._server_s = 0.0
        B = len(self._prompts)
        live = [i for i in range(B) if self._draft_live[i]]
        m = 0  # positions yielded
        seen: List[List[int]] = []  # the yielded positions' tokens
        deadline = time.monotonic() + self.reconnect_timeout
        delay, resends = self.backoff, 0
        try:
            while True:
                resp, _ = self._response(read=False)
                ids: List[List[int]] = [[] for _ in range(B)]
                tops: List[List[dict]] = [[] for _ in range(B)]
                ended = [False] * B
                complete, at, events = False, 0, 0
                try:
                    while not complete:
                        line = resp.readline()
                        if not line:
                            break
                        line = line.strip()
                        if not line.startswith(b"data:"):
                            if events == 0 and line.startswith((b"{", b"[", b"<")):
                                raise StreamError(f"{self.url} answered a streamed request without server-sent events "
                                                  f"({line[:200]!r}): the engine must support \"stream\": true, or "
                                                  f"use stream_drafts=False")
                            continue
                        events += 1
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            complete = self._drain(resp)
                            break
                        for c in self._event_choices(payload, B):
                            if self._draft_live[c.get("index", 0)]:  # an ended generation's row: filler below
                                self._event_tokens(c, ids, tops, ended, n)
                        while at < n and all(len(ids[i]) > at for i in live):
                            # a row whose generation ended gets a live row's entry as filler
                            for i in range(B):
                                if not self._draft_live[i]:
                                    ids[i].append(ids[live[0]][at])
                                    tops[i].append(tops[live[0]][at])
                            tokens = [r[at] for r in ids]
                            if at < m:  # a resent request: its positions must be the ones already used
                                if [tokens[i] for i in live] != [seen[at][i] for i in live]:
                                    raise StreamError(f"{self.url} answered the resent draft request with other tokens "
                                                      f"at position {at} ({tokens} != {seen[at]}): greedy decoding is "
                                                      f"not deterministic on this engine")
                            else:
                                if min(tokens) < 0 or max(tokens) >= self.vocab_size:
                                    raise StreamError(f"{self.url} returned a token id outside the vocabulary "
                                                      f"[0, {self.vocab_size})")
                                step = self._step(t0, [t[at] for t in tops])
                                seen.append(tokens)
                                m += 1
                                yield torch.tensor(tokens, dtype=torch.long), step
                            at += 1
                        if at == n:  # the round's positions are all here: drain the answer (keep-alive)
                            complete = self._drain(resp)
                        elif any(ended[i] and len(ids[i]) <= at for i in live):
                            # a live row ended (its end of sequence): the round ends with it; drop the
                            # connection rather than wait for the other rows' decoding
                            self._reset()
                            complete = True
                    cause = None if complete else "the answer ended before its last event"
                except StreamError:
                    self._reset()
                    raise
                except TimeoutError:
                    raise self._timed_out("no event", " while it streamed a draft") from None
                except (OSError, http.client.HTTPException) as exc:
                    self._reset()
                    cause = f"{type(exc).__name__}: {exc}"
                except BaseException:
                    self._reset()  # an unread answer on the connection: the next request opens a new one
                    raise
                if cause is None:
                    break
                if self.reconnect_timeout <= 0 or time.monotonic() + (delay if resends else 0) > deadline:
                    raise StreamError(f"lost the connection to {self.url} while it streamed a draft: {cause}")
                if resends:  # the first resend goes at once, then with the same backoff as any request
                    time.sleep(delay)
                    delay = min(self.max_backoff, max(2 * delay, 0.01))
                resends += 1
                self._reset()
                self.reconnects += 1
                self._body = body
                self._written = self._write()
            if m == 0:
                raise StreamError(f"{self.url} streamed no generated token for max_tokens={n}")
        finally:
            # the sequence keeps the yielded positions' tokens but the last (also when the caller
            # closes the iteration early: the round ended there)
            for b, p in enumerate(self._prompts):
                p.extend(seen[t][b] for t in range(m - 1))

    def _timed_out(self, what: str, during: str = "") -> StreamError:
        self._reset()
        return StreamError(f"{what} from {self.url} within {self.timeout:g} s{during} (raise --timeout for slow steps)")

    def _drain(self, resp) -> bool:
        """Read the rest of a streamed answer so that the connection can carry the next request;
        a failure there only costs the connection (every position is already read). True."""
        try:
            resp.read()
        except (OSError, http.client.HTTPException):
            self._reset()
        return True

    def _choice_tokens(self, lp, verb: str) -> Tuple[List[int], List[dict]]:
        """A generated choice's ``logprobs`` (one answer's, or one server-sent event's) as (token ids,
        top k {id: logprob} per token); ``verb`` says how it came in the error ("gave", "streamed")."""
        try:
            return ([_parse_token_key(str(t)) for t in lp["tokens"]],
                    [{_parse_token_key(key): float(v) for key, v in top.items()} for top in lp["top_logprobs"]])
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise StreamError(f"{self.url} {verb} no tokens and top logprobs per generated token "
                              f"({type(exc).__name__}: {exc}): it must support \"logprobs\" up to {self.k} "
                              f"(vLLM: --max-logprobs) and return_tokens_as_token_ids") from None

    def _event_tokens(self, c: dict, ids, tops, ended, n: int) -> None:
        """One streamed choice's tokens and top k appended to its row."""
        i = c.get("index", 0)
        lp = c.get("logprobs")
        if lp:
            got_ids, got_tops = self._choice_tokens(lp, "streamed")
            ids[i].extend(got_ids)
            tops[i].extend(got_tops)
            if len(tops[i]) != len(ids[i]) or len(ids[i]) > n:
                raise StreamError(f"{self.url} streamed {len(ids[i])} tokens with {len(tops[i])} top-logprob "
                                  f"entries for max_tokens={n}")
        if c.get("finish_reason"):
            ended[i] = True

    def _event_choices(self, payload: bytes, B: int) -> list:
        try:
            data = json.loads(payload)
        except ValueError:
            raise StreamError(f"{self.url} streamed a malformed event: {payload[:200]!r}") from None
        if not isinstance(data, dict) or "error" in data:
            raise StreamError(f"{self.url} streamed an error: {_error_text(payload)}")
        choices = data.get("choices")
        if not isinstance(choices, list) or any(not isinstance(c, dict) or not isinstance(c.get("index", 0), int)
                                                or isinstance(c.get("index", 0), bool) or not 0 <= c.get("index", 0) < B
                                                for c in choices):
            raise StreamError(f"{self.url} streamed an event without valid choices: {payload[:200]!r}")
        return choices

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
