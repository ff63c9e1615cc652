"""``steer_from_hidden``: CoSteer from the small model's hidden states, the vocabulary projection
fused with the steering.

The small model's logit rows are z_c = W h_c + b and z_n = W h_n + b; only their difference
enters the steered distribution (``docs/closed_form.md``), so

    steer_from_hidden(z_L, h_c, h_n, W) == steer(z_L, W h_c, W h_n) == log_softmax(z_L + c_T W (h_c - h_n))

and W, the largest read of the step, is read once for both passes; the bias cancels.

- backend "triton" (the default on CUDA): one launch computes the delta tile by tile, steers and
  normalizes (``triton/projection.py``).
- "cpu" (the C++ extension, the default on CPU), closed form, any B: one sweep computes the delta W (h_c - h_n) chunk by chunk in L1 (fp32 accumulation) and steers
  it at once; the small model's logits never exist in memory (``csrc/steer_cpu.cpp``,
  ``steer_hidden``).
- otherwise: the delta by one product (``delta_from_hidden``: fp32 accumulation of fp32 products
  on every path and dtype; a GEMM reads W once for all rows), then the steer op on the delta
  (``slm_noctx_logits=None``). ``mode="iterative"`` always takes this path.

Registered as the torch ops ``costeer::steer_from_hidden`` (+ ``_out``) and
``costeer::sample_from_hidden``, with fake implementations for torch.compile.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import checks, registry
from . import torch_backend  # noqa: F401 - registers backend "torch"
from .config import SteerConfig
from .ops import fill_tail
from .q8_0 import dequantize_q8_0, is_q8_0, q8_0_shape
from .sampling import SampleParams, _outputs, make_params, sample_fake
from .status import check_status

# The steer op names the small-model rows; here they are one computed delta.
_RENAMED = (
    ("slm_ctx_logits contains NaN",
     "the small-model delta W (h_c - h_n) contains NaN (NaN or inf in slm_hidden_ctx, slm_hidden_noctx or lm_head_weight)"),
    ("slm_ctx_logits contains +inf (only -inf is allowed)",
     "the small-model delta W (h_c - h_n) is +inf (inf in the hidden states or lm_head_weight, or overflow)"),
    ("banned by slm_ctx_logits", "banned by a -inf small-model delta"),
)

# Rows of W converted to float32 at a time by the CPU fallback for fp16/bf16 weights.
_CPU_CHUNK_ROWS = 8192


def _rename(msg: str) -> str:
    for old, new in _RENAMED:
        msg = msg.replace(old, new)
    return msg


@torch.no_grad()  # the steered distribution is not differentiable; W may be a Parameter
def delta_from_hidden(hc: torch.Tensor, hn: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """W (h_c - h_n) as float32 [B, V_w]: fp32 products with fp32 accumulation, W read once.

    The difference is formed in fp32 (never rounded to W's dtype). CUDA, fp16/bf16 W: it is
    split into hi + lo of W's dtype and both go through one GEMM with fp32 output, so the delta
    carries only W's own rounding. CPU, fp16/bf16 W: W is widened to fp32 a block of rows at a
    time (torch has no mixed-dtype CPU GEMM), so memory stays bounded.
    """
    d32 = hc.float() - hn.float()
    q8 = is_q8_0(W)
    if W.device.type == "cpu" and registry.resolve("linear", None, W.device) == "cpu":
        # The C++ few-row kernel: W read once for all rows at any dtype, widened in registers and
        # accumulated in float32 (MKL's GEMV reads the head at a third of the bandwidth here).
        return registry.kernel("cpu", "linear")(d32, W, None)
    if q8:  # Q8_0 blocks without the C++ kernel: de-quantized (exactly) a block of rows at a time
        out = torch.empty(d32.shape[0], W.shape[0], dtype=torch.float32, device=W.device)
        for r in range(0, W.shape[0], _CPU_CHUNK_ROWS):
            torch.matmul(d32, dequantize_q8_0(W[r:r + _CPU_CHUNK_ROWS]).t(), out=out[:, r:r + _CPU_CHUNK_ROWS])
        return out
    if W.dtype == torch.float32:
        return torch.mv(W, d32[0]).unsqueeze(0) if d32.shape[0] == 1 else torch.matmul(d32, W.t())
    if W.is_cuda:
        hi = d32.to(W.dtype)
        lo = (d32 - hi.float()).to(W.dtype)
        try:
            prod = torch.mm(torch.cat([hi, lo]), W.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            # torch builds without mm(out_dtype=) on CUDA: the CPU-style blockwise fp32 path below.
            prod = None
        if prod is not None:
            B = hc.shape[0]
            return prod[:B] + prod[B:]
    V = W.shape[0]
    out = torch.empty(d32.shape[0], V, dtype=torch.float32, device=W.device)
    for r in range(0, V, _CPU_CHUNK_ROWS):
        torch.matmul(d32, W[r:r + _CPU_CHUNK_ROWS].float().t(), out=out[:, r:r + _CPU_CHUNK_ROWS])
    return out


def _fused(name: str, mode: str, B: int, mapped: bool, explicit: bool) -> bool:
    """Whether backend ``name`` runs the projection fused into the steer pass. Triton: by default
    for one row only; H200, V=151936, H=1536, bf16, B=16, CUDA-graph time: fused 1256 us,
    GEMM + steer 148 us (bench/GPU_REPORT.md). The C++ kernel: every B (it reads each block of W
    once for all rows; AMD EPYC avx2 path, fp32: 0.13-0.43 of a torch.matmul's time from B=1 to
    16, bench/RESULTS.md), without a vocabulary map."""
    if mode != "closed_form" or not registry.has_kernel(name, "steer_hidden"):
        return False
    if name == "triton":
        return explicit or B == 1
    return not mapped


def _project_steer(zl, hc, hn, W, hp, slm_index, drop, out, mode, fused, backend) -> torch.Tensor:
    if fused:
        return registry.kernel(backend, "steer_hidden")(zl, hc, hn, W, hp, out, slm_index, drop)
    delta = delta_from_hidden(hc, hn, W)
    if slm_index is None:
        return registry.kernel(backend, "steer")(zl, delta[:, :zl.shape[1]], None, hp, out, mode)
    return registry.kernel(backend, "steer_mapped")(zl, delta, None, hp, slm_index, drop, out, mode)


@torch.library.custom_op("costeer::steer_from_hidden", mutates_args=())
def steer_from_hidden_op(
    llm_logits: torch.Tensor, hidden_ctx: torch.Tensor, hidden_noctx: torch.Tensor, lm_head_weight: torch.Tensor,
    hparams: torch.Tensor, slm_index: Optional[torch.Tensor], drop_unmapped: bool, update: str, fused: bool,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Steered float32 log-probs [B, V] and int32 status [B] from hidden states [B, H] and W
    [V_w, H]; inputs already checked; ``backend`` resolved."""
    out = torch.empty(llm_logits.shape, dtype=torch.float32, device=llm_logits.device)
    status = _project_steer(llm_logits, hidden_ctx, hidden_noctx, lm_head_weight, hparams, slm_index, drop_unmapped,
                            out, update, fused, backend)
    return out, status


@steer_from_hidden_op.register_fake
def _steer_from_hidden_fake(llm_logits, hidden_ctx, hidden_noctx, lm_head_weight, hparams, slm_index,
                            drop_unmapped, update, fused, backend):
    B, V = llm_logits.shape
    return llm_logits.new_empty((B, V), dtype=torch.float32), llm_logits.new_empty((B,), dtype=torch.int32)


@torch.library.custom_op("costeer::steer_from_hidden_out", mutates_args=("out",))
def steer_from_hidden_out_op(
    llm_logits: torch.Tensor, hidden_ctx: torch.Tensor, hidden_noctx: torch.Tensor, lm_head_weight: torch.Tensor,
    hparams: torch.Tensor, slm_index: Optional[torch.Tensor], out: torch.Tensor, drop_unmapped: bool, update: str,
    fused: bool, backend: str,
) -> torch.Tensor:
    """``steer_from_hidden`` writing into ``out`` (float32 [B, V]); returns int32 status [B]."""
    return _project_steer(llm_logits, hidden_ctx, hidden_noctx, lm_head_weight, hparams, slm_index, drop_unmapped,
                          out, update, fused, backend)


@steer_from_hidden_out_op.register_fake
def _steer_from_hidden_out_fake(llm_logits, hidden_ctx, hidden_noctx, lm_head_weight, hparams, slm_index, out,
                                drop_unmapped, update, fused, backend):
    return llm_logits.new_empty((llm_logits.shape[0],), dtype=torch.int32)


_SHIFTED = [(None, -1, None)]  # (slm_index, its version, slm_index + 1 as int32): one map per loop, reused each step


def _gather_mapped(d: torch.Tensor, slm_index: torch.Tensor) -> torch.Tensor:
    """d [B, V_slm] gathered to the LLM's vocabulary: column v reads d[:, slm_index[v]], an entry of -1
    (no counterpart) reads a zero column put in front of d. The shifted int32 index is made once per
    map (its version counter catches in-place edits) and a single row is gathered 1-D: for Gemma 3's
    262144 entries on a 2-core Xeon 384 -> 150 us a step (four torch ops of where(has, d[idx], 0)
    took 1.4 ms)."""
    last = _SHIFTED[0]
    if last[0] is slm_index and last[1] == slm_index._version and last[2].device == d.device:
        shifted = last[2]
    else:
        shifted = (slm_index + 1).to(torch.int32)
        _SHIFTED[0] = (slm_index, slm_index._version, shifted)
    padded = torch.cat([d.new_zeros((d.shape[0], 1)), d], 1)
    if d.shape[0] == 1:
        return padded[0].index_select(0, shifted)[None]
    return padded.index_select(1, shifted)


@torch.library.custom_op("costeer::sample_from_hidden", mutates_args=())
def sample_from_hidden_op(
    llm_logits: torch.Tensor, hidden_ctx: torch.Tensor, hidden_noctx: torch.Tensor, lm_head_weight: torch.Tensor,
    hparams: torch.Tensor, slm_index: Optional[torch.Tensor], drop_unmapped: bool,
    temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor,
    offset: torch.Tensor, row_keyed: bool, want_max_prob: bool, num_samples: int, fused: bool, backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``steer_sample``'s outputs from hidden states; inputs already checked."""
    params = SampleParams(temperature, top_k, top_p, min_p, seed, offset, row_keyed)
    zl = llm_logits
    if fused:
        fn = registry.kernel(backend, "sample_hidden")
        return _outputs(fn(zl, hidden_ctx, hidden_noctx, lm_head_weight, hparams, params, want_max_prob, num_samples),
                        zl)
    d = delta_from_hidden(hidden_ctx, hidden_noctx, lm_head_weight)
    if slm_index is not None:
        d = _gather_mapped(d, slm_index)
        if drop_unmapped:
            zl = zl.masked_fill((slm_index < 0)[None, :], float("-inf"))
    else:
        d = d[:, :zl.shape[1]]
    # The map is applied above: any sampler takes the gathered rows, so a steer backend without
    # vocab_map support (which ``backend`` skipped) must not push the sampling to torch.
    keep = slm_index is None and registry.has_kernel(backend, "sample")
    name = backend if keep else registry.resolve("sample", None, zl.device)
    fn = registry.kernel(name, "sample")
    return _outputs(fn(zl, d, None, hparams, params, want_max_prob, num_samples), zl)


@sample_from_hidden_op.register_fake
def _sample_from_hidden_fake(llm_logits, hidden_ctx, hidden_noctx, lm_head_weight, hparams, slm_index,
                             drop_unmapped, temperature, top_k, top_p, min_p, seed, offset, row_keyed,
                             want_max_prob, num_samples, fused, backend):
    return sample_fake(llm_logits, want_max_prob, num_samples)


def _hidden(name: str, t, rank: int, W: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != rank:
        raise ValueError(
            f"{name} must be {'[B, H]' if rank == 2 else '[H]'} like llm_logits ({rank}-D), got shape {tuple(t.shape)}"
        )
    t2 = t.unsqueeze(0) if rank == 1 else t
    H = q8_0_shape(W)[1] if is_q8_0(W) else W.shape[1]
    if t2.shape[1] != H:
        raise ValueError(f"{name} has hidden size H={t2.shape[1]} but lm_head_weight is [V, H] with H={H}")
    if t.dtype != W.dtype and not is_q8_0(W):
        raise TypeError(f"{name} is {t.dtype} but lm_head_weight is {W.dtype}; the hidden states must have W's dtype")
    if t.device != W.device:
        raise ValueError(f"{name} is on {t.device} but lm_head_weight is on {W.device}; put all inputs on one device")
    if t2.shape[1] > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2.detach()


_SAMPLE_KEYS = ("temperature", "top_k", "top_p", "min_p", "seed", "offset", "num_samples", "return_llm_max_prob")


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

    Parameters
    ----------
    llm_logits : torch.Tensor
        Cloud LLM logits z_L, [B, V] or [V]; float32, float16 or bfloat16.
    slm_hidden_ctx : torch.Tensor
        The small model's last hidden state with the private context, [B, H] (or [H] with 1-D
        ``llm_logits``), in ``lm_head_weight``'s dtype.
    slm_hidden_noctx : torch.Tensor
        The same without the context, same shape.
    lm_head_weight : torch.Tensor
        The small model's vocabulary projection W, [V_slm, H] (as stored by ``nn.Linear``); fp32,
        fp16 or bf16. Its bias, if any, cancels and is not needed. Or uint8 [V_slm, H / 32 * 34]:
        GGML Q8_0 blocks (``costeer_kernels.q8_0``; a GGUF model's head as stored, a quarter of
        float32's bytes), with hidden states of any float dtype: the delta is then one
        ``linear_rows`` product (on CPU exactly the de-quantized float32 matrix's) and the steer op.
    cfg, mode, out, validate
        As in :func:`costeer_kernels.steer`.
    vocab_map, unmapped
        Different vocabularies, as in :func:`costeer_kernels.steer`; the map indexes W's rows.
    vocab_size : int, optional
        Padded widths, as in :func:`costeer_kernels.steer` (W's rows past it unused).
    backend : str, optional
        ``"triton"`` (fused, one launch; the default on CUDA for one row), ``"cpu"`` (the C++
        kernel, fused for every B; the default on CPU) or any steer
        backend (one product for the delta, then that backend's steer op).
    sample : bool or dict, optional
        ``None`` (return the log-probs), or pick the next token instead, as
        :func:`costeer_kernels.steer_sample` does, without writing the [B, V] log-probs:
        ``True`` (greedy) or a dict of ``steer_sample``'s options (``temperature``, ``top_k``,
        ``top_p``, ``min_p``, ``seed``, ``offset``, ``num_samples``, ``return_llm_max_prob``).

    Returns
    -------
    torch.Tensor or tuple
        float32 log-probs of ``llm_logits``' shape (``out`` when given); with ``sample``, what
        ``steer_sample`` returns (token ids, their steered log-probs[, the LLM's max prob]).

    Examples
    --------
    >>> import torch
    >>> from costeer_kernels import steer, steer_from_hidden
    >>> W = torch.randn(1000, 64)                      # the small model's lm_head.weight
    >>> h_c, h_n, llm = torch.randn(2, 64), torch.randn(2, 64), torch.randn(2, 1000)
    >>> lp = steer_from_hidden(llm, h_c, h_n, W)
    >>> torch.allclose(lp, steer(llm, h_c @ W.T, h_n @ W.T), atol=1e-4)
    True
    >>> tok, tok_lp = steer_from_hidden(llm, h_c, h_n, W, sample=True)   # greedy token ids
    >>> torch.equal(tok, lp.argmax(-1))
    True
    >>> from costeer_kernels.q8_0 import dequantize_q8_0, quantize_q8_0
    >>> W8 = quantize_q8_0(W)                           # [1000, 68] uint8
    >>> torch.allclose(steer_from_hidden(llm, h_c, h_n, W8), steer_from_hidden(llm, h_c, h_n, dequantize_q8_0(W8)),
    ...                atol=1e-4)
    True
    """
    drop = checks.check_unmapped(unmapped)
    checks.check_mode(mode)
    cfg = checks.check_cfg(cfg)
    zl = checks.as_rows("llm_logits", llm_logits)
    rank = llm_logits.dim()
    W = lm_head_weight
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"lm_head_weight must be a torch.Tensor, got {type(W).__name__}")
    q8 = is_q8_0(W)
    if W.dtype not in checks.FLOAT_DTYPES and not q8:
        raise TypeError(f"lm_head_weight must be float32, float16 or bfloat16 (or uint8: Q8_0 blocks), got {W.dtype}")
    if q8:
        q8_0_shape(W, "lm_head_weight")
    elif W.dim() != 2:
        raise ValueError(f"lm_head_weight must be [V, H], got shape {tuple(W.shape)}")
    if W.device != zl.device:
        raise ValueError(f"lm_head_weight is on {W.device} but llm_logits is on {zl.device}; put all inputs on one device")
    if W.shape[0] == 0 or W.shape[1] == 0:
        raise ValueError(f"lm_head_weight has an empty dimension, shape {tuple(W.shape)}")
    W = W.detach()
    if W.stride(1) != 1:
        W = W.contiguous()
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
        n = checks.check_vocab_size(vocab_size, {"llm_logits": V})
    else:
        n = checks.check_vocab_size(vocab_size, {"llm_logits": V, "lm_head_weight rows": V_w})
        if n is None and V_w != V:
            raise ValueError(
                f"lm_head_weight has {V_w} rows but llm_logits has width {V}; they must match "
                "(pass vocab_size for padded rows, or vocab_map for different vocabularies)"
            )
    N = V if n is None else n
    idx = None
    if vocab_map is not None:
        idx = checks.map_index(vocab_map, N, V_w, zl.device, validate, exact=n is None)
    hp = checks.packed_hparams(cfg, B, zl.device)
    explicit = backend is not None and backend != "auto"
    name = registry.resolve("steer" if idx is None else "steer_mapped", backend, zl.device)
    # The C++ fused kernel reads W's rows 0..V-1 as the vocabulary: only for matching widths.
    # The fused kernels read float rows; Q8_0 blocks go through the few-row product (the delta).
    fused = _fused(name, mode, B, idx is not None, explicit) and (name == "triton" or V_w == N) and not q8
    if sample is not None and sample is not False:
        return _sample(zl[:, :N], hc, hn, W, hp, idx, drop, sample, name, mode, fused, out, validate, rank)
    out2 = checks.check_out(out, llm_logits, zl)
    if out2 is None and N == V:
        res, status = torch.ops.costeer.steer_from_hidden(zl, hc, hn, W, hp, idx, drop, mode, fused, name)
    else:
        if out2 is None:
            out2 = torch.empty(B, V, dtype=torch.float32, device=zl.device)
        status = torch.ops.costeer.steer_from_hidden_out(zl[:, :N], hc, hn, W, hp, idx, out2[:, :N], drop, mode,
                                                         fused, name)
        fill_tail(out2, N, status)
        res = out2
    check_status(status, validate, _rename)
    if out is not None:
        return out
    return res.squeeze(0) if rank == 1 else res


def _sample(zl, hc, hn, W, hp, idx, drop, sample, name, mode, fused, out, validate, rank):
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
    from .sampling import finish

    opts = dict(sample)
    want = checks.check_bool("return_llm_max_prob", opts.pop("return_llm_max_prob", False))
    num_samples = opts.pop("num_samples", None)
    B = zl.shape[0]
    n = checks.check_num_samples(num_samples, B)
    params = make_params(B, zl.device, opts.get("temperature", 0.0), opts.get("top_k", 0), opts.get("top_p", 1.0),
                         opts.get("min_p", 0.0), opts.get("seed", 0), opts.get("offset", 0), validate)
    fused = fused and registry.has_kernel(name, "sample_hidden")
    if B == 0:
        res = sample_fake(zl, want, n)
    else:
        res = torch.ops.costeer.sample_from_hidden(
            zl, hc, hn, W, hp, idx, drop, params.temperature, params.top_k, params.top_p, params.min_p, params.seed,
            params.offset, params.row_keyed, want, n, fused, name)
    return finish(*res, validate, num_samples, rank == 1, want, _rename)
