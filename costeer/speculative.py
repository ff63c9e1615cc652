"""Speculative steering: drafting and verification, a policy of ``costeer.Generator``'s loop.

``Generator.generate(..., speculative=K)`` (or ``"auto"``, or a ``Speculation``) runs the one
decoding loop with this policy: the same requests, prompts, stop strings, streaming, resume,
timing, error handling and gate. The loop's normal step picks one token per row per cloud round
trip; a speculative round decides up to k+1 per round trip:

    round, for B requests with pending tokens x (the last emitted ones, in no cache yet):
      local:  step(x) -> l_1; drafts d_1 ~ q(l_1); step(d_1) -> l_2; ...; d_k ~ q(l_k)
      cloud:  score([x, d_1, ..., d_k]) per row -> z_L rows 1..k+1   (one request, one forward)
      local:  step(d_k) -> l_{k+1}                                 (while the cloud computes)
      verify: ONE op, costeer_kernels.speculative_verify: steer the B (k+1) rows, accept /
              reject, the residual draw -> per request j accepted drafts and a token y
      the loop emits m + 1 tokens per request, m = min over the live requests of j (a request
      with more accepted drafts emits its accepted d_{m+1}: still an exact draw, see verify.py),
      so the rows stay aligned: the k - m rejected positions leave every KV cache (local now;
      the cloud's at the start of its next request, piggybacked: no extra round trip)

Greedy output is token for token the normal loop's; with sampling the output distribution is
exactly the steered one (the speculative-sampling argument; tests compare with float64
enumeration by a chi-square test). Drafts are drawn with ``costeer_kernels.steer_sample``: no
sampling code here.

Proposals (``Speculation.proposal``):
  "ctx"   q = the with-context small model's distribution (default);
  "proxy" q = steer(z_n, z_c, z_n): the small model without the context stands in for the LLM.
          (With the same model in both roles z_n IS z_L and every draft is accepted.)
  "cloud" the LLM drafts: one request asks it to continue every row greedily for k + 1 tokens
          c_1..c_{k+1} and to return its row at each (an engine's plain decoding, on its prefix
          cache); row i is the LLM's answer for the sequence with c_1..c_{i-1}, so the drafts are
          c_1..c_k with q_i the point mass on c_i, and the (k+1)-th row is the bonus row. The local
          passes of x run while the cloud decodes, those of c_1..c_k in one forward afterwards.
          Verification is the same op: greedy accepts c_i while it is the steered argmax; sampling
          accepts it with probability p_i(c_i) and draws a rejection from p_i without c_i (the
          speculative-sampling rule with a point-mass proposal: exact). Worth it where the cloud
          decodes faster than the device could draft (a large LLM, a GPU engine); a round costs the
          engine k + 1 decoding steps, whatever is accepted. ``k`` must be an int here.

``k`` is an int, or "auto": after each round k is set to maximize the expected tokens per second,
``E(k) / (t_round + (k + 1) t_local)`` with ``E(k) = (1 - a^(k+1)) / (1 - a)``, from the running
acceptance rate ``a`` (exponentially weighted) and the measured cloud-round and local-step times.

Random numbers (``steer_sample``'s contract, every request its own Philox stream keyed by its
seed): position p of a request is decided with offset p in the normal step; a round that decides
positions p..p+k verifies with offset p (its positions are the op's k+1 draws) and draws draft i
with offset p + i under the key seed XOR ``DRAFT_KEY``. Sampled output is reproducible from the
seed (and a resumed run replays the same rounds).

Confidence gate (``ConfidenceGate``): its per-token rule applies per position, from the scored
LLM rows' max probabilities, before verification (positions whose row is off are verified with
c_T = 0); the gate then advances by the m + 1 emitted positions. A gate hook (a callable) is
called once per token in the normal loop, which a round cannot promise: it is refused here.

The LLM: any stream with ``score_send`` / ``score_recv`` (in process, ``costeer serve``'s op
"score", an OpenAI-compatible endpoint: one prompt per drafted token, or ``prompt_logprobs``); the
"cloud" proposal needs ``draft_send`` / ``draft_recv`` (in process, an OpenAI-compatible endpoint:
``max_tokens=k+1`` with ``logprobs``). One tokenizer for both models.
When the LLM is the in-process small model itself on the no-context prompt (the embedded default:
one model in both roles, co-batched), the LLM's score of a draft IS the no-context rows' own output,
so a round cannot decide more tokens per forward than the co-batched step: the loop runs that step
(``SpecResult.cobatched``, no rounds). ``Generator(cobatch=False)`` keeps a separate LLM stream and
drafts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import torch

import costeer_kernels
from costeer_kernels import SteerConfig, speculative_verify
from costeer_kernels.torch_backend import llm_max_prob

from .types import Result

PROPOSALS = ("ctx", "proxy", "cloud")
DRAFT_KEY = 0x9E3779B97F4A7C15  # drafts draw from the request's seed XOR this: a stream of their own
_UNSTEERED = SteerConfig(T=0)


def parse_k(value) -> Union[int, str]:
    """``--speculative`` value: an int >= 1 or "auto"."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool):
        raise ValueError(f"--speculative must be an integer >= 1 or 'auto', got {value!r}")
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--speculative must be an integer >= 1 or 'auto', got {value!r}") from None
    if k < 1 or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"--speculative must be an integer >= 1 or 'auto', got {value!r}")
    return k


