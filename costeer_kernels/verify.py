"""``speculative_verify``: the verification step of speculative steering as one op.

For each of B requests a draft of k tokens d_1..d_k was proposed by a local distribution q (drawn
with ``steer_sample`` from the proposal's logits y_1..y_k), and the LLM scored the k+1 positions
in one forward. The op steers the B (k+1) scored rows (x_i = z_L,i + c_T (z_c,i - z_n,i),
``steer``'s closed form) and decides, per request:

- greedy (``temperature == 0``): accept d_i while d_i == argmax x_i, where the argmax is the one
  ``steer_sample`` picks for the same rows (the device's default ``sample`` kernel: lowest index
  on ties), so speculative greedy output is token for token the decoding loop's; emit argmax x_j
  at the first mismatch j (or at the bonus row k);
- sampling: p_i and q_i are the tempered, filtered distributions ``steer_sample`` draws from
  (same temperature / top_k / top_p / min_p rules, ``costeer_kernels.sampling``) of x_i and of
  y_i. d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); on the first rejection the
  emitted token is drawn from normalize(max(0, p_i - q_i)); when all k are accepted it is drawn
  from p_k (the bonus row). The emitted tokens are then distributed exactly as tokens drawn from
  p one by one (the standard speculative-sampling argument), and truncating a round after any
  emitted token keeps that property (each token's draw is fresh given the tokens before it).

Random numbers: ``steer_sample``'s contract (Philox4x32-10 keyed by the 64-bit seed, counter
(v >> 2, r, offset low, offset high)), with the k+1 positions of a request as its k+1 draws:
r = b (k+1) + i for position i of request b when ``seed`` is one value for the batch, r = i when
``seed`` is a per-request tensor [B] (each request its own stream, independent of its slot). The
residual / bonus draw at position i is Gumbel-max with exactly ``steer_sample``'s noise for that
counter, and the acceptance uniform of position i is word 0 of the block at v >> 2 = 2^32 - 1
(beyond every vocabulary's token blocks). A round with k = 0 therefore draws what ``steer_sample``
draws for the same row, seed and offset. Same inputs, seed and offset give the same result.

Backend: "torch" (the ``verify`` kernel of the one registry, ``registry.py``; the distributions
are built with a sort over V per row, B (2k+1) rows per round). Registered as the torch op
``torch.ops.costeer.speculative_verify``, with a fake implementation for torch.compile.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import checks, registry
from . import torch_backend
from .config import SteerConfig
from .rng import _M32, gumbel_noise, philox4x32
from .sampling import SampleParams, make_params
from .status import check_status

__all__ = ["speculative_verify", "filtered_logprobs"]

_NEG_INF = float("-inf")


def _per_row(value, R: int, dtype, device) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return t.to(device=device, dtype=dtype).reshape(-1).expand(R)


def filtered_logprobs(x: torch.Tensor, temperature, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """float64 [R, V] log-probs of the distribution ``steer_sample`` samples from logits ``x``
    (temperature > 0): exp(x / temperature) on the allowed set, -inf elsewhere.

    Every parameter is a scalar or a per-row tensor [R]. Each filter keeps {v : x_v >= its
    threshold} (ties kept); top-p's mass is measured over the top-k set; the allowed set is where
    x reaches the largest threshold.
    """
    x = x.double()
    R, V = x.shape
    dev = x.device
    tau = _per_row(temperature, R, torch.float64, dev)[:, None]
    k = _per_row(top_k, R, torch.int64, dev)[:, None]
    p = _per_row(top_p, R, torch.float64, dev)[:, None]
    mp = _per_row(min_p, R, torch.float64, dev)[:, None]
    y = x / tau
    vals, _ = torch.sort(x, dim=1, descending=True)
    neg = torch.full((R, 1), _NEG_INF, dtype=torch.float64, device=dev)
    kth = vals.gather(1, (k.clamp(1, V) - 1))
    thr = torch.where((k > 0) & (k < V), kth, neg)
    # top-p over the top-k set, in the sorted order of x (the order of y on the allowed set)
    w = torch.softmax(torch.where(vals >= thr, vals / tau, torch.full_like(vals, _NEG_INF)), dim=1)
    before = w.cumsum(1) - w  # mass of the strictly larger-ranked tokens
    last = (before < p).sum(1, keepdim=True).clamp(min=1) - 1  # the smallest prefix reaching top_p
    thr = torch.where(p < 1, torch.maximum(thr, vals.gather(1, last)), thr)
    m = vals[:, :1]
    thr = torch.where(mp > 0, torch.maximum(thr, m + tau * torch.log(torch.where(mp > 0, mp, torch.ones_like(mp)))), thr)
    return torch.log_softmax(torch.where(x >= thr, y, torch.full_like(y, _NEG_INF)), dim=1)


def _row_words(B: int, width: int, row_keyed: bool, device) -> torch.Tensor:
    """int64 [B, width]: the RNG counter's row word of position i of request b."""
    i = torch.arange(width, dtype=torch.int64, device=device)[None, :]
    b = torch.arange(B, dtype=torch.int64, device=device)[:, None]
    return b * width + i if row_keyed else i.expand(B, width)


