"""The one place that turns where the LLM is (a URL, or a model loaded here) into a stream source."""
from __future__ import annotations

from typing import Callable, Optional

from .base import LLMStream
from .inprocess import InProcessLLMStream
from .openai import OpenAICompletionsStream
from .serve_client import WebSocketLLMStream

URL_SCHEMES = ("ws://", "wss://", "http://", "https://")


class LLMSource:
    """Makes the stream of one generation: ``source.stream()``; ``source.name`` names the LLM.

    ``reuse`` is True when every generation gets the same stream object (a caller-owned stream).
    """

    def __init__(self, make: Callable[[], LLMStream], name: str, reuse: bool = False,
                 connection: Optional[Callable[[], Optional[LLMStream]]] = None, close: Callable[[], None] = lambda: None):
        self._make = make
        self._connection = connection or (lambda: None)
        self._close = close
        self.name = name
        self.reuse = reuse

    def stream(self) -> LLMStream:
        return self._make()

    @property
    def connection(self) -> Optional[LLMStream]:
        """The persistent connection of a ``costeer serve`` source (None for the others)."""
        return self._connection()

    def close(self) -> None:
        """Close a persistent connection (if any); the next ``stream()`` opens a new one."""
        self._close()


def from_stream(stream: LLMStream) -> LLMSource:
    """A caller's ready stream, reused by every generation."""
    if not isinstance(stream, LLMStream):
        raise TypeError(f"llm_stream must be an LLMStream, got {type(stream).__name__}")
    return LLMSource(lambda: stream, stream.name, reuse=True)


def in_process(model) -> LLMSource:
    """A ``LoadedModel`` in this process; each generation gets a fresh stream (its own KV cache)."""
    return LLMSource(lambda: InProcessLLMStream(model), model.name)


def from_url(url: str, *, vocab_size: int, model: str = "default", response_format: str = "full",
             transport_dtype: str = "float16", topk: int = 20, topk_policy: str = "restrict", timeout: float = 60.0,
             token: Optional[str] = None, api_key: Optional[str] = None,
             reconnect_timeout: Optional[float] = None, score: str = "prompts") -> LLMSource:
    """``ws(s)://`` a ``costeer serve`` (one persistent connection, checked now so an unreachable
    server fails at once), ``http(s)://`` an OpenAI-compatible ``/v1/completions`` endpoint.
    ``reconnect_timeout`` None keeps each stream's own default; ``score``: how an ``http(s)://``
    endpoint scores speculative drafts (``OpenAICompletionsStream``)."""
    if not isinstance(url, str):
        raise TypeError(f"llm_url must be a string, got {type(url).__name__}")
    retry = {} if reconnect_timeout is None else {"reconnect_timeout": reconnect_timeout}
    if url.startswith(("ws://", "wss://")):
        kw = dict(response_format=response_format, dtype=transport_dtype, k=topk, topk_policy=topk_policy,
                  timeout=timeout, token=token, **retry)
        current = [WebSocketLLMStream(url, **kw)]  # ONE persistent connection, reused by every generation

        def connection() -> LLMStream:
            if current[0] is None or not current[0].reusable:
                current[0] = WebSocketLLMStream(url, **kw)
            return current[0]

        def close() -> None:
            if current[0] is not None:
                current[0].close()
                current[0] = None

        return LLMSource(connection, current[0].name, connection=lambda: current[0], close=close)
    if url.startswith(("http://", "https://")):
        return LLMSource(lambda: OpenAICompletionsStream(url, model=model, vocab_size=vocab_size, k=topk,
                                                         topk_policy=topk_policy, timeout=timeout, api_key=api_key,
                                                         score=score, **retry),
                         f"{model}@{url}")
    raise ValueError(f"llm_url must start with ws://, wss://, http:// or https://, got {url!r}")
