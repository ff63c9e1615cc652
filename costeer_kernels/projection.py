"""``steer_from_hidden``: CoSteer from the small model's hidden states, the vocabulary projection
fused with the steering.

The small model's logit rows are z_c = W h_c + b and z_n = W h_n + b; only their difference
enters the steered distribution (``docs/closed_form.md``), so

    steer_from_hidden(z_L, h_c, h_n, W) == steer(z_L, W h_c, W h_n) == log_softmax(z_L + c_T W (h_c - h_n))

and W, the largest read of the step, is read once for both passes; the bias cancels.

- backend "triton" (the default on CUDA): one launch computes the delta tile by tile, steers and
  normalizes (``triton/projection.py``).
- "cpu" (the C++ extension, the default on CPU), closed form, B = 1: one sweep computes the delta
  W (h_c - h_n) chunk by chunk in L1 (dot products, fp32 accumulation) and steers it at once; the
  small model's logits never exist in memory (``csrc/steer_cpu.cpp``, ``steer_hidden``).
- otherwise: dh = h_c - h_n, one product dh @ W.T (the delta, in W's dtype with fp32
  accumulation; a GEMM reads W once for all rows), then the steer op on the delta
  (``slm_noctx_logits=None``). ``mode="iterative"`` always takes this path.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch
from . import ops
from .config import SteerConfig
from .status import raise_for_status

FLOAT_DTYPES = ops.FLOAT_DTYPES

# The steer op names the small-model rows; here they are one computed delta.
_RENAMED = (
    ("slm_ctx_logits contains NaN",
     "the small-model delta W (h_c - h_n) contains NaN (NaN or inf in slm_hidden_ctx, slm_hidden_noctx or lm_head_weight)"),
    ("slm_ctx_logits contains +inf (only -inf is allowed)",
     "the small-model delta W (h_c - h_n) is +inf (inf in the hidden states or lm_head_weight, or overflow)"),
    ("banned by slm_ctx_logits", "banned by a -inf small-model delta"),
)


def _rename(msg: str) -> str:
    for old, new in _RENAMED:
        msg = msg.replace(old, new)
    return msg


def _raise(status: torch.Tensor) -> None:
    try:
        raise_for_status(status)
    except ValueError as exc:
        raise ValueError(_rename(str(exc))) from None


def _hidden(name: str, t, rank: int, W: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != rank:
        raise ValueError(
            f"{name} must be {'[B, H]' if rank == 2 else '[H]'} like llm_logits ({rank}-D), got shape {tuple(t.shape)}"
        )
    t2 = t.unsqueeze(0) if rank == 1 else t
    if t2.shape[1] != W.shape[1]:
        raise ValueError(f"{name} has hidden size H={t2.shape[1]} but lm_head_weight is [V, H] with H={W.shape[1]}")
    if t.dtype != W.dtype:
        raise TypeError(f"{name} is {t.dtype} but lm_head_weight is {W.dtype}; the hidden states must have W's dtype")
    if t.device != W.device:
        raise ValueError(f"{name} is on {t.device} but lm_head_weight is on {W.device}; put all inputs on one device")
    if t2.shape[1] > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


@torch.no_grad()  # the steered distribution is not differentiable; W may be a Parameter
def delta_from_hidden(hc: torch.Tensor, hn: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """W (h_c - h_n) as one product, [B, V_w] (fp32 accumulation in the GEMM).

    CUDA, fp16/bf16 W: the fp32 difference is split into hi + lo of W's dtype and both go through
    one GEMM with fp32 output (W read once), so the delta carries only W's own rounding, as in
    the fused kernel; elsewhere the difference is rounded to W's dtype and so is the product.
    """
    if W.is_cuda and W.dtype in (torch.float16, torch.bfloat16):
        d32 = hc.float() - hn.float()
        hi = d32.to(W.dtype)
        lo = (d32 - hi.float()).to(W.dtype)
        try:
            prod = torch.mm(torch.cat([hi, lo]), W.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):  # torch without mm(out_dtype=) on CUDA
            prod = None
        if prod is not None:
            B = hc.shape[0]
            return prod[:B] + prod[B:]
    if W.dtype == torch.float32:
        dh = hc - hn if hc.dtype == torch.float32 else hc.float() - hn.float()
    else:
        dh = (hc.float() - hn.float()).to(W.dtype)
    if dh.shape[0] == 1:
        return torch.mv(W, dh[0]).unsqueeze(0)  # the GEMV kernel: one streaming read of W
    return torch.matmul(dh, W.t())


def steer_from_hidden(
    llm_logits: torch.Tensor,
    slm_hidden_ctx: torch.Tensor,
    slm_hidden_noctx: torch.Tensor,
    lm_head_weight: torch.Tensor,
    cfg: Optional[SteerConfig] = None,
    *,
    vocab_map=None,
    unmapped: str = "keep",
    vocab_size: Optional[int] = None,
    mode: str = "closed_form",
    backend: Optional[str] = None,
    out: Optional[torch.Tensor] = None,
    validate: bool = True,
    sample=None,
):
    """CoSteer from the small model's final hidden states: ``steer(llm, W h_c, W h_n)`` without
    materializing either small-model logit row, reading W once.

    Args:
        llm_logits: cloud LLM logits z_L, [B, V] or [V]; float32, float16 or bfloat16.
        slm_hidden_ctx: the small model's last hidden state with the private context, [B, H]
            (or [H] with 1-D ``llm_logits``), in ``lm_head_weight``'s dtype.
        slm_hidden_noctx: the same without the context, same shape.
        lm_head_weight: the small model's vocabulary projection W, [V_slm, H] (as stored by
            ``nn.Linear``); fp32, fp16 or bf16. Its bias, if any, cancels and is not needed.
        cfg, mode, out, validate: as in :func:`costeer_kernels.steer`.
        vocab_map, unmapped: different vocabularies, as in :func:`costeer_kernels.steer`; the map
            indexes W's rows.
        vocab_size: padded widths, as in :func:`costeer_kernels.steer` (W's rows past it unused).
        backend: ``"triton"`` (fused, one launch; the default on CUDA) or any steer backend
            (one matmul for the delta, then that backend's steer op; the default on CPU).
        sample: ``None`` (return the log-probs), or pick the next token instead, as
            :func:`costeer_kernels.steer_sample` does, without writing the [B, V] log-probs:
            ``True`` (greedy) or a dict of ``steer_sample``'s options (``temperature``, ``top_k``,
            ``top_p``, ``min_p``, ``seed``, ``offset``, ``num_samples``, ``return_llm_max_prob``).
            CPU, B = 1, closed form: one C++ sweep computes the delta, steers and samples; otherwise
            one matmul for the delta, then ``steer_sample`` on it (vocabulary maps gathered first).

    Returns:
        float32 log-probs of ``llm_logits``' shape (``out`` when given); with ``sample``, what
        ``steer_sample`` returns (token ids, their steered log-probs[, the LLM's max prob]).
    """
    if unmapped not in ops.UNMAPPED:
        raise ValueError(f"unmapped must be one of {ops.UNMAPPED}, got {unmapped!r}")
    cfg = ops.check_mode_cfg(mode, cfg)
    zl = ops._as_rows("llm_logits", llm_logits, None)
    rank = llm_logits.dim()
    W = lm_head_weight
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"lm_head_weight must be a torch.Tensor, got {type(W).__name__}")
    if W.dtype not in FLOAT_DTYPES:
        raise TypeError(f"lm_head_weight must be float32, float16 or bfloat16, got {W.dtype}")
    if W.dim() != 2:
        raise ValueError(f"lm_head_weight must be [V, H], got shape {tuple(W.shape)}")
    if W.device != zl.device:
        raise ValueError(f"lm_head_weight is on {W.device} but llm_logits is on {zl.device}; put all inputs on one device")
    if W.shape[0] == 0 or W.shape[1] == 0:
        raise ValueError(f"lm_head_weight has an empty dimension, shape {tuple(W.shape)}")
    hc = _hidden("slm_hidden_ctx", slm_hidden_ctx, rank, W)
    hn = _hidden("slm_hidden_noctx", slm_hidden_noctx, rank, W)
    B, V = zl.shape
    for name, t in (("slm_hidden_ctx", hc), ("slm_hidden_noctx", hn)):
        if t.shape[0] != B:
            raise ValueError(f"{name} has {t.shape[0]} rows but llm_logits has {B}; they must match")
    if V == 0:
        raise ValueError("llm_logits has an empty vocabulary dimension (V = 0)")
    V_w = W.shape[0]
    if vocab_map is not None:
        n = ops.check_vocab_size(vocab_size, {"llm_logits": V})
    else:
        n = ops.check_vocab_size(vocab_size, {"llm_logits": V, "lm_head_weight rows": V_w})
        if n is None and V_w != V:
            raise ValueError(
                f"lm_head_weight has {V_w} rows but llm_logits has width {V}; they must match "
                "(pass vocab_size for padded rows, or vocab_map for different vocabularies)"
            )
    N = V if n is None else n
    idx = None
    if vocab_map is not None:
        idx = ops.map_index(vocab_map, N, V_w, zl.device, validate, exact=n is None)

    name, fused = _resolve(backend, zl.device, idx is not None, mode, B)
    if sample is not None and sample is not False:
        return _sample_from_hidden(llm_logits, zl, hc, hn, W, cfg, sample, name, mode, out, validate,
                                   idx, n, unmapped, rank)
    if not fused and idx is None and n is None:
        # The common case, without re-checking what is checked above: one GEMV/GEMM, one steer op.
        if name == "cpu" and mode == "closed_form" and B <= FUSED_CPU_MAX_ROWS and not torch.compiler.is_compiling():
            res = _cpu_fused(zl, hc, hn, W, cfg, out, llm_logits, validate)
            return res.squeeze(0) if (rank == 1 and out is None) else res
        delta = delta_from_hidden(hc, hn, W)
        hp = cfg.packed(B if cfg.per_row else None, zl.device)
        out2 = ops.prepare_out(out, llm_logits, zl)
        status = None
        if name == "cpu" and not torch.compiler.is_compiling():
            # The steer is < 1/H of the GEMV's work: one task per row (num_splits=1), so B = 1
            # runs inline, without a second thread-pool barrier after the GEMV's.
            if out2 is None:
                out2 = torch.empty(B, V, dtype=torch.float32, device=zl.device)
            status = _cpu_steer_rows(zl, delta, hp, out2, mode)
            res = out2
        if status is None:
            if out2 is None:
                res, status = torch.ops.costeer.steer(zl, delta, None, hp, mode, name)
            else:
                status = torch.ops.costeer.steer_out(zl, delta, None, hp, out2, mode, name)
                res = out2
        if validate:
            _raise(status)
        if out is not None:
            return out
        return res.squeeze(0) if rank == 1 else res
    if not fused:
        delta = delta_from_hidden(hc, hn, W)
        if vocab_map is None:
            delta = delta[:, :N] if n is not None else delta
        zl_in = llm_logits
        d_in = delta.squeeze(0) if rank == 1 else delta
        try:
            return ops.steer(
                zl_in, d_in, None, cfg, mode=mode, backend=name, out=out, validate=validate,
                vocab_map=idx, unmapped=unmapped, vocab_size=n if (n is not None and N < V) else None,
            )
        except ValueError as exc:
            raise ValueError(_rename(str(exc))) from None

    from .triton.projection import steer_projection_triton

    hp = cfg.packed(B if cfg.per_row else None, zl.device)
    out2 = ops.prepare_out(out, llm_logits, zl)
    if out2 is None:
        out2 = torch.empty(B, V, dtype=torch.float32, device=zl.device)
    Wk = W if W.stride(1) == 1 else W.contiguous()
    status = steer_projection_triton(zl[:, :N], hc, hn, Wk, hp, out2[:, :N], slm_index=idx,
                                     drop_unmapped=unmapped == "drop")
    ops.fill_tail(out2, N, status)
    if validate:
        _raise(status)
    if out is not None:
        return out
    return out2.squeeze(0) if rank == 1 else out2


_SAMPLE_KEYS = ("temperature", "top_k", "top_p", "min_p", "seed", "offset", "num_samples", "return_llm_max_prob")


def _sample_from_hidden(llm_logits, zl, hc, hn, W, cfg, sample, name, mode, out, validate, idx, n, unmapped, rank):
    from . import sampling

    if sample is True:
        sample = {}
    if not isinstance(sample, dict):
        raise TypeError(f"sample must be None, True or a dict of steer_sample options, got {type(sample).__name__}")
    unknown = sorted(set(sample) - set(_SAMPLE_KEYS))
    if unknown:
        raise ValueError(f"sample has unknown options {unknown}; expected some of {list(_SAMPLE_KEYS)}")
    if mode != "closed_form":
        raise ValueError("sample= needs mode='closed_form' (the iterative mode is a reference path)")
    if out is not None:
        raise ValueError("out= and sample= exclude each other: sampling writes no [B, V] log-probs")
    opts = dict(sample)
    want = bool(opts.pop("return_llm_max_prob", False))
    num_samples = opts.pop("num_samples", None)
    B, V = zl.shape
    # backend "cpu" is registered only once the C++ extension (which has sample_hidden) is loaded.
    if name == "cpu" and B <= FUSED_CPU_MAX_ROWS and idx is None and n is None and not torch.compiler.is_compiling():
        fused = torch.ops.costeer_ext.sample_hidden
        k = sampling.check_num_samples(num_samples)
        params = sampling.make_params(B, zl.device, opts.get("temperature", 0.0), opts.get("top_k", 0),
                                      opts.get("top_p", 1.0), opts.get("min_p", 0.0), opts.get("seed", 0),
                                      opts.get("offset", 0), validate)
        hp = cfg.packed(B if cfg.per_row else None, zl.device)
        dh = hc.float() - hn.float()
        Wk = W if W.stride(1) == 1 else W.contiguous()
        tok, lp, maxp, status = fused(zl, dh, Wk, hp, params.temperature, params.top_k, params.top_p, params.min_p,
                                      params.seed, params.offset, bool(params.row_keyed), want, k)
        return sampling.finish(tok, lp, maxp if want else None, status, validate, num_samples, rank == 1, want, _raise)
    # Unfused: the delta by one matmul, gathered through the map, then the sampling op.
    delta = delta_from_hidden(hc, hn, W)
    zl_s = zl
    if idx is not None:
        d = delta[:, idx.clamp(min=0).long()]
        unmapped_ids = (idx < 0)[None, :]
        d = torch.where(unmapped_ids, torch.zeros((), dtype=d.dtype, device=d.device), d)
        if unmapped == "drop":
            zl_s = zl[:, : idx.shape[0]].masked_fill(unmapped_ids, float("-inf"))
        else:
            zl_s = zl[:, : idx.shape[0]]
    elif n is not None:
        zl_s, d = zl[:, :n], delta[:, :n]
    else:
        d = delta
    # The map is applied above: any sampler takes the gathered rows, so a steer backend without
    # vocab_map support (which ``name`` skipped) must not push the sampling to torch.
    backend = name if (idx is None and name in sampling.available_samplers()) else None
    try:
        res = sampling.steer_sample(zl_s, d, None, cfg, backend=backend, validate=validate, num_samples=num_samples,
                                    return_llm_max_prob=want, **opts)
    except ValueError as exc:
        raise ValueError(_rename(str(exc))) from None
    if rank == 1:
        res = tuple(r[0] if r is not None else None for r in res)
    return res


# Rows up to which the CPU takes the fused kernel: each row streams W once, so from 2 rows on a
# GEMM (which reads W once for all rows) followed by the steer is faster.
FUSED_CPU_MAX_ROWS = 1


def _cpu_fused(zl, hc, hn, W, cfg, out, llm_logits, validate):
    """The C++ kernel computing W (h_c - h_n) chunk by chunk inside the steer sweep (the small
    model's logits never exist). Backend "cpu" implies the extension is loaded."""
    from ._extension import steer_hidden_cpp

    B, V = zl.shape
    hp = cfg.packed(B if cfg.per_row else None, zl.device)
    out2 = ops.prepare_out(out, llm_logits, zl)
    if out2 is None:
        out2 = torch.empty(B, V, dtype=torch.float32, device=zl.device)
    Wk = W if W.stride(1) == 1 else W.contiguous()
    status = steer_hidden_cpp(zl, hc.float() - hn.float(), Wk, hp, out2)
    if validate:
        _raise(status)
    return out if out is not None else out2


def _cpu_steer_rows(zl, delta, hp, out2, mode):
    """The C++ CPU steer kernel with one task per row; None if that entry point is missing."""
    try:
        from ._extension import steer_cpp
    except ImportError:
        return None
    try:
        return steer_cpp(zl, delta, None, hp, out2, mode, num_splits=1)
    except TypeError:  # a different signature: use the registered op instead
        return None


def _resolve(backend, device: torch.device, mapped: bool, mode: str, B: int = 1):
    """(steer backend, fused?): the fused Triton kernel when asked for (backend="triton", closed
    form), and by default on CUDA for one row; otherwise one GEMM (W read once for all rows) and
    the steer op. H200, V=151936, H=1536, bf16, B=16, CUDA-graph time: fused 1256 us, GEMM +
    steer 148 us (bench/GPU_REPORT.md), so batches take the GEMM."""
    if backend is None or backend == "auto":
        if device.type == "cuda" and "triton" in dispatch.available_backends() and mode == "closed_form" and B == 1:
            return "triton", True
        return dispatch.resolve_backend(None, device, vocab_map=mapped), False
    name = dispatch.resolve_backend(backend, device, vocab_map=mapped)
    return name, name == "triton" and mode == "closed_form"
