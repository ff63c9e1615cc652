"""``steer_sample``: steer and pick the next token in one op, without writing the [B, V] log-probs.

The steered distribution is p = softmax(x), x = z_L + c_T (z_c - z_n) (``steer``'s closed form).

Sampling rule, per row (every parameter a scalar or a per-row tensor [B]):
- ``temperature == 0``: greedy, argmax of x, the lowest index on ties. Filters do not matter
  (the argmax passes all of them).
- ``temperature = tau > 0``: q(v) ∝ exp(x_v / tau) restricted to the allowed set A, drawn by
  Gumbel-max: token = argmax_{v in A} x_v + tau * G_v, G_v standard Gumbel noise.
- The allowed set A applies, in this order (the order of Hugging Face's logits processors),
  - ``top_k = k`` (0 = off): the k largest x. Ties at the k-th value are all kept (like vLLM's
    top-k), so A can exceed k tokens only on exact ties.
  - ``top_p`` (1 = off): the smallest set of largest x whose mass under q *renormalized over the
    top-k set* reaches ``top_p`` (ties at the boundary kept).
  - ``min_p`` (0 = off): tokens with q(v) >= min_p * max_v q(v), i.e. x_v >= max x + tau log(min_p).
  Each filter keeps {v : x_v >= threshold}; A = {v : x_v >= max of the thresholds}.

Thresholds without sorting: x is mapped to an int32 key whose order is the float order. For top-k
the threshold is the largest key t with #{v : key_v >= t} >= k, for top-p the largest t with
sum_{key_v >= t} exp((x_v - max x) / tau) >= top_p * (that mass over the top-k set); both counts
are non-increasing in t, so the threshold is found by bisection over the key range with extra
passes reading the row (Triton: 16 pivots per pass, the interval shrinks 17 times per pass, <= 8
passes; torch: plain bisection vectorized over rows, <= 32 passes). Then one masked Gumbel-max pass.
Exact: the result is the exact threshold, not an approximation, and A is computed from the same
fp32 x that is sampled.

Random numbers (the same definition in every backend, so backends agree draw for draw up to
float rounding of the logs): Philox4x32-10 keyed by the 64-bit ``seed`` (key words: low and high 32
bits) with counter (v >> 2, r, offset low 32 bits, offset high 32 bits); word v & 3 of the output
gives token v. r = row * n + d for draw d of n (``num_samples``) when ``seed`` is one value for the
batch; r = d when ``seed`` is a per-row tensor (each row its own stream: a request's draws do not
depend on its slot in the batch). u = (2 * (bits >> 9) + 1) / 2^24 in (0, 1), G = -log(-log u).
Noise resolution: a token whose probability relative to the whole row is below ~3e-8 is
undersampled (the Gumbel tail is cut at u's resolution).
Advance ``offset`` by one per decoding step to get fresh noise; ``seed`` and ``offset`` may be
device tensors (int64, 0-d/[1] or [B]), so a call has no host sync (``validate=False``) and can be
captured in a CUDA graph.

Returned log-prob: the steered log-prob of the chosen token under p = softmax(x), i.e. before
temperature and filters (what ``steer`` would return at that token).

Backends (a small registry, ``register_sampler(name, fn)``; a C++ sampler plugs in as "cpu" /
"cuda" and becomes the default of its device):
- "triton" (``triton/sample.py``): one launch, grid (B, S), the S programs of a row merged in the
  launch by the last one to finish; no host sync, CUDA-graph safe with ``validate=False`` and
  device-tensor seed/offset. The default on CUDA.
- "cpu" (``csrc/sample_cpu.cpp``, when the C++ extension is built): the CPU default. One sweep
  computes x chunk by chunk in L1 with the row's online statistics and first argmax (greedy rows
  end there); sampling rows keep x, bisect the thresholds over it and draw by Gumbel-max, computing
  noise only for tokens that can still beat the best key found (x_v + 17 tau >= best).
- "torch": vectorized PyTorch, the CPU fallback. On the CPU it reads a few scalars back
  (free there); on CUDA it is correct but syncs (per-row ``cfg`` coefficients), so it is not the
  graph-safe path. Draws the same tokens as "triton" (same RNG, same thresholds) up to float
  rounding of the logs.
"""
from __future__ import annotations

import math
import threading
from typing import Callable, Dict, NamedTuple, Optional

import torch

