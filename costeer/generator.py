"""``costeer.Generator``: the CoSteer decoding loop.

Per step, for a batch of B requests:

    llm.send(tokens)              # the remote request for step t+1 leaves (does not wait)
    local = slm.step(tokens)      # with- and without-context passes: ONE batched forward (2B rows)
    z_L = llm.recv().logits       # the LLM's logits for step t+1
    logp = steer_step(z_L, local) # costeer_kernels.steer: log_softmax(z_L + c_T (z_c - z_n))
    tokens = choose(logp)         # greedy or seeded sampling, per request

The LLM only ever receives the public prompt's token ids and the chosen tokens. The private
context is read by the small model alone (it goes into the user message of the with-context pass).

When the LLM is the very same in-process model object as the small model (the embedded default
with one model in both roles), its rows join the small model's batch (3B rows, one forward per
step: "co-batching"); ``cobatch=False`` keeps the three passes apart.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch

import costeer_kernels
from costeer_kernels import SteerConfig

from .gating import ConfidenceGate
from .models import DEFAULT_MODEL, LoadedModel, load_model, load_tokenizer, same_vocabulary
from .slm import LocalOutput, LocalRunner
from .streams import InProcessLLMStream, LLMStream, OpenAICompletionsStream, WebSocketLLMStream

MODES = ("costeer", "llm", "slm")
DEFAULT_CONTEXT_TEMPLATE = "Here is some information about me:\n{context}\n\n{prompt}"


def steer_step(llm_logits: torch.Tensor, local: LocalOutput, cfg: SteerConfig) -> torch.Tensor:
    """THE steering call of the loop (one place to swap in ``steer_from_hidden`` / ``steer_sample``).

    ``local.hidden["ctx"]`` / ``local.hidden["noctx"]`` hold the final hidden states for
    ``costeer_kernels.steer_from_hidden(llm_logits, h_ctx, h_noctx, lm_head_weight, cfg)``.
    """
    return costeer_kernels.steer(llm_logits, local.logits["ctx"], local.logits["noctx"], cfg)


# ---------------------------------------------------------------------------------------------
# Requests, results, timings


@dataclass
class Request:
    """One generation request. ``context`` is private: only the small model ever reads it."""

    prompt: str
    context: str = ""
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Sequence[str] = ()


@dataclass
class StepTiming:
    """Seconds spent in one decoding step of a batch."""

    step: int
    llm_s: float  # waiting for the LLM's logits (its compute, or the rest of the round trip)
    llm_compute_s: float  # the LLM's own compute (server-side for costeer serve; 0 if unknown)
    transport_s: float  # round trip minus LLM compute (remote streams)
    local_s: float  # small-model passes (and the co-batched LLM rows)
    steer_s: float
    sample_s: float  # token choice, detokenization, stop checks
    total_s: float


@dataclass
class Result:
    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "eos", "stop", "length", "error"
    error: Optional[str] = None
    prompt_tokens: int = 0
    context_tokens: int = 0
    elapsed_s: float = 0.0
    prefill_s: float = 0.0
    timings: List[StepTiming] = field(default_factory=list)  # shared by the requests of a batch
    steered_tokens: int = 0  # tokens chosen from the steered distribution (the rest: gated off)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def timing_summary(self) -> Dict[str, float]:
        """Mean milliseconds per decoding step of each component."""
        n = max(1, len(self.timings))
        keys = ("llm_s", "llm_compute_s", "transport_s", "local_s", "steer_s", "sample_s", "total_s")
        out = {k.replace("_s", "_ms"): 1e3 * sum(getattr(t, k) for t in self.timings) / n for k in keys}
        out["steps"] = len(self.timings)
        out["prefill_ms"] = 1e3 * self.prefill_s
        return out


@dataclass
class TextChunk:
    index: int  # which request
    text: str  # new text (may be "")
    done: bool = False
    result: Optional[Result] = None  # set when done
    token: Optional[int] = None  # the token id this step appended to the request (None: none, e.g. EOS)


class GenerationError(RuntimeError):
    """Generation failed part way; ``results`` hold everything produced before the failure."""

    def __init__(self, message: str, results: List[Result]):
        super().__init__(message)
        self.results = results


# ---------------------------------------------------------------------------------------------
# Prompts


def chat_ids(tokenizer, user_text: str, system_prompt: Optional[str] = None) -> List[int]:
    """Token ids of one user turn through the tokenizer's chat template (plain text without one)."""
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": user_text}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = (system_prompt + "\n\n" if system_prompt else "") + user_text
    return list(tokenizer(text)["input_ids"])


