"""backend="torch": the steering op in plain vectorized PyTorch (any device).

Not the fastest anywhere; it is the portable fallback and the eager baseline the benchmarks and
the tolerance rules compare against.
"""
from __future__ import annotations

import functools
import math

import torch

from . import status as st
from .config import coefficient_f32, coefficient_rows, hparams_valid, steer_coefficient
from .reference import _masked_delta, _scaled

_NEG_INF = float("-inf")


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
    hp_bad = ~hparams_valid(hp)
    add(hp_bad.expand(B) if hp_bad.shape[0] == 1 else hp_bad, st.BAD_HPARAMS)
    return s


def steer_torch(zl, zc, zn, hp, out, mode: str) -> torch.Tensor:
    """Writes float32 log-probs into ``out`` [B, V]; returns int32 status [B]."""
    B = zl.shape[0]
    hp_rows = hp.expand(B, 5)
    zlf = zl.float()
    d = zc.float() if zn is None else _masked_delta(zc.float(), zn.float())
    if hp.shape[0] == 1 and hp.device.type == "cpu":
        # Shared settings on the host: the scalar recurrence, no per-call tensor loop.
        c_val = _scalar_coefficient(tuple(hp[0].tolist()))
        c = torch.full((B, 1), coefficient_f32(c_val), dtype=torch.float32)
    else:
        c = coefficient_f32(coefficient_rows(hp_rows))[:, None]
        c = torch.nan_to_num(c, nan=0.0)
    x = zlf + _scaled(c, d)
    status = row_status(zl, zc, zn, x, hp_rows)
    if mode == "iterative":
        x = _iterate(zlf, d, hp_rows)
    lse = torch.logsumexp(x, dim=1, keepdim=True)
    res = x - lse
    torch.where((status != 0)[:, None], torch.full_like(res, float("nan")), res, out=out)
    return status


@functools.lru_cache(maxsize=256)
def _scalar_coefficient(values) -> float:
    T, alpha, beta, lam, eta = values
    ok = all(math.isfinite(v) for v in values) and T >= 0 and T == int(T) and lam > 0 and eta > 0
    return steer_coefficient(int(T), alpha, beta, lam, eta) if ok else 0.0


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
        U_new = U + _scaled(alpha, _masked_delta(p, b)) + _scaled(beta, d)
        p_new = torch.log_softmax((t * lam * b + U_new + p / eta) / (t * lam + 1.0 / eta), dim=1)
        U = torch.where(active, U_new, U)
        p = torch.where(active, p_new, p)
    return p


def gather_mapped(zc, zn, slm_index):
    """The small-model rows read through a vocabulary map: (zc_g, zn_g, valid), each [B, V_llm].

    ``valid`` [V_llm] marks LLM tokens with a small-model counterpart (0 <= index < V_slm); the
    others read 0 (no delta, and nothing for the status bits to see).
    """
    idx = slm_index.to(device=zc.device)
    valid = (idx >= 0) & (idx < zc.shape[1])
    safe = torch.where(valid, idx, torch.zeros_like(idx)).long()
    zc_g = torch.where(valid, zc.index_select(1, safe), torch.zeros((), dtype=zc.dtype, device=zc.device))
    zn_g = None
    if zn is not None:
        zn_g = torch.where(valid, zn.index_select(1, safe), torch.zeros((), dtype=zn.dtype, device=zn.device))
    return zc_g, zn_g, valid


def steer_torch_mapped(zl, zc, zn, hp, slm_index, drop: bool, out, mode: str) -> torch.Tensor:
    """``steer_torch`` with the small-model rows gathered through ``slm_index`` (int [V_llm]).

    LLM tokens without a counterpart keep their LLM logit (no delta), or with ``drop`` are
    excluded (-inf). The portable fallback: it materializes the gathered rows.
    """
    B = zl.shape[0]
    hp_rows = hp.expand(B, 5)
    zc_g, zn_g, valid = gather_mapped(zc, zn, slm_index)
    zlf = zl.float()
    if drop:
        zlf = torch.where(valid, zlf, torch.full((), _NEG_INF, dtype=zlf.dtype, device=zlf.device))
    d = zc_g.float() if zn_g is None else _masked_delta(zc_g.float(), zn_g.float())
    if hp.shape[0] == 1 and hp.device.type == "cpu":
        c = torch.full((B, 1), coefficient_f32(_scalar_coefficient(tuple(hp[0].tolist()))), dtype=torch.float32)
    else:
        c = torch.nan_to_num(coefficient_f32(coefficient_rows(hp_rows))[:, None], nan=0.0)
    x = zlf + _scaled(c, d)
    status = row_status(zl, zc_g, zn_g, x, hp_rows)
    if mode == "iterative":
        x = _iterate(zlf, d, hp_rows)
    res = x - torch.logsumexp(x, dim=1, keepdim=True)
    torch.where((status != 0)[:, None], torch.full_like(res, float("nan")), res, out=out)
    return status