from .config import coefficient_f32, coefficient_rows, steer_coefficient
from .status import EMPTY_ROW, raise_for_status

__all__ = ["steer_sample", "register_sampler", "available_samplers", "SampleParams"]


class SampleParams(NamedTuple):
    """Per-row sampling parameters as device tensors of length 1 (broadcast) or B."""

    temperature: torch.Tensor  # float32
    top_k: torch.Tensor  # int32
    top_p: torch.Tensor  # float32
    min_p: torch.Tensor  # float32
    seed: torch.Tensor  # int64
    offset: torch.Tensor  # int64
    row_keyed: bool  # True: the row index enters the RNG counter (seed given once for the batch)
    host_temperature: Optional[float] = None  # the temperature when given as a Python number


# ---------------------------------------------------------------------------------------------
# Backends: fn(zl, zc, zn_or_None, hparams, params, want_maxp, num_samples)
#   -> (token int64 [B, n], logprob float32 [B, n], maxp float32 [B] or None, status int32 [B])
# No host sync on accelerators. A C++ backend plugs in with register_sampler("cpu"/"cuda", fn).

SamplerFn = Callable[..., tuple]
_SAMPLERS: Dict[str, SamplerFn] = {}
DEFAULT_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


def register_sampler(name: str, fn: SamplerFn) -> None:
    _SAMPLERS[name] = fn


def _triton_sampler(*args, **kwargs):
    from .triton.sample import sample_triton

    return sample_triton(*args, **kwargs)


def available_samplers() -> tuple:
    return tuple(_SAMPLERS)


def _triton_runs_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        from .triton.steer import INTERPRET
    except Exception:  # pragma: no cover - depends on the install
        return False
    return INTERPRET


def _resolve(backend, device: torch.device) -> str:
    from . import dispatch

    dispatch._load_optional()  # registers the C++ samplers that can run here
    if backend is None or backend == "auto":
        for name in DEFAULT_ORDER.get(device.type, ("torch",)):
            runs = device.type == "cuda" if name == "triton" else name in ("torch", device.type)
            if name in _SAMPLERS and runs:
                return name
        return "torch"
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
    if backend not in _SAMPLERS:
        raise ValueError(f"backend must be one of {sorted(_SAMPLERS)} or None, got {backend!r}")
    if backend == "triton" and not _triton_runs_on(device):
        raise ValueError(
            "backend='triton' got CPU tensors: run on a GPU, or set TRITON_INTERPRET=1 before "
            "importing triton to run the kernel in Triton's CPU interpreter (slow; for testing)"
        )
    if backend in ("cpu", "cuda") and backend != device.type:
        raise ValueError(f"backend={backend!r} cannot run on {device.type} tensors")
    return backend


# ---------------------------------------------------------------------------------------------
# Parameters


_PARAM_CACHE: dict = {}


def _const(value, dtype, device) -> torch.Tensor:
    # Cached so repeated calls with Python scalars copy nothing from the host again.
    key = (value, dtype, device)
    t = _PARAM_CACHE.get(key)
    if t is None:
        if len(_PARAM_CACHE) > 1024:
            _PARAM_CACHE.clear()
        t = torch.tensor([value], dtype=dtype, device=device)
        _PARAM_CACHE[key] = t
    return t