def build_prompts(llm_tokenizer, slm_tokenizer, prompt: str, context: str, *,
                  context_template: str = DEFAULT_CONTEXT_TEMPLATE, system_prompt: Optional[str] = None):
    """(public ids for the LLM, with-context ids and without-context ids for the small model)."""
    public = chat_ids(llm_tokenizer, prompt, system_prompt)
    noctx = chat_ids(slm_tokenizer, prompt, system_prompt)
    ctx = chat_ids(slm_tokenizer, context_template.format(context=context, prompt=prompt), system_prompt)
    return public, ctx, noctx


# ---------------------------------------------------------------------------------------------
# Incremental text with stop strings


class _Text:
    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tok = tokenizer
        self.stop = [s for s in stop]
        self.emitted = ""

    def update(self, ids: List[int], final: bool = False):
        """(new text to emit, stopped?, full text so far truncated at a stop string)."""
        text = self.tok.decode(ids, skip_special_tokens=True)
        stopped = False
        if self.stop:
            hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
            if hits:
                text, stopped = text[:min(hits)], True
        safe = text
        if not (stopped or final):
            safe = safe.rstrip("\ufffd")  # an incomplete UTF-8 sequence
            for s in self.stop:  # hold back what could still become a stop string
                for n in range(min(len(s) - 1, len(safe)), 0, -1):
                    if safe.endswith(s[:n]):
                        safe = safe[:-n]
                        break
        if safe.startswith(self.emitted):
            delta = safe[len(self.emitted):]
        else:  # the decoder revised earlier text (rare); emit from the same offset
            delta = safe[len(self.emitted):] if len(safe) > len(self.emitted) else ""
        if len(safe) >= len(self.emitted):
            self.emitted = safe
        return delta, stopped, text


# ---------------------------------------------------------------------------------------------
# The generator


GateFn = Callable[[int, int, torch.Tensor], bool]