@dataclass(frozen=True)
class Speculation:
    """The speculative policy's settings: draft length ``k`` (int >= 1 or ``"auto"``), the
    ``proposal`` ("ctx" or "proxy") and the largest k ``"auto"`` may pick."""

    k: Union[int, str] = 4
    proposal: str = "ctx"
    k_max: int = 16

    def __post_init__(self):
        if self.k != "auto" and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"k must be an int >= 1 or 'auto', got {self.k!r}")
        if self.proposal not in PROPOSALS:
            raise ValueError(f"proposal must be one of {PROPOSALS}, got {self.proposal!r}")
        if self.proposal == "cloud" and self.k == "auto":
            raise ValueError("k='auto' is not available with proposal='cloud': a round's cost there grows with k on "
                             "the cloud's side (it decodes k + 1 tokens), which AdaptiveK does not model; pass an int")
        if isinstance(self.k_max, bool) or not isinstance(self.k_max, int) or self.k_max < 1:
            raise ValueError(f"k_max must be an int >= 1, got {self.k_max!r}")

    @classmethod
    def of(cls, value) -> Optional["Speculation"]:
        """None, a ``Speculation``, or a draft length (int >= 1 / "auto") as a ``Speculation``."""
        if value is None or isinstance(value, Speculation):
            return value
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            return cls(parse_k(value))
        raise TypeError(f"speculative must be None, an int >= 1, 'auto' or a Speculation, got {type(value).__name__}")


@dataclass
class SpecResult(Result):
    """A ``Result`` plus what speculation did for this request."""

    rounds: int = 0  # scoring requests after the prefill
    llm_calls: int = 0  # cloud round trips: the prefill + the rounds
    drafted: int = 0  # draft tokens proposed to the LLM
    accepted: int = 0  # draft tokens emitted as they were drafted
    cloud_tokens: int = 0  # positions whose LLM logits were computed (prefill counts 1)
    decided: int = 0  # tokens decided: output tokens, plus the final EOS when there is one
    ks: List[int] = field(default_factory=list)  # k used in each round
    local_steps: int = 0  # small-model forwards (each: the ctx and noctx rows of the batch)
    # True when the LLM is the in-process small model itself (one model in both roles, co-batched):
    # the loop then ran its co-batched step, which no draft round can beat (no rounds, no LLM calls).
    cobatched: bool = False

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def round_trips_per_token(self) -> float:
        """Cloud round trips per decided token (the normal loop: 1.0)."""
        return self.llm_calls / self.decided if self.decided else 0.0

    @property
    def cloud_tokens_per_token(self) -> float:
        """Positions the LLM computed per decided token (the normal loop: 1.0)."""
        return self.cloud_tokens / self.decided if self.decided else 0.0

    def spec_summary(self) -> str:
        if self.cobatched:
            return ("no rounds: the LLM is the small model itself, so the co-batched step ran (one forward "
                    "per token, no round trips; Generator(cobatch=False) drafts), round trips/token: 0.000")
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


def _signed64(v: int) -> int:
    v &= 2**64 - 1
    return v - 2**64 if v >= 2**63 else v


@dataclass
class Round:
    """What one round decided: per request the candidate tokens (its accepted drafts, then the
    verification's token), whether each position was steered, and the round's costs."""

    candidates: List[List[int]]
    steered: List[List[bool]]
    k: int
    local_steps: int
    local_s: float
    wait_s: float
    compute_s: float
    transport_s: float
    verify_s: float


