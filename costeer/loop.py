"""``costeer.Generator``: the CoSteer decoding loop.

Per step, for a batch of B requests:

    llm.send(tokens)           # the remote request for step t+1 leaves (does not wait)
    local = slm.step(tokens)   # with- and without-context passes: ONE batched forward (2B rows),
                               # final hidden states only (no vocabulary projection)
    z_L = llm.recv().logits    # the LLM's logits for step t+1
    tokens = pick(z_L, local)  # ONE fused op: costeer_kernels.steer_from_hidden(..., sample=...)
                               # (W read once, the bias cancels) or steer_sample; steering, per-row
                               # temperature / top_k / top_p / min_p, seeded Philox draws
    tokens.tolist()            # the step's only read-back: B token ids (+ the gate's state)

The LLM only ever receives the public prompt's token ids and the chosen tokens. The private
context is read by the small model alone (it goes into the user message of the with-context pass).

When the LLM is the very same in-process model object as the small model (the embedded default
with one model in both roles), its rows join the small model's batch (3B rows, one forward per
step: "co-batching") and one GEMM projects [h_llm; h_ctx - h_noctx] (W read once) before
``steer_sample``; ``cobatch=False`` keeps the three passes apart.

Different tokenizers (``costeer.vocab.build_vocab_map``): the LLM's prompt ids come from its own
tokenizer, the small model's from its own; the kernel gathers the small model's delta through the
map (``unmapped="keep" | "drop"``), and after each chosen token the small model reads the same
text through ``costeer.retokenize.TailRetokenizer`` (a short re-tokenized tail, KV rollback when
its tokens change).

Speculative steering (``generate(..., speculative=K)``) is a policy of this same loop: after the
first token a step becomes a round (``costeer.speculative.Drafter``: k drafts on the device, ONE
scoring request, ONE ``costeer_kernels.speculative_verify`` call) that decides up to k+1 tokens per
request; emission, stop strings, streaming, resume, gate, timings and recovery are the loop's.
"""
from __future__ import annotations

import math
import secrets
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch

import costeer_kernels
from costeer_kernels import SteerConfig, registry
from costeer_kernels.config import coefficient_f32

from .fast_linear import q8_0_weight
from .gating import ConfidenceGate
from .models import DEFAULT_MODEL, LoadedModel, load_model, load_tokenizer, same_vocabulary
from .retokenize import TailRetokenizer
from .slm import LocalOutput, LocalRunner
from .llm import LLMStream, factory as llm_factory
from .types import GenerationError, Request, Result, StepTiming, TextChunk


MODES = ("costeer", "llm", "slm")


UNMAPPED = ("keep", "drop")


# c_T = 0: the op's input rows pass through unsteered (the LLM alone, the small model alone, or a
# gated-off row), so every mode picks its tokens with the same kernel and the same RNG.
_UNSTEERED = SteerConfig(T=0)


DEFAULT_CONTEXT_TEMPLATE = "Here is some information about me:\n{context}\n\n{prompt}"


def steer_step(llm_logits: torch.Tensor, local: LocalOutput, cfg: SteerConfig) -> torch.Tensor:
    """Steered log-probs [B, V] of one local step's logits (``costeer_kernels.steer``): what
    speculative verification compares. The decoding loop itself never materializes them: it picks
    tokens with one fused op (``Generator``'s module docstring)."""
    return costeer_kernels.steer(llm_logits, local.logits["ctx"], local.logits["noctx"], cfg)


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
# The token choice: one fused op per step


def _sampling_args(reqs: Sequence[Request]) -> dict:
    """``steer_sample``'s per-row options for a batch (Python scalars when every row is greedy).

    Every request samples from its own Philox stream (a per-row seed tensor: the row index is not
    part of the counter), so its tokens do not depend on its slot in the batch; a request without
    a seed gets a random one."""
    if all(r.temperature == 0 for r in reqs):
        return {"temperature": 0.0}

    def seed64(r):
        v = (r.seed if r.seed is not None else secrets.randbits(63)) & (2**64 - 1)
        return v - 2**64 if v >= 2**63 else v

    return {
        "temperature": torch.tensor([float(r.temperature) for r in reqs], dtype=torch.float32),
        "top_k": torch.tensor([int(r.top_k) for r in reqs], dtype=torch.int32),
        "top_p": torch.tensor([float(r.top_p) for r in reqs], dtype=torch.float32),
        "min_p": torch.tensor([float(r.min_p) for r in reqs], dtype=torch.float32),
        "seed": torch.tensor([seed64(r) for r in reqs], dtype=torch.int64),
    }


