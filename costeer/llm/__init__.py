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

Speculative steering (``costeer.speculative``) adds, where a source can: ``score_send`` /
``score_recv`` (score n appended tokens in one request: the device drafts) and ``draft_send`` /
``draft_recv`` (the LLM continues every row greedily for n tokens and returns its rows along the
way: the cloud drafts; in process and OpenAI-compatible endpoints).

Top-k sources (an OpenAI endpoint, or ``costeer serve`` in "topk" format) give only the k best
tokens. Policy for the other tokens (``topk_policy``):

* ``"restrict"`` (default): they get -inf. The steered token is always one of the LLM's top k;
  the small model re-ranks inside that set. Safe: steering can never pick a token the LLM
  considers implausible.
* ``"floor"``: they share the probability mass the top k leave, uniformly:
  ``log((1 - sum(p_topk)) / (V - k))``, capped at the smallest returned log-prob. A strong enough
  small-model delta can then promote a token outside the top k.
"""
from .base import DraftStep, LLMStep, LLMStream, MAX_VOCAB, StreamError, TOPK_POLICIES, dense_from_topk
from .inprocess import InProcessLLMStream
from .openai import API_KEY_ENVS, OPENAI_RECONNECT_TIMEOUT, OpenAICompletionsStream
from .serve_client import CA_ENV, TOKEN_ENV, WebSocketLLMStream

__all__ = [
    "API_KEY_ENVS",
    "CA_ENV",
    "DraftStep",
    "InProcessLLMStream",
    "LLMStep",
    "LLMStream",
    "MAX_VOCAB",
    "OPENAI_RECONNECT_TIMEOUT",
    "OpenAICompletionsStream",
    "StreamError",
    "TOKEN_ENV",
    "TOPK_POLICIES",
    "WebSocketLLMStream",
    "dense_from_topk",
]