class Drafter:
    """Speculative rounds for the B requests of one ``Generator`` run (module docstring).

    ``local``: the loop's ``LocalRunner`` (groups "ctx", "noctx"); ``stream``: the LLM stream
    (``score_send`` / ``score_recv``); ``head``: (W, bias) of a split small model (W float32 or
    GGML blocks, for ``linear_rows``), or None when its local rows are logits; ``V``: the width steered; ``sampling``: the loop's per-row options
    (``steer_sample`` keywords); ``eos``: end-of-sequence ids (drafting stops once every live row
    drafted one)."""

    def __init__(self, spec: Speculation, cfg: SteerConfig, local, stream, head, V: int, sampling: dict, batch: int,
                 eos: Sequence[int], gate=None):
        if spec.proposal == "cloud" and not hasattr(stream, "draft_send"):
            raise ValueError(f"proposal 'cloud' needs an LLM that continues a request for several tokens and returns "
                             f"its rows (in process or an OpenAI-compatible endpoint); {type(stream).__name__} cannot")
        if not hasattr(stream, "score_send"):
            raise ValueError(f"speculative steering needs an LLM that scores several positions per request "
                             f"(in process, `costeer serve` or an OpenAI-compatible endpoint); "
                             f"{type(stream).__name__} cannot")
        self.spec, self.cfg, self.local, self.stream, self.V, self.B = spec, cfg, local, stream, V, batch
        self.W, self.bias = head if head is not None else (None, None)
        self.eos = set(eos)
        self.gate = gate
        self.sampling = sampling
        self.greedy = not isinstance(sampling.get("temperature"), torch.Tensor)
        self.draft_sampling = dict(sampling)
        if not self.greedy:
            self.draft_sampling["seed"] = torch.tensor([_signed64(int(s) ^ DRAFT_KEY) for s in sampling["seed"].tolist()],
                                                       dtype=torch.int64)
        self.ctrl = AdaptiveK(4, spec.k_max) if spec.k == "auto" else None
        self.rollback = 0  # the cloud's rejected positions, dropped at the start of its next request
        self._maxp = None

    @property
    def k(self) -> int:
        return self.ctrl.k if self.ctrl is not None else int(self.spec.k)

    def _rows(self, lo):
        """(with-context logits [B, V], without-context logits or None, the delta's inputs)."""
        V = self.V
        if self.W is None:
            zc, zn = lo.logits["ctx"][:, :V], lo.logits["noctx"][:, :V]
            return zc, zn, (zc, zn)
        hc, hn = lo.hidden["ctx"], lo.hidden["noctx"]
        return None, None, (hc, hn)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        out = costeer_kernels.linear_rows(h, self.W)
        return (out if self.bias is None else out + self.bias)[:, :self.V]

    def _proposal(self, lo) -> torch.Tensor:
        """The proposal's logits [B, V] (or log-probs: the same distribution) at one local step."""
        zc, zn, (a, b) = self._rows(lo)
        if zc is None:
            zc = self._logits(a) if self.spec.proposal == "ctx" else None
            if self.spec.proposal == "proxy":
                both = self._logits(torch.cat([a, b]))
                zc, zn = both[:self.B], both[self.B:]
        if self.spec.proposal == "proxy":
            return costeer_kernels.steer(zn, zc, zn, self.cfg, validate=False)
        return zc

    def round(self, pending: Sequence[int], position: int, live: Sequence[bool], k: int) -> Round:
        """Draft ``k`` tokens per request after ``pending``, score them in one request, verify."""
        if self.spec.proposal == "cloud":
            return self._cloud_round(pending, position, live, k)
        B, V = self.B, self.V
        t0 = time.perf_counter()
        with torch.inference_mode():
            outs = [self.local.step(list(pending))]
            drafts, qs = [], []
            for i in range(k):
                q = self._proposal(outs[-1])
                d = costeer_kernels.steer_sample(q, q, q, _UNSTEERED, validate=False, offset=position + i,
                                                 **self.draft_sampling)[0]
                drafts.append(d)
                qs.append(q)
                ids = d.tolist()
                if i == k - 1 or all(ids[b] in self.eos for b in range(B) if live[b]):
                    break
                outs.append(self.local.step(ids))
            k = len(drafts)
            grid = torch.stack(drafts, 1) if k else torch.zeros((B, 0), dtype=torch.int64)
            rows = grid.tolist()
            # -- one cloud request scores [x, d_1..d_k] of every row; the last local step runs meanwhile
            self.stream.score_send([[int(pending[b])] + rows[b] for b in range(B)], rollback=self.rollback)
            if k:
                outs.append(self.local.step([r[-1] for r in rows]))
            t1 = time.perf_counter()
            scored = self.stream.score_recv(k + 1)
            t2 = time.perf_counter()
            zl = scored.logits[:, :V]
            cfg, steered = self.cfg, [[True] * (k + 1) for _ in range(B)]
            if self.gate is not None:
                cfg, steered = self._gated(zl, live, k)
            # position-major local rows -> request-major [B, k+1, ...]
            if self.W is None:
                zc = torch.stack([o.logits["ctx"][:, :V] for o in outs], 1)
                zn = torch.stack([o.logits["noctx"][:, :V] for o in outs], 1)
            else:
                diff = torch.stack([o.hidden["ctx"] - o.hidden["noctx"] for o in outs], 1)
                zc = costeer_kernels.linear_rows(diff, self.W)[..., :V]
                zn = None
            draft_logits = torch.stack(qs, 1) if (k and not self.greedy) else None
            j, y = speculative_verify(zl.reshape(B, k + 1, V), zc, zn, grid, cfg, draft_logits=draft_logits,
                                      offset=position, validate=False, **self.sampling)
            jy = torch.cat([j, y]).tolist()
        t3 = time.perf_counter()
        cands = [rows[b][:jy[b]] + [jy[B + b]] for b in range(B)]
        return Round(cands, steered, k, len(outs), (t1 - t0), t2 - t1, scored.compute_s,
                     getattr(scored, "transport_s", 0.0), t3 - t2)

    def _cloud_round(self, pending: Sequence[int], position: int, live: Sequence[bool], k: int) -> Round:
        """The cloud drafts: ONE request continues every row greedily for k + 1 tokens c_1..c_{k+1}
        and returns its row at each (row i given the sequence, x and c_1..c_{i-1}); the local passes
        of x run meanwhile, those of each c_i as it streams in (or of c_1..c_k in one forward after
        a non-streamed answer); ONE verification op
        with the proposal q_i = the point mass on c_i (accepted with probability p_i(c_i), the
        residual p_i without c_i renormalized: exact; greedy: accepted while c_i is the steered
        argmax). Every row the verification reads is the LLM's answer for a sequence it keeps."""
        B, V = self.B, self.V
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.stream.draft_send(list(pending), k + 1, rollback=self.rollback, live=list(live))
            first = self.local.step(list(pending))  # while the cloud decodes
            t1 = time.perf_counter()
            if getattr(self.stream, "streams_drafts", False):
                # position by position as the engine decodes: the local pass of c_i runs while it
                # decodes c_{i+1}, so the round ends one local step after the engine's last token
                # Greedy without a gate also cuts the round at the first position where a live row's
                # steered argmax is not the engine's token: the answer is dropped there (the engine
                # stops decoding it) instead of decoding positions that cannot be accepted.
                cut = self.greedy and self.gate is None
                live_rows = torch.tensor(list(live))
                toks, zrows, local_rows, outs, local_s = [], [], [], [first], 0.0
                draft = self.stream.draft_iter(k + 1)
                try:
                    for i, (tok, row) in enumerate(draft):
                        tl = time.perf_counter()
                        toks.append(tok)
                        zrows.append(row.logits[:, :V])
                        local_rows.append(self._local_rows(outs[i]))
                        if i < k and cut:
                            zc_i, zn_i = local_rows[-1]
                            best = costeer_kernels.steer_sample(zrows[-1], zc_i, zn_i, self.cfg, validate=False)[0]
                            if bool(((best != tok) & live_rows).any()):  # one read-back per position
                                local_s += time.perf_counter() - tl
                                break  # c_{i+1} cannot be accepted: the round ends at this row
                        if i < k:
                            outs.append(self.local.step(tok.tolist()))
                        local_s += time.perf_counter() - tl
                finally:
                    draft.close()  # after a cut or a failure: the engine stops decoding the answer
                t2 = time.perf_counter()
                n = len(toks)
                if len(outs) > n:  # the engine ended a row early: c_n's local pass is not needed
                    outs.pop()
                    self.local.kv.rollback(1)
                k = n - 1
                grid = torch.stack(toks, 1)[:, :k]
                zl = torch.stack(zrows, 1).reshape(B * n, V)
                compute_s, transport_s, wait_s = 0.0, 0.0, (t2 - t1) - local_s
                rest = None
            else:
                drafted = self.stream.draft_recv(k + 1)
                t2 = time.perf_counter()
                k = int(drafted.tokens.shape[1]) - 1  # the engine may end a row early (end of sequence)
                grid = drafted.tokens[:, :k]
                rest = self.local.extend(grid.tolist()) if k else None
                zl = drafted.logits[:, :V]
                compute_s, transport_s, wait_s, local_s = drafted.compute_s, drafted.transport_s, t2 - t1, 0.0
                outs = None
            rows = grid.tolist()
            cfg, steered = self.cfg, [[True] * (k + 1) for _ in range(B)]
            if self.gate is not None:
                cfg, steered = self._gated(zl, live, k)

            def per_position(a, b):  # [B, ...] and [B, k, ...] -> [B, k+1, ...]
                return a[:, None] if b is None else torch.cat([a[:, None], b], 1)

            if outs is not None:  # streamed: the local rows were made position by position
                zc = torch.stack([r[0] for r in local_rows], 1)
                zn = None if self.W is not None else torch.stack([r[1] for r in local_rows], 1)
            else:  # x's rows and the one forward's [B, k, ...] rows of c_1..c_k
                (zc0, zn0), (zc1, zn1) = self._local_rows(first), self._local_rows(rest) if k else (None, None)
                zc = per_position(zc0, zc1)
                zn = None if self.W is not None else per_position(zn0, zn1)
            draft_logits = None
            if k and not self.greedy:
                draft_logits = torch.full((B, k, V), float("-inf"))
                draft_logits.scatter_(2, grid[:, :, None], 0.0)
            t3 = time.perf_counter()
            j, y = speculative_verify(zl.reshape(B, k + 1, V), zc, zn, grid, cfg, draft_logits=draft_logits,
                                      offset=position, validate=False, **self.sampling)
            jy = torch.cat([j, y]).tolist()
        t4 = time.perf_counter()
        cands = [rows[b][:jy[b]] + [jy[B + b]] for b in range(B)]
        steps = len(outs) if outs is not None else 1 + (1 if k else 0)
        return Round(cands, steered, k, steps, (t1 - t0) + local_s + (t3 - t2), wait_s, compute_s, transport_s,
                     t4 - t3)

    def _local_rows(self, lo):
        """Local rows for ``steer`` ([B, ...] or [B, n, ...]): (z_c, z_n) logits, or (W (h_c - h_n),
        None), the delta of a split small model (the bias cancels)."""
        V = self.V
        if self.W is None:
            return lo.logits["ctx"][..., :V], lo.logits["noctx"][..., :V]
        return costeer_kernels.linear_rows(lo.hidden["ctx"] - lo.hidden["noctx"], self.W)[..., :V], None

    def _gated(self, zl: torch.Tensor, live: Sequence[bool], k: int):
        """The gate's decision at every scored position (before verification): a per-position
        config (c_T = 0 where the row is off) and the flags; the gate's state is left as it was."""
        B = self.B
        self._maxp = llm_max_prob(zl).reshape(B, k + 1)
        rows = torch.tensor(list(live))
        saved = (self.gate.streak.clone(), self.gate.off.clone()) if self.gate.streak is not None else None
        flags = torch.stack([self.gate.update(self._maxp[:, i], active=rows) for i in range(k + 1)], 1)
        if saved is not None:
            self.gate.streak, self.gate.off = saved
        c = self.cfg
        T = c.T if isinstance(c.T, torch.Tensor) else torch.full((B,), int(c.T))
        T = T.repeat_interleave(k + 1)
        T = torch.where(flags.reshape(-1), T, torch.zeros_like(T))
        return SteerConfig(T=T, alpha=c.alpha, beta=c.beta, lam=c.lam, eta=c.eta), flags.tolist()

    def commit(self, r: Round, m: int, live: Sequence[bool]) -> Optional[List[bool]]:
        """Keep the first m + 1 decided positions of every row: the k - m rejected ones leave the
        local cache now and the cloud's with its next request; the gate advances by m + 1 tokens
        (returns its flags afterwards, or None without a gate); "auto" k learns from the round."""
        self.local.kv.rollback(r.k - m)
        self.rollback = r.k - m
        if self.ctrl is not None and r.k:
            self.ctrl.update(r.k, m, r.wait_s, r.local_s / max(1, r.local_steps))
        if self.gate is None:
            return None
        rows = torch.tensor(list(live))
        needs = None
        for i in range(m + 1):
            needs = self.gate.update(self._maxp[:, i], active=rows)
        return needs.tolist()
