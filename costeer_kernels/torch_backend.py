"""backend="torch": the three ops in plain vectorized PyTorch (any device).

Not the fastest anywhere; it is the portable fallback and the eager baseline the benchmarks and
the tolerance rules compare against. ``steered_logits`` is the one torch form of the closed form
x = z_L + c_T (z_c - z_n): the steer op, the sampler and ``closed_form_steer`` all use it.
"""
from __future__ import annotations

import torch

from . import registry
from . import status as st
from .config import coefficient_f32, coefficient_rows, hparams_valid
from .rng import gumbel_noise, ordered_key

_NEG_INF = float("-inf")
_CHUNK = 1 << 22  # elements of Gumbel noise per chunk


def masked_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Equal entries (in practice: both -inf) carry no delta; avoids -inf - -inf = NaN.
    return torch.where(a == b, torch.zeros_like(a), a - b)


def scaled(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # 0 * (+-inf) must stay 0: a zero weight switches a term off entirely.
    return torch.where(scale == 0, torch.zeros_like(x), scale * x)


def gather_mapped(zc, zn, slm_index):
    """The small-model rows read through a vocabulary map: (zc_g, zn_g, valid), each [B, V_llm].

    ``valid`` [V_llm] marks LLM tokens with a small-model counterpart (0 <= index < V_slm); the
    others read 0 (no delta, and nothing for the status bits to see).
    """
    idx = slm_index.to(device=zc.device)
    valid = (idx >= 0) & (idx < zc.shape[1])
    safe = torch.where(valid, idx, torch.zeros_like(idx)).long()
    zero = torch.zeros((), dtype=zc.dtype, device=zc.device)
    zc_g = torch.where(valid, zc.index_select(1, safe), zero)
    zn_g = None if zn is None else torch.where(valid, zn.index_select(1, safe), zero)
    return zc_g, zn_g, valid


def steered_logits(zl, zc, zn, hp, *, dtype=torch.float32, slm_index=None, drop=False):
    """x = z_L + c_T (z_c - z_n) per row, in ``dtype`` (float32: the kernels' arithmetic, with
    c_T rounded as they round it; float64: the reference), and the rows that entered it.

    Returns ``(x [B, V], zl_used, zc_used, zn_used, delta)``; with ``slm_index`` the small-model rows are
    gathered through the map (``drop``: LLM tokens without a counterpart are -inf). Invalid
    settings give c = 0 here; the status bits report them.
    """
    B = zl.shape[0]
    valid = None
    if slm_index is not None:
        zc, zn, valid = gather_mapped(zc, zn, slm_index)
    zlf = zl.to(dtype)
    if drop and valid is not None:
        zlf = torch.where(valid, zlf, torch.full((), _NEG_INF, dtype=dtype, device=zlf.device))
    d = zc.to(dtype) if zn is None else masked_delta(zc.to(dtype), zn.to(dtype))
    c64 = coefficient_rows(hp).expand(B) if hp.shape[0] == 1 else coefficient_rows(hp)
    c = coefficient_f32(c64) if dtype == torch.float32 else c64.to(dtype)
    c = torch.nan_to_num(c, nan=0.0)[:, None].to(zlf.device)
    return zlf + scaled(c, d), zlf, zc, zn, d


def row_status(zl, zc, zn, x, hp) -> torch.Tensor:
    """The status bits of each row (see ``status.py``), int32 [B]."""
    B = zl.shape[0]
    s = torch.zeros(B, dtype=torch.int32, device=zl.device)

    def add(cond, bit):
        nonlocal s
        s = s | (cond.to(torch.int32) * bit)

    add(torch.isnan(zl).any(1), st.NAN_LLM)
    add((zl == float("inf")).any(1), st.POSINF_LLM)
    add(torch.isnan(zc).any(1), st.NAN_CTX)
    add((zc == float("inf")).any(1), st.POSINF_CTX)
    if zn is not None:
        add(torch.isnan(zn).any(1), st.NAN_NOCTX)
        add((zn == float("inf")).any(1), st.POSINF_NOCTX)
    add(~(x > _NEG_INF).any(1) & (s == 0), st.EMPTY_ROW)
    add(((x == float("inf")) | torch.isnan(x)).any(1) & (s == 0), st.NOCTX_MASK)
    hp_bad = ~hparams_valid(hp).to(zl.device)
    add(hp_bad.expand(B) if hp_bad.shape[0] == 1 else hp_bad, st.BAD_HPARAMS)
    return s


def _iterate(zl: torch.Tensor, d: torch.Tensor, hp_rows: torch.Tensor) -> torch.Tensor:
    """The T-step update in float32 on the unnormalized delta (normalizers cancel, see docs)."""
    bad = ~hparams_valid(hp_rows)
    hp32 = hp_rows.float()
    T_rows = torch.where(bad, torch.zeros_like(hp_rows[:, 0]), hp_rows[:, 0]).long()
    alpha, beta, lam, eta = (hp32[:, i : i + 1] for i in range(1, 5))
    b = torch.log_softmax(zl, dim=1)
    p = b.clone()
    U = torch.zeros_like(b)
    t_max = int(T_rows.max().item()) if T_rows.numel() else 0
    for t in range(1, t_max + 1):
        active = (T_rows >= t)[:, None]
        U_new = U + scaled(alpha, masked_delta(p, b)) + scaled(beta, d)
        p_new = torch.log_softmax((t * lam * b + U_new + p / eta) / (t * lam + 1.0 / eta), dim=1)
        U = torch.where(active, U_new, U)
        p = torch.where(active, p_new, p)
    return p


def _steer(zl, zc, zn, hp, out, mode, slm_index=None, drop=False) -> torch.Tensor:
    B = zl.shape[0]
    x, zlf, zc_u, zn_u, d = steered_logits(zl, zc, zn, hp, slm_index=slm_index, drop=drop)
    hp_rows = hp.expand(B, 5)
    status = row_status(zl, zc_u, zn_u, x, hp_rows)
    if mode == "iterative":
        x = _iterate(zlf, d, hp_rows)
    res = x - torch.logsumexp(x, dim=1, keepdim=True)
    torch.where((status != 0)[:, None], torch.full_like(res, float("nan")), res, out=out)
    return status


def steer_torch(zl, zc, zn, hp, out, mode: str = "closed_form") -> torch.Tensor:
    """Writes float32 log-probs into ``out`` [B, V]; returns int32 status [B]."""
    return _steer(zl, zc, zn, hp, out, mode)


def steer_torch_mapped(zl, zc, zn, hp, slm_index, drop: bool, out, mode: str = "closed_form") -> torch.Tensor:
    """``steer_torch`` with the small-model rows gathered through ``slm_index`` (int [V_llm]).

    LLM tokens without a counterpart keep their LLM logit (no delta), or with ``drop`` are
    excluded (-inf). The portable fallback: it materializes the gathered rows.
    """
    return _steer(zl, zc, zn, hp, out, mode, slm_index=slm_index, drop=bool(drop))


# ---------------------------------------------------------------------------------------------
# Sampling (the rule and the RNG are defined in sampling.py's docstring)


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


def llm_max_prob(zl, ok=None):
    """max_v softmax(z_L)_v = 1 / sum_v exp(z_L,v - max z_L); NaN where ``ok`` is False."""
    zlf = zl.float()
    ml = zlf.amax(1)
    ml_safe = torch.where(torch.isfinite(ml), ml, torch.zeros_like(ml))
    maxp = (zlf - ml_safe[:, None]).exp().sum(1).reciprocal()
    good = torch.isfinite(ml) if ok is None else ok & torch.isfinite(ml)
    return torch.where(good, maxp, torch.full_like(maxp, float("nan")))


def sample_torch(zl, zc, zn, hp, params, want_maxp: bool, num_samples: int = 1):
    """The torch sampler (registry contract ``sample``). On the CPU it reads a few scalars back
    (free there) to skip work; on CUDA it runs fixed bisection steps without a host sync."""
    B, V = zl.shape
    n = int(num_samples)
    dev = zl.device
    on_cpu = dev.type == "cpu"
    x, _, zc_u, zn_u, _ = steered_logits(zl, zc, zn, hp)
    status = row_status(zl, zc_u, zn_u, x, hp.expand(B, 5))
    m, greedy = torch.max(x, dim=1)  # first index of the max
    lse = torch.logsumexp(x, 1)
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
            neg = ordered_key(torch.tensor([_NEG_INF], device=dev)).expand(B)
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
                kk = torch.where(theta[r], kk, torch.full_like(kk, _NEG_INF))
            out.view(-1)[s:e] = torch.argmax(kk, dim=1)
        tok = torch.where(sampling[:, None], out, tok)

    ok = status == 0
    lp = x.gather(1, tok) - lse[:, None]
    lp = torch.where(ok[:, None], lp, torch.full_like(lp, float("nan")))
    tok = torch.where(ok[:, None], tok, torch.full_like(tok, -1))
    maxp = llm_max_prob(zl, ok) if want_maxp else None
    return tok, lp, maxp, status


registry.register_backend("torch", registry.anywhere, steer=steer_torch, steer_mapped=steer_torch_mapped,
                          sample=sample_torch)