class Generator:
    """CoSteer generation: a cloud LLM steered by a local small model that reads a private context.

    Args:
        llm: the LLM (alias / HF id / path, or a ``LoadedModel``), used in process unless
            ``llm_url`` or ``llm_stream`` is given. Default: the embedded SmolLM2-135M-Instruct.
        slm: the small model (same forms). Default: the embedded SmolLM2-135M-Instruct.
        llm_url: ``ws://...`` of a ``costeer serve``, or ``http(s)://...`` of an OpenAI-compatible
            completions endpoint (then ``remote_model`` names the model there).
        llm_stream: any ready ``LLMStream`` (overrides ``llm`` / ``llm_url``).
        cfg: ``SteerConfig`` (the op's default is the paper's T=20; see ``docs/defaults_sweep.md``
            for settings that suit one model in both roles).
        response_format / transport_dtype / topk / topk_policy: how a remote LLM answers
            (``costeer.streams``).
        context_template: how the private context enters the with-context pass's user message.
        cobatch: put the LLM rows into the small model's batch when both are the same in-process
            model (one forward per step for all three passes).
        gate: confidence gating (the paper's AdaCoSteer). A :class:`costeer.gating.ConfidenceGate`
            (threshold, patience, reenable): fed each step with every row's LLM max probability;
            rows it switches off take the plain LLM distribution. Or a hook
            ``gate(request_index, step, llm_logprobs_row) -> bool`` called each step for every
            request whose steering is still active; returning False switches steering off for that
            request for the rest of the generation. Once no request of a batch steers (and the gate
            cannot re-enable), the small-model passes stop.
        token / reconnect_timeout: for ``costeer serve`` (``ws://``): the server's token (default
            ``$COSTEER_TOKEN``) and how long to keep reconnecting (bounded backoff) when the
            connection breaks mid-generation; the stream then resumes from its token prefix.
            For an ``http(s)://`` endpoint ``reconnect_timeout`` bounds the resends of one step.
        api_key: for an ``http(s)://`` endpoint (default ``$COSTEER_API_KEY``, then ``$OPENAI_API_KEY``).
    """

    def __init__(self, llm: Union[str, LoadedModel, None] = DEFAULT_MODEL, slm: Union[str, LoadedModel] = DEFAULT_MODEL, *,
                 llm_url: Optional[str] = None, llm_stream: Optional[LLMStream] = None, remote_model: Optional[str] = None,
                 cfg: Optional[SteerConfig] = None, device: str = "cpu", response_format: str = "full",
                 transport_dtype: str = "float16", topk: int = 20, topk_policy: str = "restrict",
                 context_template: str = DEFAULT_CONTEXT_TEMPLATE, system_prompt: Optional[str] = None,
                 cobatch: bool = True, gate: Optional[GateFn] = None, timeout: float = 60.0,
                 token: Optional[str] = None, reconnect_timeout: float = 30.0, api_key: Optional[str] = None):
        if cfg is not None and not isinstance(cfg, SteerConfig):
            raise TypeError(f"cfg must be a SteerConfig or None, got {type(cfg).__name__}")
        if not isinstance(context_template, str) or "{context}" not in context_template or "{prompt}" not in context_template:
            raise ValueError("context_template must be a string containing {context} and {prompt}")
        if gate is not None and not callable(gate) and not isinstance(gate, ConfidenceGate):
            raise TypeError(f"gate must be a ConfidenceGate, a callable or None, got {type(gate).__name__}")
        self.cfg = cfg if cfg is not None else SteerConfig()
        self.context_template = context_template
        self.system_prompt = system_prompt
        self.cobatch = bool(cobatch)
        self.gate = gate
        self.slm = slm if isinstance(slm, LoadedModel) else load_model(slm, device=device)
        self._stream_factory: Callable[[], LLMStream]
        self.llm: Optional[LoadedModel] = None
        if llm_stream is not None:
            if not isinstance(llm_stream, LLMStream):
                raise TypeError(f"llm_stream must be an LLMStream, got {type(llm_stream).__name__}")
            self._stream_factory = lambda: llm_stream
            self._reuse_stream = True
            self.llm_tokenizer = self.slm.tokenizer
            self.llm_name = llm_stream.name
        elif llm_url is not None:
            if not isinstance(llm_url, str):
                raise TypeError(f"llm_url must be a string, got {type(llm_url).__name__}")
            # A remote LLM must share the small model's tokenizer: its prompt ids are made here.
            self.llm_tokenizer = self.slm.tokenizer if llm is None or llm == DEFAULT_MODEL or isinstance(llm, LoadedModel) and llm is self.slm \
                else (llm.tokenizer if isinstance(llm, LoadedModel) else load_tokenizer(llm))
            if llm_url.startswith(("ws://", "wss://")):
                kw = dict(response_format=response_format, dtype=transport_dtype, k=topk, topk_policy=topk_policy, timeout=timeout,
                          token=token, reconnect_timeout=reconnect_timeout)
                probe = WebSocketLLMStream(llm_url, **kw)  # fails fast (clear error) if unreachable
                self._ws = probe  # ONE persistent connection, reused by every generation

                def factory():
                    if self._ws is None or not self._ws.reusable:
                        self._ws = WebSocketLLMStream(llm_url, **kw)
                    return self._ws

                self._stream_factory = factory
                self.llm_name = probe.name
            elif llm_url.startswith(("http://", "https://")):
                name = remote_model or (llm if isinstance(llm, str) else "default")
                vocab = len(self.llm_tokenizer)
                self._stream_factory = lambda: OpenAICompletionsStream(llm_url, model=name, vocab_size=vocab, k=topk,
                                                                       topk_policy=topk_policy, timeout=timeout,
                                                                       api_key=api_key, reconnect_timeout=reconnect_timeout)
                self.llm_name = f"{name}@{llm_url}"
            else:
                raise ValueError(f"llm_url must start with ws://, wss://, http:// or https://, got {llm_url!r}")
            self._reuse_stream = False
        else:
            self.llm = llm if isinstance(llm, LoadedModel) else load_model(llm if llm is not None else DEFAULT_MODEL, device=device)
            self.llm_tokenizer = self.llm.tokenizer
            self._stream_factory = lambda: InProcessLLMStream(self.llm)
            self._reuse_stream = False
            self.llm_name = self.llm.name
        if not same_vocabulary(self.llm_tokenizer, self.slm.tokenizer):
            raise ValueError("llm and slm must share one tokenizer (same token strings and ids); "
                             "CoSteer with different tokenizers is not supported here")

    # -- helpers ------------------------------------------------------------------------------

    def _requests(self, requests, context, max_new_tokens, temperature, top_p, seed, stop) -> List[Request]:
        if isinstance(requests, (str, Request)):
            requests = [requests]
        if not isinstance(requests, (list, tuple)) or not requests:
            raise TypeError("requests must be a prompt string, a Request, or a non-empty list of them")
        out = []
        for i, r in enumerate(requests):
            if isinstance(r, str):
                r = Request(prompt=r, context=context if context is not None else "")
            elif isinstance(r, dict):
                r = Request(**r)
            elif not isinstance(r, Request):
                raise TypeError(f"requests[{i}] must be a str, dict or Request, got {type(r).__name__}")
            kw = {}
            for name, v in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_p", top_p),
                            ("seed", seed), ("stop", stop)):
                if v is not None:
                    kw[name] = v
            r = Request(**{**r.__dict__, **kw})
            if not isinstance(r.prompt, str) or not r.prompt.strip():
                raise ValueError(f"prompt must be a non-empty string (request {i})")
            if not isinstance(r.context, str):
                raise TypeError(f"context must be a string (request {i}), got {type(r.context).__name__}")
            if isinstance(r.max_new_tokens, bool) or not isinstance(r.max_new_tokens, int) or r.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be an int >= 1 (request {i}), got {r.max_new_tokens!r}")
            if not isinstance(r.temperature, (int, float)) or not math.isfinite(r.temperature) or r.temperature < 0:
                raise ValueError(f"temperature must be a finite number >= 0 (request {i}), got {r.temperature!r}")
            if not isinstance(r.top_p, (int, float)) or not 0 < r.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1] (request {i}), got {r.top_p!r}")
            if r.seed is not None and (isinstance(r.seed, bool) or not isinstance(r.seed, int)):
                raise TypeError(f"seed must be an int or None (request {i})")
            if isinstance(r.stop, str):
                r.stop = [r.stop]
            if not all(isinstance(s, str) and s for s in r.stop):
                raise ValueError(f"stop must be a list of non-empty strings (request {i})")
            out.append(r)
        return out

    # -- public API -----------------------------------------------------------------------------

    def generate(self, requests, context: Optional[str] = None, *, max_new_tokens: Optional[int] = None,
                 temperature: Optional[float] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
                 stop: Optional[Sequence[str]] = None, mode: str = "costeer",
                 on_text: Optional[Callable[[int, str], None]] = None, raise_on_error: bool = True,
                 prefix: Optional[Sequence[Sequence[int]]] = None):
        """Generate for one prompt (returns a ``Result``) or a list of requests (list of ``Result``).

        ``mode``: ``"costeer"`` (steered), ``"llm"`` (the LLM alone) or ``"slm"`` (the small model
        with the context alone). ``on_text(index, new_text)`` receives text as it is produced.
        On a failure part way, raises ``GenerationError`` whose ``results`` keep the text so far
        (or returns them with ``finish_reason="error"`` when ``raise_on_error=False``).
        ``prefix`` (resume): per request, token ids already generated by an identical earlier run;
        they are taken as that run's first tokens (every pass re-runs, the sampler draws as before),
        so the continuation is the one the interrupted run would have produced.
        """
        single = isinstance(requests, (str, Request))
        results = None
        it = self.stream(requests, context, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         seed=seed, stop=stop, mode=mode, raise_on_error=raise_on_error, prefix=prefix)
        finals: Dict[int, Result] = {}
        for chunk in it:
            if on_text is not None and chunk.text:
                on_text(chunk.index, chunk.text)
            if chunk.done:
                finals[chunk.index] = chunk.result
        results = [finals[i] for i in sorted(finals)]
        return results[0] if single else results

    def stream(self, requests, context: Optional[str] = None, *, max_new_tokens: Optional[int] = None,
               temperature: Optional[float] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
               stop: Optional[Sequence[str]] = None, mode: str = "costeer", raise_on_error: bool = True,
               prefix: Optional[Sequence[Sequence[int]]] = None) -> Iterator[TextChunk]:
        """Iterator of ``TextChunk``: text as it is produced, then one ``done`` chunk per request.

        ``prefix``: see ``generate``."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        reqs = self._requests(requests, context, max_new_tokens, temperature, top_p, seed, stop)
        forced = self._prefix(prefix, len(reqs))
        return self._run(reqs, mode, raise_on_error, forced)

    def _prefix(self, prefix, B: int) -> List[List[int]]:
        if prefix is None:
            return [[] for _ in range(B)]
        if not isinstance(prefix, (list, tuple)) or len(prefix) != B:
            raise ValueError(f"prefix must be a list of {B} token-id lists (one per request)")
        V, eos = self.slm.vocab_size, set(self.slm.eos_token_ids)
        out = []
        for i, p in enumerate(prefix):
            if not isinstance(p, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                raise ValueError(f"prefix[{i}] must be a list of int token ids")
            if any(t < 0 or t >= V or t in eos for t in p):
                raise ValueError(f"prefix[{i}] holds token ids outside [0, {V}) or an end-of-sequence id")
            out.append(list(p))
        return out

    # -- the loop -------------------------------------------------------------------------------

    def _run(self, reqs: List[Request], mode: str, raise_on_error: bool,
             forced: Optional[List[List[int]]] = None) -> Iterator[TextChunk]:
        B = len(reqs)
        forced = forced or [[] for _ in range(B)]
        slm = self.slm
        prompts = [build_prompts(self.llm_tokenizer, slm.tokenizer, r.prompt, r.context,
                                 context_template=self.context_template, system_prompt=self.system_prompt) for r in reqs]
        for i, (pub, ctx, noctx) in enumerate(prompts):
            if len(ctx) >= slm.max_len and mode != "llm":
                raise ValueError(f"context is too long (request {i}): the small model's prompt with the context has "
                                 f"{len(ctx)} tokens but its window is {slm.max_len}; shorten the context")
        results = [Result(prompt_tokens=len(p[0]), context_tokens=len(p[1])) for p in prompts]
        timings: List[StepTiming] = []
        for r in results:
            r.timings = timings
        eos = set(slm.eos_token_ids)
        pad = slm.eos_token_ids[0] if slm.eos_token_ids else slm.pad_token_id
        texts = [_Text(slm.tokenizer, r.stop) for r in reqs]
        gens = []
        for r in reqs:
            g = None
            if r.temperature > 0:
                g = torch.Generator().manual_seed(r.seed if r.seed is not None else int(torch.randint(0, 2**62, (1,))))
            gens.append(g)
        done = [False] * B
        active = [mode == "costeer"] * B  # "steering active" per request (the gating hook's flag)
        if isinstance(self.gate, ConfidenceGate):
            self.gate.reset(batch=B)
        t_start = time.perf_counter()
        stream: Optional[LLMStream] = None
        local: Optional[LocalRunner] = None
        cobatched = False
        step = 0
        try:
            # Per-request caps so that no unfinished row outgrows a window.
            caps = []
            for r, (pub, ctx, noctx) in zip(reqs, prompts):
                cap = r.max_new_tokens
                if mode != "llm":
                    cap = min(cap, slm.max_len - max(len(ctx), len(noctx)))
                caps.append(cap)
            use_llm = mode in ("costeer", "llm")
            cobatched = (use_llm and self.cobatch and self.llm is not None and self.llm.model is slm.model
                         and mode == "costeer")
            groups: Dict[str, List[List[int]]] = {}
            if cobatched:
                groups["llm"] = [p[0] for p in prompts]
            if mode == "costeer":
                groups["ctx"] = [p[1] for p in prompts]
                groups["noctx"] = [p[2] for p in prompts]
            elif mode == "slm":
                groups["ctx"] = [p[1] for p in prompts]
            if use_llm and not cobatched:
                stream = self._stream_factory()
                if stream.max_len:
                    for i, p in enumerate(prompts):
                        if len(p[0]) >= stream.max_len:
                            raise ValueError(f"prompt is too long (request {i}): {len(p[0])} tokens, the LLM's window is {stream.max_len}")
                        caps[i] = min(caps[i], stream.max_len - len(p[0]))
                stream.open([p[0] for p in prompts])  # the remote prefill leaves now ...
            t0 = time.perf_counter()
            local_out = None
            if groups:
                local = LocalRunner(slm.model, groups, slm.pad_token_id)
                local_out = local.prefill()  # ... while the local prefill runs
            llm_out = stream.recv() if stream is not None else None
            for r in results:
                r.prefill_s = time.perf_counter() - t0
            V = slm.vocab_size if llm_out is None else min(slm.vocab_size, llm_out.logits.shape[1])
            if llm_out is not None and stream is not None and stream.vocab_size and stream.vocab_size != slm.vocab_size:
                V = min(V, stream.vocab_size)
            while True:
                ts = time.perf_counter()
                # -- choose the distribution
                if mode == "llm":
                    logp = torch.log_softmax(llm_out.logits[:, :V].float(), -1)
                elif mode == "slm":
                    logp = torch.log_softmax(local_out.logits["ctx"][:, :V].float(), -1)
                else:
                    zl = local_out.logits["llm"] if cobatched else llm_out.logits
                    zl = zl[:, :V]
                    lp_llm = None
                    if self.gate is not None or not all(active):
                        lp_llm = torch.log_softmax(zl.float(), -1)
                    if isinstance(self.gate, ConfidenceGate):
                        # max softmax(z_L) per row; rows already finished keep their state.
                        needs = self.gate.update(lp_llm.amax(-1).exp(), active=torch.tensor([not d for d in done]))
                        for i, on in enumerate(needs.tolist()):
                            if not done[i]:
                                active[i] = on
                    elif self.gate is not None:
                        for i in range(B):
                            if active[i] and not done[i] and not self.gate(i, step, lp_llm[i]):
                                active[i] = False
                    if any(active) and local_out is not None:
                        lo = local_out if local_out.logits["ctx"].shape[1] == V else LocalOutput(
                            {k: v[:, :V] for k, v in local_out.logits.items()}, local_out.hidden)
                        logp = steer_step(zl, lo, self.cfg)
                        if not all(active):
                            keep = torch.tensor(active)[:, None]
                            logp = torch.where(keep, logp, lp_llm)
                    else:
                        logp = lp_llm if lp_llm is not None else torch.log_softmax(zl.float(), -1)
                t_steer = time.perf_counter()
                # -- pick tokens
                tokens = self._choose(logp, reqs, gens, done, pad)
                for i in range(B):  # resume: the earlier run's tokens (the sampler has drawn as it did)
                    n = len(results[i].token_ids)
                    if not done[i] and n < len(forced[i]):
                        tokens[i] = forced[i][n]
                chunks = []
                for i in range(B):
                    if done[i]:
                        continue
                    tid = tokens[i]
                    res = results[i]
                    if mode == "costeer" and active[i]:
                        res.steered_tokens += 1
                    if tid in eos:
                        res.finish_reason = "eos"
                        done[i] = True
                    else:
                        res.token_ids.append(tid)
                    delta, stopped, full = texts[i].update(res.token_ids, final=done[i])
                    if stopped and not done[i]:
                        res.finish_reason, done[i] = "stop", True
                    if not done[i] and len(res.token_ids) >= caps[i]:
                        res.finish_reason, done[i] = "length", True
                    if done[i]:
                        rest, _, full = texts[i].update(res.token_ids, final=True)
                        delta += rest
                        res.text = full
                        res.elapsed_s = time.perf_counter() - t_start
                    chunks.append(TextChunk(i, delta, done[i], res if done[i] else None,
                                            token=None if tid in eos else tid))
                t_sample = time.perf_counter()
                step += 1
                if all(done):
                    timings.append(StepTiming(step, llm_out.wait_s if llm_out else 0.0, llm_out.compute_s if llm_out else 0.0,
                                              llm_out.transport_s if llm_out else 0.0, 0.0, t_steer - ts, t_sample - t_steer,
                                              t_sample - ts))
                    yield from chunks
                    break
                fed = [pad if done[i] else tokens[i] for i in range(B)]
                # -- next step: the remote request leaves, the local passes run meanwhile
                if stream is not None:
                    stream.send(fed)
                tl = time.perf_counter()
                reenable = isinstance(self.gate, ConfidenceGate) and self.gate.reenable
                if local is not None and (mode != "costeer" or any(active) or cobatched or reenable):
                    local_out = local.step(fed)
                elif local is not None:
                    local, local_out = None, None  # no request steers any more: stop the local passes
                t_local = time.perf_counter()
                if stream is not None:
                    llm_out = stream.recv()
                t_end = time.perf_counter()
                timings.append(StepTiming(step, (llm_out.wait_s if stream is not None else 0.0),
                                          (llm_out.compute_s if stream is not None else 0.0),
                                          (llm_out.transport_s if stream is not None else 0.0),
                                          t_local - tl, t_steer - ts, t_sample - t_steer, t_end - ts))
                yield from chunks
        except GeneratorExit:
            raise
        except Exception as exc:
            if stream is not None and not self._reuse_stream:
                stream.close()  # its state is unknown after a failure: reconnect next time
            failed = []
            for i in range(B):
                if not done[i]:
                    res = results[i]
                    res.finish_reason, res.error = "error", f"{type(exc).__name__}: {exc}"
                    _, _, res.text = texts[i].update(res.token_ids, final=True)
                    res.elapsed_s = time.perf_counter() - t_start
                    done[i] = True
                    failed.append(i)
            if isinstance(exc, (ValueError, TypeError)) and not any(r.token_ids for r in results):
                raise
            if raise_on_error:
                n = sum(len(results[i].token_ids) for i in failed)
                raise GenerationError(f"generation failed after {n} generated tokens: {type(exc).__name__}: {exc} "
                                      f"(the text produced so far is in .results)", results) from exc
            for i in failed:
                yield TextChunk(i, "", True, results[i])
        finally:
            if stream is not None and not self._reuse_stream:
                stream.finish()  # ends the session; a WebSocket connection stays open for the next call

    @staticmethod
    def _choose(logp: torch.Tensor, reqs: List[Request], gens, done, pad) -> List[int]:
        greedy = logp.argmax(-1).tolist()
        out = []
        for i, r in enumerate(reqs):
            if done[i]:
                out.append(pad)
            elif r.temperature == 0:
                out.append(int(greedy[i]))
            else:
                probs = torch.softmax(logp[i].double() / r.temperature, -1)
                if r.top_p < 1.0:
                    sp, si = torch.sort(probs, descending=True)
                    cut = (sp.cumsum(0) - sp) >= r.top_p
                    sp[cut] = 0
                    probs = torch.zeros_like(probs).scatter_(0, si, sp)
                out.append(int(torch.multinomial(probs, 1, generator=gens[i])))
        return out

    def close(self):
        """Close a persistent connection to a remote LLM (if any)."""
        ws = getattr(self, "_ws", None)
        if ws is not None:
            ws.close()
            self._ws = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
