"""Hyperparameters of the CoSteer update and their packed per-row form.

Every backend receives the hyperparameters as one float64 tensor ``hparams`` of shape [R, 5]
(R = 1 broadcasts to every row, otherwise R = B), columns ``(T, alpha, beta, lam, eta)``.
Kernels compute the closed-form coefficient c_T from that row themselves, so per-row settings
need no host round trip and a call stays capturable in a CUDA graph.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Union

import torch

Number = Union[int, float]
Param = Union[int, float, torch.Tensor]

HPARAM_FIELDS = ("T", "alpha", "beta", "lam", "eta")


# The largest T accepted: c_T costs O(T) per row in every kernel (the recurrence below), so T is
# bounded to keep any call short; c_T grows only like log T (c_20 = 1.78, c_200 = 2.92).
# Matches STEER_MAX_T in csrc/steer_math.h and MAX_T in triton/steer.py.
MAX_T = 100_000


@functools.lru_cache(maxsize=1024)
def _coefficient(T: int, alpha: float, beta: float, lam: float, eta: float) -> float:
    c_prev, c_sum = 0.0, 0.0
    for t in range(1, T + 1):
        c = (alpha * c_sum + t * beta + c_prev / eta) / (t * lam + 1.0 / eta)
        c_sum += c
        c_prev = c
    return c_prev


def steer_coefficient(T: int, alpha: float, beta: float, lam: float, eta: float) -> float:
    """c_T of the closed form ``log_softmax(z_L + c_T (z_c - z_n))``, in float64.

    c_0 = 0,  c_t = (alpha * sum_{s<t} c_s + t*beta + c_{t-1}/eta) / (t*lam + 1/eta).
    The one Python implementation of the recurrence (the kernels carry their own); cached.

    Examples
    --------
    >>> round(steer_coefficient(20, 2.0, 1.0, 2.0, 10.0), 6)
    1.783257
    """
    if not 0 <= T <= MAX_T:
        raise ValueError(f"T must be an integer in [0, {MAX_T}], got {T}")
    return _coefficient(int(T), float(alpha), float(beta), float(lam), float(eta))


def row_coefficient(values) -> float:
    """c_T of one packed (T, alpha, beta, lam, eta) row, or NaN when the row is invalid."""
    T, alpha, beta, lam, eta = (float(v) for v in values)
    ok = all(math.isfinite(v) for v in (T, alpha, beta, lam, eta))
    if not (ok and 0 <= T <= MAX_T and T == math.floor(T) and lam > 0 and eta > 0):
        return float("nan")
    return _coefficient(int(T), alpha, beta, lam, eta)


def _check_scalar(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"SteerConfig.{name} must be a number or a 1-D tensor, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"SteerConfig.{name} must be finite, got {value}")


@dataclass(frozen=True)
class SteerConfig:
    """Settings of the CoSteer update (defaults: the paper's T=20, alpha=2, beta=1, lambda=2, eta=10).

    Each field is a Python number, or a 1-D tensor of length B for per-row settings (any numeric
    dtype, on the inputs' device). Scalars are validated here: ``T`` an int in [0, MAX_T]
    (100000), ``lam`` > 0, ``eta`` > 0, everything finite. Tensor fields are validated by the
    kernel from its own statistics (rows with invalid settings are reported like rows with invalid
    logits, status ``BAD_HPARAMS``).

    Examples
    --------
    >>> import torch
    >>> from costeer_kernels import SteerConfig
    >>> round(SteerConfig(T=20).coefficient, 6)
    1.783257
    >>> SteerConfig(T=torch.tensor([0, 20])).coefficient.tolist()[0]
    0.0
    """

    T: Param = 20
    alpha: Param = 2.0
    beta: Param = 1.0
    lam: Param = 2.0
    eta: Param = 10.0

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                if v.dim() != 1:
                    raise ValueError(f"SteerConfig.{f.name} as a tensor must be 1-D (one value per row), got shape {tuple(v.shape)}")
                if v.dtype == torch.bool or v.is_complex():
                    raise TypeError(f"SteerConfig.{f.name} must be a real numeric tensor, got {v.dtype}")
                continue
            _check_scalar(f.name, v)
        if not isinstance(self.T, torch.Tensor):
            if isinstance(self.T, float) and not self.T.is_integer():
                raise ValueError(f"SteerConfig.T must be an integer >= 0, got {self.T}")
            if not 0 <= self.T <= MAX_T:
                raise ValueError(f"SteerConfig.T must be an integer in [0, {MAX_T}], got {self.T}")
            object.__setattr__(self, "T", int(self.T))
        for name in ("lam", "eta"):
            v = getattr(self, name)
            if not isinstance(v, torch.Tensor) and v <= 0:
                raise ValueError(f"SteerConfig.{name} must be > 0, got {v}")

    @property
    def per_row(self) -> bool:
        return any(isinstance(getattr(self, n), torch.Tensor) for n in HPARAM_FIELDS)

    def values(self):
        return tuple(getattr(self, n) for n in HPARAM_FIELDS)

    @property
    def coefficient(self) -> Union[float, torch.Tensor]:
        """c_T in float64: a float, or a float64 tensor [B] for per-row settings."""
        if not self.per_row:
            return steer_coefficient(*self.values())
        return coefficient_rows(self.packed(None, None))

    def packed(self, batch: int | None, device) -> torch.Tensor:
        """float64 [R, 5] rows of (T, alpha, beta, lam, eta); R = 1 for scalar settings."""
        if not self.per_row:
            return _scalar_hparams(self.values(), torch.device(device) if device is not None else torch.device("cpu"))
        lengths = {n: getattr(self, n).shape[0] for n in HPARAM_FIELDS if isinstance(getattr(self, n), torch.Tensor)}
        rows = batch if batch is not None else next(iter(lengths.values()))
        for n, length in lengths.items():
            if length != rows:
                raise ValueError(f"SteerConfig.{n} has {length} values, expected one per row ({rows})")
        if device is None:
            device = next(getattr(self, n).device for n in lengths)
        device = torch.device(device)
        cols = []
        for n in HPARAM_FIELDS:
            v = getattr(self, n)
            if isinstance(v, torch.Tensor):
                if v.device != device:
                    raise ValueError(f"SteerConfig.{n} is on {v.device}, expected the inputs' device {device}")
                cols.append(v.to(torch.float64))
            else:
                cols.append(torch.full((rows,), float(v), dtype=torch.float64, device=device))
        return torch.stack(cols, dim=1).contiguous()


_HPARAM_CACHE: dict = {}


def _scalar_hparams(values, device: torch.device) -> torch.Tensor:
    # Cached so that repeated calls (and CUDA-graph replays) never copy from the host again.
    key = (values, device)
    t = _HPARAM_CACHE.get(key)
    if t is None:
        if len(_HPARAM_CACHE) > 256:
            _HPARAM_CACHE.clear()
        t = torch.tensor([[float(v) for v in values]], dtype=torch.float64, device=device)
        _HPARAM_CACHE[key] = t
    return t


def hparams_valid(hp: torch.Tensor) -> torch.Tensor:
    """Bool [R]: T an integer in [0, MAX_T], lam > 0, eta > 0, everything finite."""
    T, lam, eta = hp[:, 0], hp[:, 3], hp[:, 4]
    return (torch.isfinite(hp).all(dim=1) & (T >= 0) & (T <= MAX_T) & (T == torch.floor(T)) & (lam > 0)
            & (eta > 0))


FLT_MIN = 1.17549435e-38


def coefficient_f32(c64):
    """c_T as the float32 factor of x = z_L + c_T d, for a float64 tensor or a Python float. A
    nonzero c_T that rounds to 0 stays nonzero (+-FLT_MIN) so that it still steers +-inf deltas
    (bans, a lone no-context -inf) as every kernel does (csrc/steer_math.h, triton/steer.py); a
    finite delta then adds ~1e-38 * delta, i.e. nothing. NaN (invalid rows) stays NaN."""
    if isinstance(c64, torch.Tensor):
        c = c64.to(torch.float32)
        tiny = torch.where(c64 > 0, FLT_MIN, -FLT_MIN).to(torch.float32)
        return torch.where((c == 0) & (c64 != 0), tiny, c)
    c = float(torch.tensor(c64, dtype=torch.float32)) if c64 == c64 else c64
    return (FLT_MIN if c64 > 0 else -FLT_MIN) if c == 0.0 and c64 != 0.0 else c


def coefficient_rows(hp: torch.Tensor) -> torch.Tensor:
    """c_T per row of packed hparams [R, 5], float64 on hp's device (NaN for invalid rows).

    Reads the settings back to the host once and runs the scalar recurrence per distinct row
    (cached): fine for the torch backend and the reference, not used by the kernels (they run the
    recurrence per row themselves, without a sync).
    """
    rows = hp.detach().to("cpu", torch.float64).tolist()
    cache = {}
    vals = [cache.setdefault(tuple(r), row_coefficient(r)) for r in rows]
    return torch.tensor(vals, dtype=torch.float64).to(hp.device)