def _uniforms(rk: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in (0, 1), shaped like ``rk``: word 0 of the block v >> 2 = 2^32 - 1."""
    s = seed.reshape(-1, 1).expand_as(rk)
    o = offset.reshape(-1, 1).expand_as(rk)
    c0 = torch.full_like(rk, _M32)
    w = philox4x32(c0, rk & _M32, o & _M32, (o >> 32) & _M32, s & _M32, (s >> 32) & _M32)[0]
    return (2 * (w >> 9) + 1).to(torch.float64) * 5.9604644775390625e-08


def verify_torch(zl, zc, zn, hp, drafts, draft_logits, params: SampleParams):
    """The torch ``verify`` kernel (registry contract): rows [B (k+1), V], drafts int64 [B, k],
    draft_logits [B k, V] or None; returns (accepted int64 [B], token int64 [B], status int32 [B])."""
    B, k = drafts.shape
    W = k + 1
    V = zl.shape[1]
    dev = zl.device
    seed = params.seed.expand(B)
    offset = params.offset.expand(B)
    rk = _row_words(B, W, params.row_keyed, dev)
    # Greedy decisions from the device's default sampler: the decoding loop's argmax, bit for bit.
    sampler = registry.kernel(registry.resolve("sample", None, dev), "sample")
    zero = torch.zeros(1, dtype=torch.float32, device=dev)
    none = torch.zeros(1, dtype=torch.int64, device=dev)  # greedy: no random numbers
    greedy_params = SampleParams(zero, torch.zeros(1, dtype=torch.int32, device=dev), zero + 1, zero, none, none, True)
    best, _, _, row_status = sampler(zl, zc, zn, hp, greedy_params, False, 1)
    best = best.reshape(B, W)
    row_status = row_status.reshape(B, W)
    status = row_status[:, 0]
    for i in range(1, W):
        status = status | row_status[:, i]
    accepted = (drafts == best[:, :k]).to(torch.int64).cumprod(1).sum(1)
    token = best.gather(1, accepted[:, None])[:, 0]

    tau = params.temperature.expand(B)
    sampling = tau > 0
    if bool(sampling.any()):
        if k and draft_logits is None:
            raise ValueError("speculative_verify: draft_logits are needed when sampling with k >= 1 drafts")
        rows = lambda t, n: t.expand(B).repeat_interleave(n)  # noqa: E731 - per-request value per row
        t_r = torch.where(sampling, tau, torch.ones_like(tau))
        x = torch_backend.steered_logits(zl, zc, zn, hp)[0]
        logp = filtered_logprobs(x, rows(t_r, W), rows(params.top_k, W), rows(params.top_p, W),
                                 rows(params.min_p, W)).reshape(B, W, V)
        j = torch.full((B,), k, dtype=torch.int64, device=dev)
        target = logp[:, k]
        if k:
            logq = filtered_logprobs(draft_logits, rows(t_r, k), rows(params.top_k, k), rows(params.top_p, k),
                                     rows(params.min_p, k)).reshape(B, k, V)
            lp_d = logp[:, :k].gather(2, drafts[:, :, None])[:, :, 0]
            lq_d = logq.gather(2, drafts[:, :, None])[:, :, 0]
            u = _uniforms(rk[:, :k], seed, offset)
            accept = (torch.log(u) < lp_d - lq_d) & torch.isfinite(lq_d)  # u < p/q: probability min(1, p/q)
            j = accept.to(torch.int64).cumprod(1).sum(1)
            at = j.clamp(max=k - 1)[:, None, None].expand(B, 1, V)
            p_j = logp.gather(1, j[:, None, None].expand(B, 1, V))[:, 0].exp()
            q_j = logq.gather(1, at)[:, 0].exp()
            resid = (p_j - q_j).clamp(min=0.0)
            degenerate = resid.sum(1, keepdim=True) <= 0.0  # p == q up to rounding: rejection had probability ~0
            resid = torch.where(degenerate, p_j, resid)
            target = torch.where((j < k)[:, None], torch.log(resid), logp[:, k])
        g = gumbel_noise(V, rk.gather(1, j[:, None])[:, 0], seed, offset)
        drawn = torch.argmax(target + g.double(), dim=1)
        accepted = torch.where(sampling, j, accepted)
        token = torch.where(sampling, drawn, token)
    ok = status == 0
    accepted = torch.where(ok, accepted, torch.zeros_like(accepted))
    token = torch.where(ok, token, torch.full_like(token, -1))
    return accepted, token, status


registry.register_backend("torch", registry.anywhere, verify=verify_torch)


@torch.library.custom_op("costeer::speculative_verify", mutates_args=())
def speculative_verify_op(
    llm_logits: torch.Tensor,
    slm_ctx_logits: torch.Tensor,
    slm_noctx_logits: Optional[torch.Tensor],
    hparams: torch.Tensor,
    drafts: torch.Tensor,
    draft_logits: Optional[torch.Tensor],
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    row_keyed: bool,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(accepted int64 [B], token int64 [B], status int32 [B]). Inputs already checked: rows
    [B (k+1), V], drafts int64 [B, k], draft_logits [B k, V] or None."""
    params = SampleParams(temperature, top_k, top_p, min_p, seed, offset, row_keyed)
    name = registry.resolve("verify", backend, llm_logits.device)
    acc, tok, status = registry.kernel(name, "verify")(llm_logits, slm_ctx_logits, slm_noctx_logits, hparams, drafts,
                                                        draft_logits, params)
    return acc.contiguous(), tok.contiguous(), status.contiguous()


@speculative_verify_op.register_fake
def _verify_fake(llm_logits, slm_ctx_logits, slm_noctx_logits, hparams, drafts, draft_logits, temperature, top_k,
                 top_p, min_p, seed, offset, row_keyed, backend="auto"):
    B = drafts.shape[0]
    return (drafts.new_empty((B,), dtype=torch.int64), drafts.new_empty((B,), dtype=torch.int64),
            drafts.new_empty((B,), dtype=torch.int32))


def _rows3(name: str, t, B: int, W: int, V: Optional[int]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3 or t.shape[0] != B or t.shape[1] != W or (V is not None and t.shape[2] != V):
        want = f"[B={B}, {W}, {'V' if V is None else V}]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    return t.reshape(B * W, t.shape[2])


def speculative_verify(
    llm_logits: torch.Tensor,
    slm_ctx_logits: torch.Tensor,
    slm_noctx_logits: Optional[torch.Tensor],
    drafts: torch.Tensor,
    cfg: Optional[SteerConfig] = None,
    *,
    draft_logits: Optional[torch.Tensor] = None,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    seed=0,
    offset=0,
    backend: Optional[str] = None,
    validate: bool = True,
):
    """Steer the k+1 scored rows of each request and accept or reject its k drafts, in one op.

    The rule, its exactness and the RNG are described in this module's docstring.
    ``torch.ops.costeer.speculative_verify`` underneath: traceable by torch.compile.

    Parameters
    ----------
    llm_logits, slm_ctx_logits, slm_noctx_logits : torch.Tensor
        [B, k+1, V] (or [k+1, V] for one request): the rows of the k draft positions and the bonus
        position, as in :func:`costeer_kernels.steer` (``slm_noctx_logits=None``:
        ``slm_ctx_logits`` holds the delta z_c - z_n).
    drafts : torch.Tensor
        int64 [B, k] (or [k]): the drafted token ids, k >= 0.
    cfg : SteerConfig, optional
        The update's settings: scalars, or per-row tensors of B (k+1) values (row b (k+1) + i is
        position i of request b; e.g. confidence gating switches positions off with T = 0).
    draft_logits : torch.Tensor, optional
        [B, k, V] (or [k, V]): the proposal's logits the drafts were drawn from (needed when
        sampling; the drafts' distribution q is computed from them with the same filters).
    temperature, top_k, top_p, min_p : float, int or torch.Tensor
        As in :func:`costeer_kernels.steer_sample`: scalars or per-request tensors [B];
        ``temperature`` 0 = greedy.
    seed, offset : int or torch.Tensor
        The RNG's key and stream position: ints, or int64 per-request tensors [B] (then each
        request has its own stream).
    backend : str, optional
        The ``verify`` backend (``"torch"``, or ``None`` for the device's default).
    validate : bool
        Raise ValueError for invalid rows (as ``steer``) and invalid sampling parameters; with
        ``False`` an invalid request gets 0 accepted drafts and token -1.

    Returns
    -------
    tuple
        ``(accepted int64 [B], token int64 [B])``: the number j of accepted drafts, and the token
        emitted after them (the correction, or the bonus token when j = k); 0-d for one request.

    Examples
    --------
    >>> import torch
    >>> from costeer_kernels import SteerConfig, steer_sample
    >>> from costeer_kernels.verify import speculative_verify
    >>> llm, ctx, noctx = torch.randn(3, 2, 4, 50).unbind(0)      # B=2 requests, k=3 drafts
    >>> cfg = SteerConfig(T=5)
    >>> best = steer_sample(llm.flatten(0, 1), ctx.flatten(0, 1), noctx.flatten(0, 1), cfg)[0].view(2, 4)
    >>> drafts = best[:, :3].clone()
    >>> drafts[1, 1] = (best[1, 1] + 1) % 50                      # request 1's second draft is wrong
    >>> j, tok = speculative_verify(llm, ctx, noctx, drafts, cfg)
    >>> j.tolist(), torch.equal(tok, torch.stack([best[0, 3], best[1, 1]]))
    ([3, 1], True)
    >>> q = torch.randn(2, 3, 50)                                  # sampling: drafts drawn from q
    >>> d = steer_sample(q.flatten(0, 1), q.flatten(0, 1), None, SteerConfig(T=0), temperature=1.0,
    ...                  seed=1)[0].view(2, 3)
    >>> a = speculative_verify(llm, ctx, noctx, d, cfg, draft_logits=q, temperature=1.0, seed=7, offset=3)
    >>> b = speculative_verify(llm, ctx, noctx, d, cfg, draft_logits=q, temperature=1.0, seed=7, offset=3)
    >>> all(torch.equal(x, y) for x, y in zip(a, b))                # reproducible from (seed, offset)
    True
    """
    cfg = checks.check_cfg(cfg)
    if not isinstance(drafts, torch.Tensor):
        raise TypeError(f"drafts must be an int64 torch.Tensor, got {type(drafts).__name__}")
    if drafts.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"drafts must be an integer tensor (int64), got {drafts.dtype}")
    if not isinstance(llm_logits, torch.Tensor):
        raise TypeError(f"llm_logits must be a torch.Tensor, got {type(llm_logits).__name__}")
    single = llm_logits.dim() == 2
    if single:
        if drafts.dim() != 1:
            raise ValueError(f"drafts must be [k] for [k+1, V] logits, got shape {tuple(drafts.shape)}")
        llm_logits, slm_ctx_logits, drafts = llm_logits[None], _unsq(slm_ctx_logits), drafts[None]
        slm_noctx_logits = None if slm_noctx_logits is None else _unsq(slm_noctx_logits)
        draft_logits = None if draft_logits is None else _unsq(draft_logits)
    if drafts.dim() != 2:
        raise ValueError(f"drafts must be [B, k], got shape {tuple(drafts.shape)}")
    B, k = drafts.shape
    W = k + 1
    zl = _rows3("llm_logits", llm_logits, B, W, None)
    V = zl.shape[1]
    zc = _rows3("slm_ctx_logits", slm_ctx_logits, B, W, V)
    zn = None if slm_noctx_logits is None else _rows3("slm_noctx_logits", slm_noctx_logits, B, W, V)
    zl, zc, zn, _ = checks.logit_rows(zl, zc, zn, same_width=True)
    dev = zl.device
    ql = None
    if draft_logits is not None:
        ql = _rows3("draft_logits", draft_logits, B, k, V)
        if ql.device != dev:
            raise ValueError(f"draft_logits is on {ql.device} but llm_logits is on {dev}")
    drafts = drafts.to(device=dev, dtype=torch.int64)
    if checks.host_checks(validate) and drafts.numel() and bool(((drafts < 0) | (drafts >= V)).any()):
        raise ValueError(f"drafts must hold token ids in [0, {V})")
    drafts = drafts.clamp(0, V - 1)
    params = make_params(B, dev, temperature, top_k, top_p, min_p, seed, offset, validate)
    if k and ql is None and checks.host_checks(validate) and bool((params.temperature > 0).any()):
        raise ValueError("draft_logits [B, k, V] are needed when sampling (temperature > 0) with k >= 1 drafts")
    hp = checks.packed_hparams(cfg, B * W, dev)
    if B == 0:
        acc, tok, status = _verify_fake(zl, zc, zn, hp, drafts, ql, *params[:6], params.row_keyed)
    else:
        acc, tok, status = torch.ops.costeer.speculative_verify(
            zl, zc, zn, hp, drafts, ql, params.temperature, params.top_k, params.top_p, params.min_p, params.seed,
            params.offset, params.row_keyed, registry.resolve("verify", backend, dev))
    check_status(status, validate, lambda m: m.replace("row ", "request ", 1))
    return (acc[0], tok[0]) if single else (acc, tok)


def _unsq(t):
    return t[None] if isinstance(t, torch.Tensor) else t