def _wrap64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def _param(name, value, B, device, dtype, validate, check):
    """A [1] or [B] tensor of ``dtype`` on ``device``; ``check(t) -> bool tensor`` of valid entries."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] not in (1, B)):
            raise ValueError(f"{name} as a tensor must be 0-d, [1] or [B={B}], got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the inputs are on {device}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real numeric tensor, got {value.dtype}")
        if dtype in (torch.int32, torch.int64) and value.is_floating_point():
            if validate and not bool((value == torch.floor(value)).all()):
                raise ValueError(f"{name} must hold integers, got {value.tolist()}")
        if validate and check is not None:
            ok = check(value.double() if value.is_floating_point() else value)
            if not bool(ok.all()):
                bad = value.reshape(-1)[~ok.reshape(-1)][0].item()
                raise ValueError(f"{name} has an invalid value {bad} ({_RULES[name]})")
        return value.reshape(-1).to(dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if dtype in (torch.int32, torch.int64) and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value}")
        value = int(value)
    if name == "seed":
        value = _wrap64(int(value))
    if name in _SCALAR_CHECKS and not _SCALAR_CHECKS[name](value):
        raise ValueError(f"{name} must be {_RULES[name]}, got {value}")
    return _const(value, dtype, device)


_RULES = {
    "temperature": "finite and >= 0 (0 = greedy)",
    "top_k": "an integer >= 0 (0 = off)",
    "top_p": "in (0, 1] (1 = off)",
    "min_p": "in [0, 1] (0 = off)",
    "offset": "an integer in [0, 2^63)",
    "seed": "an integer",
}
_SCALAR_CHECKS = {
    "temperature": lambda v: math.isfinite(v) and v >= 0,
    "top_k": lambda v: v >= 0,
    "top_p": lambda v: 0 < v <= 1,
    "min_p": lambda v: 0 <= v <= 1,
    "offset": lambda v: 0 <= v < 2**63,
}
_CHECKS = {
    "temperature": lambda t: torch.isfinite(t) & (t >= 0),
    "top_k": lambda t: t >= 0,
    "top_p": lambda t: (t > 0) & (t <= 1),
    "min_p": lambda t: (t >= 0) & (t <= 1),
    "offset": lambda t: t >= 0,
    "seed": None,
}


def make_params(B, device, temperature, top_k, top_p, min_p, seed, offset, validate=True) -> SampleParams:
    d = torch.device(device)
    return SampleParams(
        temperature=_param("temperature", temperature, B, d, torch.float32, validate, _CHECKS["temperature"]),
        top_k=_param("top_k", top_k, B, d, torch.int32, validate, _CHECKS["top_k"]),
        top_p=_param("top_p", top_p, B, d, torch.float32, validate, _CHECKS["top_p"]),
        min_p=_param("min_p", min_p, B, d, torch.float32, validate, _CHECKS["min_p"]),
        seed=_param("seed", seed, B, d, torch.int64, validate, None),
        offset=_param("offset", offset, B, d, torch.int64, validate, _CHECKS["offset"]),
        # A per-row seed tensor [B] gives each row its own stream (row index not in the counter);
        # with B = 1 both readings give the same counter.
        row_keyed=not (isinstance(seed, torch.Tensor) and seed.dim() == 1 and seed.shape[0] == B and B > 1),
        host_temperature=None if isinstance(temperature, torch.Tensor) else float(temperature),
    )


# ---------------------------------------------------------------------------------------------
# The counter-based RNG in torch (bit-identical to tl.philox)

_M32 = 0xFFFFFFFF


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values (broadcastable); Triton's constants."""
    for _ in range(rounds):
        pb = c2 * 0xCD9E8D57
        pa = c0 * 0xD2511F53
        c0, c1, c2, c3 = ((pb >> 32) & _M32) ^ c1 ^ k0, pb & _M32, ((pa >> 32) & _M32) ^ c3 ^ k1, pa & _M32
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def gumbel_noise(V: int, rkey: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """float32 [R, V] Gumbel noise; ``rkey`` int64 [R] counter row words, ``seed``/``offset`` int64
    [R] or [1]."""
    dev = rkey.device
    V4 = (V + 3) // 4
    c0 = torch.arange(V4, dtype=torch.int64, device=dev)[None, :]
    c1 = (rkey & _M32)[:, None]
    off = offset.reshape(-1, 1)
    sd = seed.reshape(-1, 1)
    r = torch.stack(philox4x32(c0, c1, off & _M32, (off >> 32) & _M32, sd & _M32, (sd >> 32) & _M32), dim=-1)
    r = r.reshape(r.shape[0], 4 * V4)[:, :V]
    u = (2 * (r >> 9) + 1).to(torch.float32) * 5.9604644775390625e-08
    return -torch.log(-torch.log(u))


def ordered_key(x: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is the float order of fp32 ``x`` (-0.0 == +0.0)."""
    b = (x + 0.0).view(torch.int32)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).to(torch.int64)


# ---------------------------------------------------------------------------------------------
# backend="torch"

_CHUNK = 1 << 22  # elements of noise per chunk


_COEF_CACHE: dict = {}
_TLS = threading.local()


def _scratch(numel: int, slot: int) -> torch.Tensor:
    """Reused CPU float32 buffers (per thread): fresh 600 KB allocations cost page faults that
    are as expensive as the arithmetic at B = 1."""
    bufs = getattr(_TLS, "bufs", None)
    if bufs is None:
        bufs = _TLS.bufs = {}
    t = bufs.get(slot)
    if t is None or t.numel() < numel:
        t = bufs[slot] = torch.empty(max(numel, 1), dtype=torch.float32)
    return t[:numel]


def _scalar_coefficient(hp: torch.Tensor):
    """c_T of a single packed hparams row on the CPU (cached), or None when the row is invalid."""
    vals = tuple(hp[0].tolist())
    c = _COEF_CACHE.get(vals, False)
    if c is False:
        T, alpha, beta, lam, eta = vals
        ok = all(math.isfinite(v) for v in vals) and T >= 0 and T == math.floor(T) and lam > 0 and eta > 0
        c = coefficient_f32(steer_coefficient(int(T), alpha, beta, lam, eta)) if ok else None
        if len(_COEF_CACHE) > 256:
            _COEF_CACHE.clear()
        _COEF_CACHE[vals] = c
    return c


def _steered_rows(zl, zc, zn, hp, exact: bool = False):
    """(x float32 [B, V], status int32 [B] or a probe).

    Exact path: ``status`` is steer's status bits. CPU fast path (one packed hparams row on the
    CPU, not ``exact``): x by plain arithmetic and ``status`` is a 0-d probe tensor, the sum of
    the small-model rows (NaN or +inf when an entry is, or on overflow). The caller adds the
    log-sum-exp of x (NaN / +inf when x has such an entry, -inf when a row is empty) and takes
    the exact path again when the total is not finite; host reads cost nothing on a CPU.
    """
    from .reference import _masked_delta, _scaled
    from .torch_backend import row_status

    B = zl.shape[0]
    hp_rows = hp.expand(B, 5)
    zlf = zl.float()
    if not exact and zl.device.type == "cpu" and hp.shape[0] == 1:
        c = _scalar_coefficient(hp)
        if c is not None:
            zcf = zc.float()
            x = _scratch(B * zl.shape[1], 0).view(B, -1)
            if zn is None:
                probe = zcf.sum()
                torch.add(zlf, zcf, alpha=c, out=x)
            else:
                znf = zn.float()
                probe = zcf.sum() + znf.sum()
                torch.sub(zcf, znf, out=x)
                torch.add(zlf, x, alpha=c, out=x)
            if c == 0.0:
                x.copy_(zlf)
            return x, probe
    c = torch.nan_to_num(coefficient_f32(coefficient_rows(hp_rows)), nan=0.0)[:, None]
    d = zc.float() if zn is None else _masked_delta(zc.float(), zn.float())
    x = zlf + _scaled(c, d)
    return x, row_status(zl, zc, zn, x, hp_rows)


_ZERO_STATUS: dict = {}


def _zero_status(B: int) -> torch.Tensor:
    t = _ZERO_STATUS.get(B)
    if t is None:
        t = _ZERO_STATUS[B] = torch.zeros(B, dtype=torch.int32)
    return t


def _bisect(key, val_fn, lo, hi, target, active, fixed_steps: bool):
    """Largest t in [lo, hi) with val_fn(key >= t) >= target (rows where ``active``)."""
    hi = torch.where(active, hi, lo + 1)
    steps = 0
    while True:
        live = hi - lo > 1
        if fixed_steps:
            if steps >= 33:
                break
        elif not bool(live.any()):
            break
        steps += 1
        mid = (lo + hi) // 2
        ok = val_fn(key >= mid[:, None]) >= target
        lo = torch.where(live & ok, mid, lo)
        hi = torch.where(live & ~ok, mid, hi)
    return lo


def sample_torch(zl, zc, zn, hp, params: SampleParams, want_maxp: bool, num_samples: int = 1):
    B, V = zl.shape
    n = int(num_samples)
    dev = zl.device
    on_cpu = dev.type == "cpu"
    x, status = _steered_rows(zl, zc, zn, hp)
    m, greedy = torch.max(x, dim=1)  # first index of the max
    lse = torch.logsumexp(x, 1)
    if status.dim() == 0:  # CPU fast path: check the probe
        if float(status + lse.sum()) < float("inf") and bool((lse > float("-inf")).all()):
            if params.host_temperature == 0.0:
                # Greedy, every row valid: nothing else to do.
                lp = x.gather(1, greedy[:, None]) - lse[:, None]
                tok = greedy[:, None]
                if n > 1:
                    tok, lp = tok.expand(B, n).clone(), lp.expand(B, n).clone()
                maxp = _llm_max_prob(zl, None) if want_maxp else None
                return tok, lp, maxp, _zero_status(B)
            status = torch.zeros(B, dtype=torch.int32, device=dev)
        else:
            x, status = _steered_rows(zl, zc, zn, hp, exact=True)
            m, greedy = torch.max(x, dim=1)
            lse = torch.logsumexp(x, 1)
    empty = torch.isneginf(m)
    status = status | torch.where((status == 0) & empty, EMPTY_ROW, 0).to(torch.int32)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))

    tau = params.temperature.expand(B)
    tau = torch.where(tau > 0, tau, torch.zeros_like(tau))  # NaN -> greedy
    k = params.top_k.to(torch.int64).expand(B)
    topp = params.top_p.expand(B)
    minp = params.min_p.expand(B)
    use_k = (k > 0) & (k < V)
    use_p = (topp > 0) & (topp < 1)
    use_min = minp > 0
    sampling = tau > 0
    filtered = sampling & (use_k | use_p | use_min) & (status == 0)
    tok = greedy[:, None].expand(B, n)

    if (not on_cpu) or bool(sampling.any()):
        theta = None
        if (not on_cpu) or bool(filtered.any()):
            key = ordered_key(x)
            inv_tau = torch.where(sampling, 1.0 / torch.where(sampling, tau, torch.ones_like(tau)), torch.ones_like(tau))
            w = torch.exp((x - m_safe[:, None]) * inv_tau[:, None])
            neg = ordered_key(torch.tensor([float("-inf")], device=dev)).expand(B)
            top = ordered_key(m_safe) + 1
            fixed = not on_cpu
            lo = _bisect(key, lambda ge: ge.sum(1), neg, top, k, filtered & use_k, fixed)
            base = torch.where(key >= lo[:, None], w, torch.zeros_like(w)).sum(1)
            lo = _bisect(key, lambda ge: torch.where(ge, w, torch.zeros_like(w)).sum(1), lo, top, topp * base,
                         filtered & use_p, fixed)
            thr = ordered_key(m_safe + tau * torch.log(torch.where(use_min, minp, torch.ones_like(minp))))
            lo = torch.where(use_min, torch.maximum(lo, thr), lo)
            theta = torch.where(filtered[:, None], key >= lo[:, None], torch.ones_like(key, dtype=torch.bool))
        row_ids = torch.arange(B, dtype=torch.int64, device=dev)
        seed = params.seed.expand(B)
        offset = params.offset.expand(B)
        base_rk = row_ids * n if params.row_keyed else torch.zeros_like(row_ids)
        out = torch.empty(B, n, dtype=torch.int64, device=dev)
        # Draws in chunks of (rows, draws) so that the noise stays within _CHUNK elements.
        per = max(1, _CHUNK // V)
        flat = B * n
        for s in range(0, flat, per):
            e = min(flat, s + per)
            idx = torch.arange(s, e, device=dev)
            r, d = idx // n, idx % n
            g = gumbel_noise(V, base_rk[r] + d, seed[r], offset[r])
            kk = x[r] + tau[r, None] * g
            if theta is not None:
                kk = torch.where(theta[r], kk, torch.full_like(kk, float("-inf")))
            out.view(-1)[s:e] = torch.argmax(kk, dim=1)
        tok = torch.where(sampling[:, None], out, tok)

    ok = status == 0
    lp = x.gather(1, tok) - lse[:, None]
    lp = torch.where(ok[:, None], lp, torch.full_like(lp, float("nan")))
    tok = torch.where(ok[:, None], tok, torch.full_like(tok, -1))
    maxp = _llm_max_prob(zl, ok) if want_maxp else None
    return tok, lp, maxp, status


def _llm_max_prob(zl, ok):
    """max_v softmax(z_L)_v = 1 / sum_v exp(z_L,v - max z_L); NaN where ``ok`` is False."""
    zlf = zl.float()
    ml = zlf.amax(1)
    ml_safe = torch.where(torch.isfinite(ml), ml, torch.zeros_like(ml))
    e = zlf - ml_safe[:, None]
    e.exp_()
    maxp = e.sum(1).reciprocal_()
    good = torch.isfinite(ml) if ok is None else ok & torch.isfinite(ml)
    return torch.where(good, maxp, torch.full_like(maxp, float("nan")))


register_sampler("torch", sample_torch)
register_sampler("triton", _triton_sampler)


# ---------------------------------------------------------------------------------------------
# Public op


def steer_sample(
    llm_logits: torch.Tensor,
    slm_ctx_logits: torch.Tensor,
    slm_noctx_logits: Optional[torch.Tensor],
    cfg=None,
    *,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    seed=0,
    offset=0,
    num_samples: Optional[int] = None,
    backend: Optional[str] = None,
    return_llm_max_prob: bool = False,
    validate: bool = True,
):
    """Steer the LLM's next-token distribution and pick the next token, in one op.

    Same inputs, masks and validation as :func:`costeer_kernels.steer` (``llm_logits``,
    ``slm_ctx_logits``, ``slm_noctx_logits`` [B, V] or [V], fp32/fp16/bf16; ``cfg`` a
    :class:`SteerConfig`), but nothing of size [B, V] is written: the result is the chosen token
    per row. The sampling rule, the filters' definitions, the sort-free threshold search and the
    RNG are described in this module's docstring.

    Args:
        temperature: 0 = greedy (argmax, lowest index on ties); > 0 samples exp(x / temperature).
        top_k: keep the k largest steered logits (ties kept); 0 = off.
        top_p: nucleus mass in (0, 1] over the top-k-renormalized tempered distribution; 1 = off.
        min_p: keep tokens with probability >= min_p * the top probability; 0 = off.
        seed, offset: the RNG's key and stream position (ints, or int64 device tensors 0-d/[1]/[B]).
            Same (seed, offset) and inputs give the same tokens; advance ``offset`` per step.
        num_samples: ``None`` (one token per row, outputs [B]) or n >= 1 independent draws per row
            (outputs [B, n]); draws share one pass of statistics and threshold search.
        backend: ``"torch"``, ``"triton"`` or a registered C++ name (``"cpu"``/``"cuda"``), or
            ``None`` for the device's default (CUDA: Triton; CPU: the C++ kernel, else torch).
        return_llm_max_prob: also return max_v softmax(llm_logits)_v per row (float32 [B]), from the
            online-softmax statistics of z_L (confidence gating, ``costeer.gating``).
        validate: raise ValueError for invalid rows (as ``steer``) and invalid sampling
            parameters; with ``False`` nothing is read back (CUDA-graph safe), invalid rows give
            token -1 and NaN log-prob, and out-of-range parameters are clamped to "off"
            (temperature <= 0 or NaN: greedy).

    Every parameter is a scalar or a per-row tensor [B].

    Returns:
        ``(token_ids int64 [B], token_logprobs float32 [B])``, plus ``llm_max_prob float32 [B]``
        when asked; [B, n] for the first two with ``num_samples=n``; 0-d / [n] for [V] inputs.
        ``token_logprobs`` is the steered log-prob log softmax(x)[token], before temperature and
        filters.
    """
    from .ops import prepare

    zl, zc, zn, hp, _, squeeze, _ = prepare(llm_logits, slm_ctx_logits, slm_noctx_logits, cfg, None, "closed_form", None)
    B, V = zl.shape
    name = _resolve(backend, zl.device)
    n = check_num_samples(num_samples)
    params = make_params(B, zl.device, temperature, top_k, top_p, min_p, seed, offset, validate)
    tok, lp, maxp, status = _run(name, zl, zc, zn, hp, params, bool(return_llm_max_prob), n)
    return finish(tok, lp, maxp, status, validate, num_samples, squeeze, return_llm_max_prob, raise_for_status)


def check_num_samples(num_samples) -> int:
    if num_samples is not None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be None or an int >= 1, got {num_samples!r}")
    return 1 if num_samples is None else num_samples


def finish(tok, lp, maxp, status, validate, num_samples, squeeze, return_llm_max_prob, raise_fn):
    """The public return value of a sampler's outputs (shapes as documented in steer_sample)."""
    if validate and (status.device.type != "cpu" or bool(status.any())):
        raise_fn(status)
    if num_samples is None:
        tok, lp = tok[:, 0], lp[:, 0]
    if squeeze:
        tok, lp = tok[0], lp[0]
        maxp = None if maxp is None else maxp[0]
    if return_llm_max_prob:
        return tok, lp, maxp
    return tok, lp


def _run(name, zl, zc, zn, hp, params, want_maxp, n):
    return _SAMPLERS[name](zl, zc, zn, hp, params, want_maxp, n)
