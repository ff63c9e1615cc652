"""The LLM behind ``costeer serve``: one persistent WebSocket, binary frames
(``costeer.serve.protocol``), reconnect and resume of a lost session.
"""
from __future__ import annotations

import itertools
import os
import time
from typing import List, Optional


from ..serve import protocol as P
from .base import LLMStep, LLMStream, MAX_VOCAB, StreamError, TOPK_POLICIES, _check_prompts, dense_from_topk


TOKEN_ENV = "COSTEER_TOKEN"  # the `costeer serve` token, also read by the server


CA_ENV = "COSTEER_CA_FILE"  # PEM file of a private CA that signed a `costeer serve --ssl-certfile`


# ---------------------------------------------------------------------------------------------
# (b) costeer serve


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _ConnectionLost(StreamError):
    """The connection broke (not a refusal): the stream may reconnect and resume."""


class _SessionExpired(StreamError):
    """The server freed the session after its idle timeout: open it again with the replay prefix."""


class WebSocketLLMStream(LLMStream):
    """Client of ``costeer serve``: one persistent WebSocket, binary frames (``costeer.serve.protocol``).

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

    # -- speculative steering (costeer/speculative.py, op "score" in costeer/serve/score.py)

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
