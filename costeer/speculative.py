"""Speculative steering: fewer cloud round trips, the same steered distribution.

The paper's loop costs one cloud round trip (and one single-token LLM forward) per token. Here the
device drafts k tokens with a local proposal q (by default the with-context small model), the cloud
LLM scores all drafted positions (+1) in ONE forward, and the device computes the exact steered
distribution p at every position with the same ``steer_step`` call the normal loop uses:

    round, with pending token x (the last emitted one, not yet in any cache):
      local:  step(x) -> l_1; draft d_1 ~ q(l_1); step(d_1) -> l_2; ...; draft d_k ~ q(l_k)
      cloud:  score([x, d_1, ..., d_k]) -> z_L rows 1..k+1     (one request, one forward)
      local:  step(d_k) -> l_{k+1}                             (while the cloud computes)
      p_i  =  steer(z_L_i, l_i.ctx, l_i.noctx)                 (one steer call, k+1 rows)
      greedy:   accept d_i while d_i == argmax p_i; then emit argmax p_j (correction, or the
                bonus token p_{k+1} when all k were accepted)
      sampling: accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); on the first rejection
                emit a token from normalize(max(0, p_i - q_i)); if all k were accepted, sample p_{k+1}
      (steering, accept / reject and the residual draw: ONE op, costeer_kernels.verify; drafts are
      drawn with costeer_kernels.steer_sample: no sampling code here)
      rollback: the k - j rejected positions leave every KV cache (local now; the cloud's at the
                start of its next request, piggybacked: no extra round trip)

Greedy output is token-for-token the normal loop's; with sampling the output distribution is exactly
the steered one (the standard speculative-sampling argument; tested with a chi-square test).

Proposals (``proposal=``):
  "ctx"   q = the with-context small model's distribution (default);
  "proxy" q = steer(z_n, z_c, z_n): the small model without the context stands in for the LLM,
          i.e. the steered distribution as the device alone can estimate it. (With the same model
          in both roles z_n IS z_L and every draft is accepted: do not benchmark that pair with it.)

``k`` is an int, or "auto": after each round k is set to maximize the expected tokens per second,
``E(k) / (t_round + (k + 1) t_local)`` with ``E(k) = (1 - a^(k+1)) / (1 - a)``, from the running
acceptance rate ``a`` (exponentially weighted) and the measured cloud-round and local-step times.

Random numbers: Philox streams keyed by the request's seed (``steer_sample``'s contract): the first
token is drawn as the normal loop draws it (offset 0), the drafts from a second key, the
verification of a round with the offset of its first draft's position.

Scope: one request at a time (batch size 1), greedy or temperature / top-k / top-p / min-p
sampling, EOS, stop strings, ``max_new_tokens``. The gating hook of ``Generator`` is not applied here. The LLM is in
process (``InProcessScorer``) or a ``costeer serve`` (``RemoteScorer``, ops "score" with
"rollback", see ``costeer/spec_server.py``) or an OpenAI-compatible endpoint with ``prompt_logprobs``
(vLLM: ``OpenAICompletionsStream.score_send``, the whole sequence re-sent each round; such requests
skip vLLM's prefix cache).
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch

import costeer_kernels
from costeer_kernels import SteerConfig
from costeer_kernels.verify import speculative_verify

from .generator import GenerationError, Generator, Result, StepTiming, _Text, build_prompts, steer_step
from .slm import KVBatch, LocalOutput, LocalRunner

PROPOSALS = ("ctx", "proxy")
_DRAFT_KEY = 0x9E3779B97F4A7C15  # drafts draw from the request's seed XOR this: a stream of their own
_UNSTEERED = SteerConfig(T=0)


# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass
class SpecResult(Result):
    """A ``Result`` plus what speculation did in this generation."""

    rounds: int = 0  # scoring requests after the prefill
    llm_calls: int = 0  # cloud round trips: the prefill + the rounds
    drafted: int = 0  # draft tokens proposed to the LLM
    accepted: int = 0  # draft tokens accepted
    cloud_tokens: int = 0  # positions whose LLM logits were computed (prefill counts 1)
    decided: int = 0  # tokens decided: output tokens, plus the final EOS when there is one
    ks: List[int] = field(default_factory=list)  # k used in each round
    local_steps: int = 0  # small-model forwards (each: the ctx and noctx rows)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def round_trips_per_token(self) -> float:
        """Cloud round trips per decided token (the paper's loop: 1.0)."""
        return self.llm_calls / self.decided if self.decided else 0.0

    @property
    def cloud_tokens_per_token(self) -> float:
        """Positions the LLM computed per decided token (the paper's loop: 1.0)."""
        return self.cloud_tokens / self.decided if self.decided else 0.0

    def spec_summary(self) -> str:
        return (f"acceptance {self.acceptance_rate:.2f} ({self.accepted}/{self.drafted} drafts), "
                f"{self.rounds} rounds, mean k {sum(self.ks) / max(1, len(self.ks)):.1f}, "
                f"cloud forward tokens/token: {self.cloud_tokens_per_token:.2f}, "
                f"round trips/token: {self.round_trips_per_token:.3f}")


class AdaptiveK:
    """k from the running acceptance rate and the measured costs of a cloud round and a local step."""

    def __init__(self, k0: int = 4, k_max: int = 16, decay: float = 0.7):
        self.k, self.k_max, self.decay = int(k0), int(k_max), float(decay)
        self.acc, self.rej = 0.0, 0.0  # exponentially weighted counts
        self.t_round: Optional[float] = None
        self.t_local: Optional[float] = None

    @property
    def alpha(self) -> float:
        return (self.acc + 1.0) / (self.acc + self.rej + 2.0)  # Laplace-smoothed

    def update(self, k: int, accepted: int, t_round: float, t_local: float) -> int:
        d = self.decay
        self.acc = d * self.acc + accepted
        self.rej = d * self.rej + (1.0 if accepted < k else 0.0)
        ema = lambda old, new: new if old is None else 0.5 * old + 0.5 * new  # noqa: E731
        self.t_round = ema(self.t_round, max(t_round, 1e-6))
        self.t_local = ema(self.t_local, max(t_local, 1e-7))
        a = min(self.alpha, 0.999)
        best, best_rate = 1, -1.0
        for kk in range(1, self.k_max + 1):
            tokens = (1.0 - a ** (kk + 1)) / (1.0 - a)
            rate = tokens / (self.t_round + (kk + 1) * self.t_local)
            if rate > best_rate:
                best, best_rate = kk, rate
        self.k = best
        return best


# ---------------------------------------------------------------------------------------------
# The LLM side: prefill, then "roll back r positions, append n tokens, return their logits"


class InProcessScorer:
    """The LLM in this process (a ``LoadedModel``), one row, one KV cache."""

    remote = False

    def __init__(self, loaded):
        self.loaded = loaded
        self.vocab_size = loaded.vocab_size
        self.max_len = loaded.max_len
        self.kv: Optional[KVBatch] = None
        self._pending = None

    def open(self, prompt: Sequence[int]) -> None:
        self.kv = KVBatch(self.loaded.model, [list(prompt)], self.loaded.pad_token_id, max_len=self.max_len)
        self._pending = ("prefill", None, 0)

    def send(self, tokens: Sequence[int], rollback: int = 0) -> None:
        self._pending = ("score", [int(t) for t in tokens], int(rollback))

    def recv(self) -> torch.Tensor:
        """float32 [n, V]: the next-token logits after each appended token ([1, V] for the prefill)."""
        op, tokens, rollback = self._pending
        self._pending = None
        if op == "prefill":
            return self.kv.prefill().logits
        self.kv.rollback(rollback)
        return self.kv.extend([tokens]).logits[0]

    def close(self) -> None:
        self.kv = None


class RemoteScorer:
    """A ``costeer serve`` through a ``WebSocketLLMStream`` (its ``score`` ops)."""

    remote = True

    def __init__(self, stream):
        self.stream = stream
        self.vocab_size = stream.vocab_size
        self.max_len = stream.max_len
        self._n = None

    def open(self, prompt: Sequence[int]) -> None:
        self.stream.open([list(prompt)])
        self._n = None

    def send(self, tokens: Sequence[int], rollback: int = 0) -> None:
        self.stream.score_send([[int(t) for t in tokens]], rollback=int(rollback))
        self._n = len(tokens)

    def recv(self) -> torch.Tensor:
        if self._n is None:
            return self.stream.recv().logits
        return self.stream.score_recv(self._n).logits

    def close(self) -> None:
        self.stream.finish()


# ---------------------------------------------------------------------------------------------
# The loop


class SpeculativeGenerator:
    """Speculative CoSteer on top of a ``Generator`` (its models, LLM source, cfg and prompts).

    ``k``: draft length (int >= 1) or ``"auto"``. ``proposal``: "ctx" or "proxy" (module docstring).
    """

    def __init__(self, gen: Generator, k: Union[int, str] = 4, *, proposal: str = "ctx", k_max: int = 16):
        if not isinstance(gen, Generator):
            raise TypeError(f"gen must be a costeer.Generator, got {type(gen).__name__}")
        if k != "auto" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be an int >= 1 or 'auto', got {k!r}")
        if proposal not in PROPOSALS:
            raise ValueError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
        if not isinstance(k_max, int) or k_max < 1:
            raise ValueError(f"k_max must be an int >= 1, got {k_max!r}")
        self.gen, self.k, self.proposal, self.k_max = gen, k, proposal, k_max

    def _scorer(self):
        g = self.gen
        if g.llm is not None:
            return InProcessScorer(g.llm)
        stream = g._stream_factory()
        if not hasattr(stream, "score_send"):
            raise ValueError(f"speculative steering needs an LLM that scores several positions per request "
                             f"(in process or `costeer serve`); {type(stream).__name__} cannot")
        return RemoteScorer(stream)

    def _q(self, lo: LocalOutput, V: int) -> torch.Tensor:
        """The proposal's logits [1, V] (or log-probs: the same distribution) from one local step."""
        zc = lo.logits["ctx"][:, :V]
        if self.proposal == "proxy":
            zn = lo.logits["noctx"][:, :V]
            return steer_step(zn, LocalOutput({"ctx": zc, "noctx": zn}, {}), self.gen.cfg)
        return zc

    def generate(self, prompt: str, context: str = "", *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: Optional[int] = None, stop: Sequence[str] = (),
                 on_text: Optional[Callable[[int, str], None]] = None,
                 on_token: Optional[Callable[[Optional[int], str, bool], None]] = None, top_k: int = 0,
                 min_p: float = 0.0) -> SpecResult:
        g = self.gen
        if g.vocab_map is not None:
            raise ValueError("speculative steering needs an LLM and a small model with one tokenizer (the drafts are "
                             "small-model tokens the LLM scores)")
        req = g._requests(prompt, context, max_new_tokens, temperature, top_p, seed, stop, top_k, min_p)[0]
        slm = g.slm
        pub, ctx, noctx = build_prompts(g.llm_tokenizer, slm.tokenizer, req.prompt, req.context,
                                        context_template=g.context_template, system_prompt=g.system_prompt)
        if len(ctx) >= slm.max_len:
            raise ValueError(f"context is too long: the small model's prompt with the context has {len(ctx)} "
                             f"tokens but its window is {slm.max_len}; shorten the context")
        res = SpecResult(prompt_tokens=len(pub), context_tokens=len(ctx))
        T = float(req.temperature)
        seed = (req.seed if req.seed is not None else secrets.randbits(63)) & (2**64 - 1)
        seed = seed - 2**64 if seed >= 2**63 else seed
        draft_seed = seed ^ _DRAFT_KEY
        draft_seed = draft_seed - 2**64 if draft_seed >= 2**63 else draft_seed
        opts = dict(temperature=T, top_k=int(req.top_k), top_p=float(req.top_p), min_p=float(req.min_p))
        eos = set(slm.eos_token_ids)
        text = _Text(slm.tokenizer, req.stop)
        ctrl = AdaptiveK(4 if self.k == "auto" else self.k, self.k_max) if self.k == "auto" else None
        t_start = time.perf_counter()
        scorer = self._scorer()
        cap = min(req.max_new_tokens, slm.max_len - max(len(ctx), len(noctx)))
        if scorer.max_len:
            if len(pub) >= scorer.max_len:
                raise ValueError(f"prompt is too long: {len(pub)} tokens, the LLM's window is {scorer.max_len}")
            cap = min(cap, scorer.max_len - len(pub))
        done = False

        def emit(tid: int) -> bool:
            """Append one decided token; True when generation is over."""
            res.decided += 1
            fin = False
            if tid in eos:
                res.finish_reason, fin = "eos", True
            else:
                res.token_ids.append(tid)
            delta, stopped, full = text.update(res.token_ids, final=fin)
            if stopped and not fin:
                res.finish_reason, fin = "stop", True
            if not fin and len(res.token_ids) >= cap:
                res.finish_reason, fin = "length", True
            if fin:
                rest, _, full = text.update(res.token_ids, final=True)
                delta += rest
                res.text = full
                res.elapsed_s = time.perf_counter() - t_start
            if on_text is not None and delta:
                on_text(0, delta)
            if on_token is not None:  # per decided token: (id, or None for the EOS; new text; done)
                on_token(None if tid in eos else tid, delta, fin)
            return fin

        try:
            local = LocalRunner(slm.model, {"ctx": [ctx], "noctx": [noctx]}, slm.pad_token_id)
            t0 = time.perf_counter()
            scorer.open(pub)
            lo = local.prefill()
            zl = scorer.recv()
            res.prefill_s = time.perf_counter() - t0
            res.llm_calls += 1
            res.cloud_tokens += 1
            V = min(slm.vocab_size, zl.shape[-1], scorer.vocab_size or zl.shape[-1])
            first = costeer_kernels.steer_sample(zl[:, :V], lo.logits["ctx"][:, :V], lo.logits["noctx"][:, :V], g.cfg,
                                                 seed=seed, offset=0, **opts)[0]
            done = emit(int(first))
            pending, llm_rollback = first, 0
            while not done:
                k = ctrl.k if ctrl is not None else self.k
                k = max(0, min(k, cap - len(res.token_ids) - 1))
                # -- draft on the device
                tl = ts = time.perf_counter()
                outs = [local.step([pending])]
                drafts: List[int] = []
                qs = []
                pos = len(res.token_ids)
                for i in range(k):
                    q = self._q(outs[-1], V)
                    d = int(costeer_kernels.steer_sample(q, q, q, _UNSTEERED, seed=draft_seed, offset=pos + i, **opts)[0])
                    drafts.append(d)
                    qs.append(q)
                    if d in eos or i == k - 1:
                        break
                    outs.append(local.step([d]))
                t_draft = time.perf_counter() - tl
                k = len(drafts)
                # -- one cloud request scores [pending, d_1..d_k]; the last local step runs meanwhile
                scorer.send([pending] + drafts, rollback=llm_rollback)
                tl = time.perf_counter()
                if k:
                    outs.append(local.step([drafts[-1]]))
                t_local = t_draft + time.perf_counter() - tl
                tw = time.perf_counter()
                zl = scorer.recv()
                t_wait = time.perf_counter() - tw
                res.rounds += 1
                res.llm_calls += 1
                res.cloud_tokens += k + 1
                res.local_steps += len(outs)
                res.ks.append(k)
                # -- the exact steered distribution at the k+1 positions, one steer call
                zc = torch.cat([o.logits["ctx"][:, :V] for o in outs])
                zn = torch.cat([o.logits["noctx"][:, :V] for o in outs])
                t_steer = time.perf_counter()
                j, y = speculative_verify(zl[:, :V], zc, zn, torch.tensor(drafts, dtype=torch.int64), g.cfg,
                                          draft_logits=torch.cat(qs) if (qs and T > 0) else None, seed=seed,
                                          offset=pos + 1, **opts)
                t_steer = time.perf_counter() - t_steer
                res.drafted += k
                res.accepted += j
                for d in drafts[:j]:
                    done = emit(d)
                    if done:
                        break
                if not done:
                    done = emit(y)
                res.timings.append(StepTiming(res.rounds, t_wait, 0.0, 0.0, t_local, t_steer, 0.0,
                                              time.perf_counter() - ts))  # one entry per round
                # -- rollback: [pending, d_1..d_j] stay, d_{j+1}..d_k go (local now, cloud next request)
                local.kv.rollback(k - j)
                pending, llm_rollback = y, k - j
                if ctrl is not None and k:
                    ctrl.update(k, j, t_wait, t_local / len(outs))
        except Exception as exc:
            if res.finish_reason is None:
                res.finish_reason, res.error = "error", f"{type(exc).__name__}: {exc}"
                _, _, res.text = text.update(res.token_ids, final=True)
                res.elapsed_s = time.perf_counter() - t_start
            if isinstance(exc, (ValueError, TypeError)) and not res.token_ids:
                raise
            raise GenerationError(f"generation failed after {len(res.token_ids)} generated tokens: "
                                  f"{type(exc).__name__}: {exc} (the text produced so far is in .results)", [res]) from exc
        finally:
            scorer.close()
        return res


def speculative_generate(gen: Generator, prompt: str, context: str = "", *, k: Union[int, str] = 4,
                         proposal: str = "ctx", **kw) -> SpecResult:
    """One speculative CoSteer generation (see ``SpeculativeGenerator.generate`` for ``kw``)."""
    return SpeculativeGenerator(gen, k, proposal=proposal).generate(prompt, context, **kw)


def parse_k(value) -> Union[int, str]:
    """``--speculative`` value: an int >= 1 or "auto"."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--speculative must be an integer >= 1 or 'auto', got {value!r}") from None
    if k < 1:
        raise ValueError(f"--speculative must be an integer >= 1 or 'auto', got {value!r}")
    return k


class SpeculativeCLI:
    """``Generator`` stand-in for ``costeer generate --speculative K``: mode "costeer" runs
    speculatively, the other modes (``--compare``) the normal loop; ``last`` is the latest
    ``SpecResult`` and ``summary()`` its line (ends with ``round trips/token: X``)."""

    def __init__(self, gen: Generator, k: Union[int, str], proposal: str = "ctx"):
        self.gen = gen
        self.spec = SpeculativeGenerator(gen, parse_k(k), proposal=proposal)
        self.last: Optional[SpecResult] = None
        self.llm = None  # for the CLI's timing line: the LLM rows are never co-batched here

    def __getattr__(self, name):
        return getattr(self.gen, name)

    def generate(self, prompt, context: str = "", *, mode: str = "costeer", on_text=None, **kw):
        if mode != "costeer":
            return self.gen.generate(prompt, context=context, mode=mode, on_text=on_text, **kw)
        kw = {n: v for n, v in kw.items() if v is not None}
        try:
            self.last = self.spec.generate(prompt, context, on_text=on_text, **kw)
        except GenerationError as exc:
            self.last = exc.results[0]
            raise
        return self.last

    def stream(self, prompt, context: str = "", *, mode: str = "costeer", prefix=None, **kw):
        """``Generator.stream`` for the CLI: TextChunks (with ``token``) as tokens are decided."""
        if mode != "costeer":
            return self.gen.stream(prompt, context=context, mode=mode, prefix=prefix, **kw)
        if prefix and any(prefix):
            raise ValueError("--speculative cannot continue an earlier generation (--resume); run without it")
        return self._stream(prompt, context, {n: v for n, v in kw.items() if v is not None})

    def _stream(self, prompt, context, kw):
        import queue
        import threading

        from .generator import TextChunk

        q: "queue.Queue" = queue.Queue()

        def run():
            try:
                res = self.spec.generate(prompt, context, on_token=lambda t, d, fin: q.put(("tok", t, d)), **kw)
                q.put(("done", res, None))
            except BaseException as exc:  # handed to the consumer, re-raised there
                q.put(("error", exc, None))

        worker = threading.Thread(target=run, name="costeer-speculative", daemon=True)
        worker.start()
        while True:
            kind, a, b = q.get()
            if kind == "tok":
                yield TextChunk(0, b, False, None, token=a)
            elif kind == "done":
                self.last = a
                yield TextChunk(0, "", True, a)
                break
            else:
                if isinstance(a, GenerationError):
                    self.last = a.results[0]
                raise a
        worker.join()

    def summary(self) -> str:
        return "speculative: " + (self.last.spec_summary() if self.last is not None else "no generation")