class _Picker:
    """Picks every row's next token with ONE ``costeer_kernels`` call per step.

    - small model split into base + head, LLM rows from a stream: ``steer_from_hidden(z_L, h_ctx,
      h_noctx, W, sample=...)``: W is read once for both passes and the bias cancels (with a
      vocabulary map for different tokenizers);
    - co-batched (one model in both roles, so one head): the update folds into the hidden state,
      z_L + c_T (z_ctx - z_noctx) = W (h_llm + c_T (h_ctx - h_noctx)) + b, so ONE row of W per
      request is projected and ``steer_sample`` picks from it as for the LLM alone; with a
      confidence gate (which needs the LLM's own distribution) ONE GEMM projects
      [h_llm; h_ctx - h_noctx] (W read once) and ``steer_sample(z_L, delta, None)`` picks;
    - small model without hidden states: ``steer_sample(z_L, z_ctx, z_noctx)``;
    - the LLM alone, the small model alone, steering gated off: the same ops with c_T = 0.

    Rows whose steering is off (gating) get c_T = 0 through a per-row config: the same call.
    """

    def __init__(self, gen: "Generator", mode: str, local: Optional[LocalRunner], llm_out, stream, cobatched: bool,
                 cross: bool, sampling: dict):
        self.gen, self.mode, self.cobatched, self.cross = gen, mode, cobatched, cross
        head = local.kv.head if local is not None else None
        self.W = head.weight if head is not None else None
        # What the products read: the head's Q8_0 blocks where the model cache attached them and the
        # C++ few-row kernel runs (30 MB instead of SmolLM2's 113 MB of float32, the same result bit
        # for bit: costeer_kernels/q8_0.py), else W.
        w8 = q8_0_weight(head) if head is not None else None
        self.W_read = w8 if w8 is not None and registry.resolve("linear", None, self.W.device) == "cpu" else self.W
        self.bias = getattr(head, "bias", None) if head is not None else None
        self.sampling = sampling
        self._on = None  # the sampling tensors on the logits' device
        self._cfgs: Dict[tuple, SteerConfig] = {}
        self._coefs: Dict[tuple, torch.Tensor] = {}
        slm_width = gen.slm.vocab_size
        llm_width = llm_out.logits.shape[1] if llm_out is not None else slm_width
        self.vocab_map, self.vocab_size = None, None
        if cross:
            vm = gen.vocab_map
            if vm.llm_size < llm_width:
                vm = vm.padded(llm_width)
            self.vocab_map = vm
            self.vocab_size = llm_width if vm.llm_size > llm_width else None
            self.N = llm_width
        else:
            N = min(slm_width, llm_width) if mode != "slm" else slm_width
            if stream is not None and stream.vocab_size and mode != "slm":
                N = min(N, stream.vocab_size)
            self.N = N

    def _kw(self, device, step: int, want_maxp: bool) -> dict:
        if self._on is None or self._on[0] != device:
            self._on = (device, {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.sampling.items()})
        kw = dict(self._on[1], offset=step)
        if want_maxp:
            kw["return_llm_max_prob"] = True
        return kw

    def _cfg(self, active: Sequence[bool]) -> SteerConfig:
        if all(active):
            return self.gen.cfg
        if not any(active):
            return _UNSTEERED
        key = tuple(active)
        cfg = self._cfgs.get(key)
        if cfg is None:
            c = self.gen.cfg
            T = c.T if isinstance(c.T, torch.Tensor) else torch.full((len(active),), int(c.T))
            T = torch.where(torch.tensor(key, device=T.device), T, torch.zeros_like(T))
            cfg = self._cfgs[key] = SteerConfig(T=T, alpha=c.alpha, beta=c.beta, lam=c.lam, eta=c.eta)
        return cfg

    def _coef(self, active: Sequence[bool], device) -> torch.Tensor:
        """c_T of ``_cfg(active)`` as the float32 column [B, 1] (or [1, 1]) the kernels multiply the
        delta by, made once per pattern of active rows."""
        key = (tuple(active), device)
        c = self._coefs.get(key)
        if c is None:
            c64 = torch.as_tensor(self._cfg(active).coefficient, dtype=torch.float64)
            c = self._coefs[key] = coefficient_f32(c64).reshape(-1, 1).to(device)
        return c

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        out = costeer_kernels.linear_rows(h, self.W_read)  # the few-row kernel on CPU, F.linear elsewhere
        return out if self.bias is None else out + self.bias

    def llm_logits(self, zl, lo: Optional[LocalOutput]) -> torch.Tensor:
        """The LLM's logits of this step (computed from its hidden states when co-batched)."""
        if zl is not None:
            return zl[:, :self.N]
        logits = self._llm_rows(lo.logits)
        if logits is not None:
            return logits[:, :self.N]
        with torch.inference_mode():
            return self._project(self._llm_rows(lo.hidden))[:, :self.N]

    @staticmethod
    def _llm_rows(rows: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The co-batched LLM rows of a local output's logits or hidden states: the "llm" group's, or
        the no-context group's where Generator._run made no "llm" group (the same prompt ids)."""
        return rows["llm"] if "llm" in rows else rows.get("noctx")

    def __call__(self, zl, lo: Optional[LocalOutput], active: Sequence[bool], step: int, want_maxp: bool = False):
        """(token ids int64 [B] (-1: invalid row), the LLM's max probability float32 [B] or None)."""
        N = self.N
        if self.mode == "slm":
            zl = lo.logits["ctx"][:, :N]
        with torch.inference_mode():
            if self.mode != "costeer" or lo is None or not any(active):
                if zl is None:
                    zl = self.llm_logits(None, lo)
                zl = zl[:, :N]
                kw = self._kw(zl.device, step, want_maxp)
                return self._unpack(costeer_kernels.steer_sample(zl, zl, zl, _UNSTEERED, validate=False, **kw), want_maxp)
            cfg = self._cfg(active)
            hc, hn = lo.hidden.get("ctx"), lo.hidden.get("noctx")
            if self.cobatched and hc is not None and not want_maxp:
                # One model in both roles: the LLM's head IS the small model's head, so the update
                # folds into the hidden state (closed_form.md: z_L + c (z_c - z_n) = W (h_llm +
                # c (h_c - h_n)) + b): ONE row of W per request instead of two, then the same pick
                # as the LLM alone. The gate needs the LLM's own distribution: the branch below.
                h = torch.addcmul(self._llm_rows(lo.hidden), self._coef(active, hc.device), hc - hn)
                z = self._project(h)[:, :N]
                kw = self._kw(z.device, step, want_maxp)
                return self._unpack(costeer_kernels.steer_sample(z, z, z, _UNSTEERED, validate=False, **kw), want_maxp)
            if self.cobatched and hc is not None:
                B = hc.shape[0]
                # One product of the 2B rows [h_llm; h_c - h_n] with W, read once for all of them:
                # the few-row kernel on CPU (BLAS takes 1.5-3x longer for 2-16 rows, and reads the
                # head at a third of the bandwidth for one; docs/decoding.md), F.linear elsewhere.
                proj = costeer_kernels.linear_rows(torch.cat([self._llm_rows(lo.hidden), hc - hn]), self.W_read)
                zl, delta = proj[:B], proj[B:]
                if self.bias is not None:
                    zl = zl + self.bias
                kw = self._kw(zl.device, step, want_maxp)
                return self._unpack(costeer_kernels.steer_sample(zl[:, :N], delta[:, :N], None, cfg, validate=False, **kw),
                                    want_maxp)
            if self.cobatched:
                zl = self._llm_rows(lo.logits)
            kw = self._kw(zl.device, step, want_maxp)
            if hc is not None and self.W is not None:
                if self.cross:
                    res = costeer_kernels.steer_from_hidden(zl, hc, hn, self.W_read, cfg, vocab_map=self.vocab_map,
                                                            unmapped=self.gen.unmapped, vocab_size=self.vocab_size,
                                                            validate=False, sample=kw)
                else:
                    n = N if self.W.shape[0] != N else None
                    res = costeer_kernels.steer_from_hidden(zl[:, :N], hc, hn, self.W_read, cfg, vocab_size=n, validate=False,
                                                            sample=kw)
                return self._unpack(res, want_maxp)
            zc, zn = lo.logits["ctx"][:, :N], lo.logits["noctx"][:, :N]
            return self._unpack(costeer_kernels.steer_sample(zl[:, :N], zc, zn, cfg, validate=False, **kw), want_maxp)

    @staticmethod
    def _unpack(res, want_maxp: bool):
        return (res[0], res[2]) if want_maxp else (res[0], None)


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
        llm_stream: any ready ``LLMStream`` (overrides ``llm`` / ``llm_url``); it must share the
            small model's tokenizer.
        cfg: ``SteerConfig`` (the op's default is the paper's T=20; see ``docs/defaults_sweep.md``
            for settings that suit one model in both roles).
        response_format / transport_dtype / topk / topk_policy: how a remote LLM answers
            (``costeer.llm``).
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
        unmapped: an LLM and a small model with different tokenizers (matched by
            ``costeer.vocab.build_vocab_map``, see ``vocab_map`` / ``coverage``): LLM tokens
            without a small-model counterpart keep their LLM logit (``"keep"``) or are excluded
            (``"drop"``, the paper's intersection variant). With a remote LLM, ``llm`` names the
            model whose tokenizer makes its prompt ids.
            For an ``http(s)://`` endpoint ``reconnect_timeout`` bounds the resends of one step.
            None: the stream's own default (30 s for ``costeer serve``, 300 s for an
            OpenAI-compatible engine, which takes minutes to restart).
        api_key: for an ``http(s)://`` endpoint (default ``$COSTEER_API_KEY``, then ``$OPENAI_API_KEY``).
        score: how an ``http(s)://`` endpoint scores speculative drafts: ``"prompts"`` (one prompt per
            drafted token, on the engine's prefix cache) or ``"prompt_logprobs"`` (vLLM; the whole
            sequence every round), see ``costeer.llm.OpenAICompletionsStream``.
    """

    def __init__(self, llm: Union[str, LoadedModel, None] = DEFAULT_MODEL, slm: Union[str, LoadedModel] = DEFAULT_MODEL, *,
                 llm_url: Optional[str] = None, llm_stream: Optional[LLMStream] = None, remote_model: Optional[str] = None,
                 cfg: Optional[SteerConfig] = None, device: str = "cpu", response_format: str = "full",
                 transport_dtype: str = "float16", topk: int = 20, topk_policy: str = "restrict",
                 context_template: str = DEFAULT_CONTEXT_TEMPLATE, system_prompt: Optional[str] = None,
                 cobatch: bool = True, gate: Optional[GateFn] = None, timeout: float = 60.0,
                 token: Optional[str] = None, reconnect_timeout: Optional[float] = None, unmapped: str = "keep",
                 api_key: Optional[str] = None, score: str = "prompts"):
        if cfg is not None and not isinstance(cfg, SteerConfig):
            raise TypeError(f"cfg must be a SteerConfig or None, got {type(cfg).__name__}")
        if not isinstance(context_template, str) or "{context}" not in context_template or "{prompt}" not in context_template:
            raise ValueError("context_template must be a string containing {context} and {prompt}")
        if gate is not None and not callable(gate) and not isinstance(gate, ConfidenceGate):
            raise TypeError(f"gate must be a ConfidenceGate, a callable or None, got {type(gate).__name__}")
        if unmapped not in UNMAPPED:
            raise ValueError(f"unmapped must be one of {UNMAPPED}, got {unmapped!r}")
        self.unmapped = unmapped
        self.cfg = cfg if cfg is not None else SteerConfig()
        self.context_template = context_template
        self.system_prompt = system_prompt
        self.cobatch = bool(cobatch)
        self.gate = gate
        self.slm = slm if isinstance(slm, LoadedModel) else load_model(slm, device=device)
        self.llm: Optional[LoadedModel] = None
        if llm_stream is not None:
            self.source = llm_factory.from_stream(llm_stream)
            self.llm_tokenizer = self.slm.tokenizer
        elif llm_url is not None:
            # The remote LLM's prompt ids are made here, with the tokenizer that ``llm`` names.
            self.llm_tokenizer = self.slm.tokenizer if llm is None or llm == DEFAULT_MODEL or isinstance(llm, LoadedModel) and llm is self.slm \
                else (llm.tokenizer if isinstance(llm, LoadedModel) else load_tokenizer(llm))
            self.source = llm_factory.from_url(
                llm_url, vocab_size=len(self.llm_tokenizer), model=remote_model or (llm if isinstance(llm, str) else "default"),
                response_format=response_format, transport_dtype=transport_dtype, topk=topk, topk_policy=topk_policy,
                timeout=timeout, token=token, api_key=api_key, reconnect_timeout=reconnect_timeout, score=score)
        else:
            self.llm = llm if isinstance(llm, LoadedModel) else load_model(llm if llm is not None else DEFAULT_MODEL, device=device)
            self.llm_tokenizer = self.llm.tokenizer
            self.source = llm_factory.in_process(self.llm)
        self.llm_name = self.source.name
        self.vocab_map = None  # costeer.vocab.VocabMap when the tokenizers differ
        if not same_vocabulary(self.llm_tokenizer, self.slm.tokenizer):
            if llm_stream is not None:
                raise ValueError("llm_stream must share the small model's tokenizer; for an LLM with another "
                                 "tokenizer pass llm= (in process) or llm_url= with llm= naming its tokenizer")
            from .vocab import build_vocab_map, token_bytes, vocab_of

            n_llm = max(self.llm.vocab_size if self.llm is not None else 0, len(self.llm_tokenizer),
                        max(vocab_of(self.llm_tokenizer).values()) + 1)
            self.vocab_map = build_vocab_map(self.llm_tokenizer, self.slm.tokenizer, llm_size=n_llm,
                                             slm_size=max(self.slm.vocab_size, max(vocab_of(self.slm.tokenizer).values()) + 1))
            self._llm_bytes = token_bytes(self.llm_tokenizer, n_llm)
            self._slm_bytes = token_bytes(self.slm.tokenizer, self.vocab_map.slm_size)
            if self.vocab_map.matched == 0:
                raise ValueError("the LLM's and the small model's vocabularies share no token: nothing to steer")

    @property
    def coverage(self) -> Optional[dict]:
        """Vocabulary coverage of a pair with different tokenizers (``VocabMap.coverage``), else None."""
        return None if self.vocab_map is None else self.vocab_map.coverage

    # -- helpers ------------------------------------------------------------------------------

    def _requests(self, requests, context, max_new_tokens, temperature, top_p, seed, stop, top_k=None,
                  min_p=None) -> List[Request]:
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
                            ("seed", seed), ("stop", stop), ("top_k", top_k), ("min_p", min_p)):
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
            if isinstance(r.top_k, bool) or not isinstance(r.top_k, int) or not 0 <= r.top_k < 2**31:
                raise ValueError(f"top_k must be an int >= 0 (0 = off) (request {i}), got {r.top_k!r}")
            if isinstance(r.min_p, bool) or not isinstance(r.min_p, (int, float)) or not 0 <= r.min_p <= 1:
                raise ValueError(f"min_p must be in [0, 1] (0 = off) (request {i}), got {r.min_p!r}")
            if r.seed is not None and (isinstance(r.seed, bool) or not isinstance(r.seed, int)):
                raise TypeError(f"seed must be an int or None (request {i})")
            if r.seed is not None and not -(2**63) <= r.seed < 2**64:
                raise ValueError(f"seed must fit in 64 bits (request {i}), got {r.seed}")
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
                 prefix: Optional[Sequence[Sequence[int]]] = None, top_k: Optional[int] = None,
                 min_p: Optional[float] = None, speculative=None):
        """Generate for one prompt (returns a ``Result``) or a list of requests (list of ``Result``).

        ``mode``: ``"costeer"`` (steered), ``"llm"`` (the LLM alone) or ``"slm"`` (the small model
        with the context alone). ``temperature`` (0 = greedy), ``top_k`` (0 = off), ``top_p``
        (1 = off), ``min_p`` (0 = off) and ``seed`` override the requests' own (``Request``); they
        mean what ``costeer_kernels.steer_sample`` says, and a seed gives the same tokens on every
        run (request i draws from its own Philox stream, offset = its step).
        ``on_text(index, new_text)`` receives text as it is produced.
        On a failure part way, raises ``GenerationError`` whose ``results`` keep the text so far
        (or returns them with ``finish_reason="error"`` when ``raise_on_error=False``).
        ``prefix`` (resume): per request, token ids already generated by an identical earlier run;
        they are taken as that run's first tokens (every pass re-runs, the sampler draws as before),
        so the continuation is the one the interrupted run would have produced.
        ``speculative`` (mode "costeer"): None (one token per cloud round trip), a draft length
        (int >= 1 or ``"auto"``) or a ``costeer.speculative.Speculation``: the loop's speculative
        policy drafts k tokens on the device per round trip and verifies them in one op
        (``costeer.speculative``); the results are then ``SpecResult`` (with the round counts).
        """
        single = isinstance(requests, (str, Request))
        results = None
        it = self.stream(requests, context, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         seed=seed, stop=stop, mode=mode, raise_on_error=raise_on_error, prefix=prefix, top_k=top_k,
                         min_p=min_p, speculative=speculative)
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
               prefix: Optional[Sequence[Sequence[int]]] = None, top_k: Optional[int] = None,
               min_p: Optional[float] = None, speculative=None) -> Iterator[TextChunk]:
        """Iterator of ``TextChunk``: text as it is produced, then one ``done`` chunk per request.

        ``prefix``, ``speculative``: see ``generate``."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        from .speculative import Speculation

        spec = Speculation.of(speculative)
        reqs = self._requests(requests, context, max_new_tokens, temperature, top_p, seed, stop, top_k, min_p)
        forced = self._prefix(prefix, len(reqs), mode)
        return self._run(reqs, mode, raise_on_error, forced, spec)

    def _prefix(self, prefix, B: int, mode: str = "costeer") -> List[List[int]]:
        if prefix is None:
            return [[] for _ in range(B)]
        if not isinstance(prefix, (list, tuple)) or len(prefix) != B:
            raise ValueError(f"prefix must be a list of {B} token-id lists (one per request)")
        if self.vocab_map is not None and mode != "slm":
            V, eos = self.vocab_map.llm_size, set(self._llm_eos())
        else:
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

    def _llm_eos(self) -> List[int]:
        """End-of-sequence ids of the LLM side (a pair with different tokenizers ends on the LLM's)."""
        if self.llm is not None:
            return list(self.llm.eos_token_ids)
        eos = self.llm_tokenizer.eos_token_id
        return [int(eos)] if eos is not None else []

    def _run(self, reqs: List[Request], mode: str, raise_on_error: bool,
             forced: Optional[List[List[int]]] = None, spec=None) -> Iterator[TextChunk]:
        B = len(reqs)
        forced = forced or [[] for _ in range(B)]
        slm = self.slm
        cross = self.vocab_map is not None and mode != "slm"
        if spec is not None:
            if mode != "costeer":
                raise ValueError(f"speculative steering is a policy of mode 'costeer', not of mode {mode!r}")
            if cross:
                raise ValueError("speculative steering needs an LLM and a small model with one tokenizer (the drafts "
                                 "are small-model tokens the LLM scores)")
            if self.gate is not None and not isinstance(self.gate, ConfidenceGate):
                raise ValueError("speculative steering works with a ConfidenceGate; a gate hook is called once per "
                                 "token, which a speculative round cannot promise")
            from .speculative import SpecResult
        prompts = [build_prompts(self.llm_tokenizer, slm.tokenizer, r.prompt, r.context,
                                 context_template=self.context_template, system_prompt=self.system_prompt) for r in reqs]
        for i, (pub, ctx, noctx) in enumerate(prompts):
            if len(ctx) >= slm.max_len and mode != "llm":
                raise ValueError(f"context is too long (request {i}): the small model's prompt with the context has "
                                 f"{len(ctx)} tokens but its window is {slm.max_len}; shorten the context")
        result_type = Result if spec is None else SpecResult
        speculated = spec is not None  # SpecResults count decided tokens, with rounds or without
        results = [result_type(prompt_tokens=len(p[0]), context_tokens=len(p[1])) for p in prompts]
        timings: List[StepTiming] = []
        for r in results:
            r.timings = timings
        if cross:  # tokens, text and end of sequence are the LLM's
            eos = set(self._llm_eos())
            pad = self.llm.pad_token_id if self.llm is not None else (self.llm_tokenizer.pad_token_id or 0)
            out_tok = self.llm_tokenizer
        else:
            eos = set(slm.eos_token_ids)
            pad = slm.eos_token_ids[0] if slm.eos_token_ids else slm.pad_token_id
            out_tok = slm.tokenizer
        texts = [_Text(out_tok, r.stop) for r in reqs]
        sampling = _sampling_args(reqs)
        done = [False] * B
        active = [mode == "costeer"] * B  # "steering active" per request (the gating hook's flag)
        if isinstance(self.gate, ConfidenceGate):
            self.gate.reset(batch=B)
        t_start = time.perf_counter()
        stream: Optional[LLMStream] = None
        local: Optional[LocalRunner] = None
        step = 0
        try:
            # Per-request caps so that no unfinished row outgrows a window.
            caps = []
            for r, (pub, ctx, noctx) in zip(reqs, prompts):
                cap = r.max_new_tokens
                if mode != "llm" and not cross:
                    cap = min(cap, slm.max_len - max(len(ctx), len(noctx)))
                caps.append(cap)
            use_llm = mode in ("costeer", "llm")
            cobatched = (mode == "costeer" and self.cobatch and self.llm is not None and self.llm.model is slm.model)
            if spec is not None and cobatched and all(p[0] == p[2] for p in prompts):
                # The LLM is the small model itself on the no-context prompt: its scores of any
                # draft are the no-context rows' own, so a round of k drafts costs k + 1 steps of
                # those rows for at most k + 1 tokens, never fewer steps per token than the
                # co-batched step (measured: k=4 rounds 0.53-0.88x the step). Speculation then runs
                # that step (no rounds, no LLM calls: SpecResult.cobatched); cobatch=False drafts.
                spec = None
                for r in results:
                    r.cobatched = True
            elif spec is not None:
                cobatched = False  # speculation scores several LLM positions per request: a stream of its own
            groups: Dict[str, List[List[int]]] = {}
            # When the LLM's prompt ids are the no-context pass's (one model in both roles, one
            # tokenizer and template) the two rows would be the same computation on the same tokens:
            # the no-context row then serves as the LLM row (2 rows per request, not 3).
            if cobatched and any(p[0] != p[2] for p in prompts):
                groups["llm"] = [p[0] for p in prompts]
            if mode == "costeer":
                groups["ctx"] = [p[1] for p in prompts]
                groups["noctx"] = [p[2] for p in prompts]
            elif mode == "slm":
                groups["ctx"] = [p[1] for p in prompts]
            if use_llm and not cobatched:
                stream = self.source.stream()
                if stream.max_len:
                    for i, p in enumerate(prompts):
                        if len(p[0]) >= stream.max_len:
                            raise ValueError(f"prompt is too long (request {i}): {len(p[0])} tokens, the LLM's window is {stream.max_len}")
                        caps[i] = min(caps[i], stream.max_len - len(p[0]))
                stream.open([p[0] for p in prompts])  # the remote prefill leaves now ...
            t0 = time.perf_counter()
            local_out = None
            if groups:
                # Steering needs only the hidden states: the op projects their difference itself.
                local = LocalRunner(slm.model, groups, slm.pad_token_id, max_len=slm.max_len if cross else None,
                                    head=mode == "slm")
                if cross and local.kv.head is None:
                    raise ValueError("a small model with another tokenizer than the LLM's must expose its final hidden "
                                     "states and head (base model + lm_head without logit soft-capping)")
                local_out = local.prefill()  # ... while the local prefill runs
            llm_out = stream.recv() if stream is not None else None
            for r in results:
                r.prefill_s = time.perf_counter() - t0
            pick = _Picker(self, mode, local, llm_out, stream, cobatched, cross, sampling)
            tails = [TailRetokenizer(self._llm_bytes, slm.tokenizer, self._slm_bytes) for _ in range(B)] if cross else None
            gated = isinstance(self.gate, ConfidenceGate)
            drafter = None
            if spec is not None:
                from .speculative import Drafter

                # the head's Q8_0 blocks where the model cache attached them (pick.W_read): the products
                # of the rounds read 30 MB instead of 113 (SmolLM2), the same float32 result
                head = (pick.W_read, pick.bias) if local.kv.head is not None else None
                drafter = Drafter(spec, self.cfg, local, stream, head, pick.N, sampling, B, sorted(eos),
                                  self.gate if gated else None)
                for r in results:
                    r.llm_calls, r.cloud_tokens = 1, 1  # the prefill
            position = 0  # tokens decided per live request so far (the rows stay aligned)
            fed: List[int] = []
            while True:
                ts = time.perf_counter()
                rnd = None
                if drafter is not None and position > 0:
                    # -- speculative round: draft, ONE scoring request, ONE verification op
                    live = [not d for d in done]
                    room = min(caps[i] - len(results[i].token_ids) for i in range(B) if live[i]) - 1
                    rnd = drafter.round(fed, position, live, max(0, min(drafter.k, room)))
                    cands, steered = rnd.candidates, rnd.steered
                    t_steer = time.perf_counter()
                else:
                    zl = llm_out.logits if llm_out is not None else None
                    if self.gate is not None and not gated and mode == "costeer":
                        # The hook sees the LLM's log-probs before the token is chosen (its documented input).
                        lp_llm = torch.log_softmax(pick.llm_logits(zl, local_out).float(), -1)
                        for i in range(B):
                            if active[i] and not done[i] and not self.gate(i, step, lp_llm[i]):
                                active[i] = False
                    # -- ONE fused op picks every row's token
                    tok, maxp = pick(zl, local_out, active, step, want_maxp=gated)
                    if gated:
                        needs = self.gate.update(maxp, active=torch.tensor([not d for d in done]))
                        host = torch.cat([tok.to(torch.float64), needs.to(torch.float64)]).tolist()
                        tokens, on = [int(t) for t in host[:B]], [bool(x) for x in host[B:]]
                        now = [on[i] if not done[i] else active[i] for i in range(B)]
                        if now != active:
                            # A row's gate changed with this step's LLM confidence: it applies to this
                            # step's token already (the paper's rule), so those rows pick again.
                            active = now
                            tokens = [int(t) for t in pick(zl, local_out, active, step)[0].tolist()]
                    else:
                        tokens = [int(t) for t in tok.tolist()]  # the step's only read-back
                    cands, steered = [[t] for t in tokens], [[a] for a in active]
                    t_steer = time.perf_counter()
                m = None  # positions every live request keeps beyond the first
                for i in range(B):
                    if done[i]:
                        continue
                    c, n = cands[i], len(results[i].token_ids)
                    if c[0] < 0 or c[-1] < 0:
                        raise ValueError(f"request {i}: the steered distribution is invalid at step {position} "
                                         f"(NaN or +inf in the logits, or no allowed token)")
                    for t in range(len(c)):
                        if n + t < len(forced[i]) and c[t] != forced[i][n + t]:
                            # resume: the earlier run's token (the RNG is counter-based, so the rounds replay)
                            del c[t + 1:]
                            c[t] = forced[i][n + t]
                            break
                    m = len(c) - 1 if m is None else min(m, len(c) - 1)
                if rnd is not None:
                    gate_on = drafter.commit(rnd, m, [not d for d in done])
                chunks = []
                for t in range(m + 1):
                    for i in range(B):
                        if done[i]:
                            continue
                        tid = cands[i][t]
                        res = results[i]
                        if mode == "costeer" and steered[i][t]:
                            res.steered_tokens += 1
                        if speculated:
                            res.decided += 1
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
                if rnd is not None:
                    if gate_on is not None:
                        active = [gate_on[i] if not done[i] else active[i] for i in range(B)]
                    for i in range(B):
                        if live[i]:
                            res = results[i]
                            res.rounds += 1
                            res.llm_calls += 1
                            res.cloud_tokens += rnd.k + 1
                            res.local_steps += rnd.local_steps
                            res.ks.append(rnd.k)
                            res.drafted += rnd.k
                            res.accepted += min(m + 1, len(cands[i]) - 1)  # emitted tokens that were drafts
                t_sample = time.perf_counter()
                step += 1
                position += m + 1
                if rnd is not None:  # one entry per round
                    timings.append(StepTiming(step, rnd.wait_s, rnd.compute_s, rnd.transport_s, rnd.local_s,
                                              rnd.verify_s, t_sample - t_steer, t_sample - ts))
                elif drafter is not None or all(done):
                    timings.append(StepTiming(step, llm_out.wait_s if llm_out else 0.0,
                                              llm_out.compute_s if llm_out else 0.0,
                                              llm_out.transport_s if llm_out else 0.0, 0.0, t_steer - ts,
                                              t_sample - t_steer, t_sample - ts))
                if all(done):
                    yield from chunks
                    break
                fed = [pad if done[i] else cands[i][m] for i in range(B)]
                if drafter is not None:
                    yield from chunks  # the next round starts from ``fed``
                    continue
                # -- next step: the remote request leaves, the local passes run meanwhile
                if stream is not None:
                    stream.send(fed)
                tl = time.perf_counter()
                reenable = gated and self.gate.reenable
                if local is not None and (mode != "costeer" or any(active) or cobatched or reenable):
                    if cross:
                        edits = [tails[i].push(fed[i]) if not done[i] else (0, []) for i in range(B)]
                        local_out = local.edit([e[0] for e in edits], [e[1] for e in edits])
                    else:
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
            if stream is not None and not self.source.reuse:
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
            if stream is not None and not self.source.reuse:
                stream.finish()  # ends the session; a WebSocket connection stays open for the next call

    def close(self):
        """Close a persistent connection to a remote LLM (if any)."""
        source = getattr(self, "source", None)
        if source is not None:
            source.close()

    @property
    def connection(self) -> Optional[LLMStream]:
        """The persistent connection to a ``costeer serve`` (None for other LLM sources)."""
        return self.source.connection

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
