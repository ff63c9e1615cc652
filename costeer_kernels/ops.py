"""The public op ``steer`` and its registration as ``torch.ops.costeer.steer`` / ``steer_out``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import checks, registry
from . import torch_backend  # noqa: F401 - registers backend "torch"
from .checks import FLOAT_DTYPES, MODES, UNMAPPED  # noqa: F401 - re-exported
from .config import SteerConfig
from .status import check_status


# ---------------------------------------------------------------------------------------------
# torch.library registration: the functional op (for torch.compile) and the out= variant.


@torch.library.custom_op("costeer::steer", mutates_args=())
def steer_op(
    llm_logits: torch.Tensor,
    slm_ctx_logits: torch.Tensor,
    slm_noctx_logits: Optional[torch.Tensor],
    hparams: torch.Tensor,
    update: str = "closed_form",
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Steered float32 log-probs [B, V] and int32 status [B]. Inputs already validated 2-D."""
    B, V = llm_logits.shape
    out = torch.empty(B, V, dtype=torch.float32, device=llm_logits.device)
    name = registry.resolve("steer", backend, llm_logits.device)
    status = registry.kernel(name, "steer")(llm_logits, slm_ctx_logits, slm_noctx_logits, hparams, out, update)
    return out, status


@steer_op.register_fake
def _steer_fake(llm_logits, slm_ctx_logits, slm_noctx_logits, hparams, update="closed_form", backend="auto"):
    B, V = llm_logits.shape
    return (
        llm_logits.new_empty((B, V), dtype=torch.float32),
        llm_logits.new_empty((B,), dtype=torch.int32),
    )


@torch.library.custom_op("costeer::steer_out", mutates_args=("out",))
def steer_out_op(
    llm_logits: torch.Tensor,
    slm_ctx_logits: torch.Tensor,
    slm_noctx_logits: Optional[torch.Tensor],
    hparams: torch.Tensor,
    out: torch.Tensor,
    update: str = "closed_form",
    backend: str = "auto",
) -> torch.Tensor:
    """Writes steered log-probs into ``out`` (float32 [B, V]); returns int32 status [B]."""
    name = registry.resolve("steer", backend, llm_logits.device)
    return registry.kernel(name, "steer")(llm_logits, slm_ctx_logits, slm_noctx_logits, hparams, out, update)


@steer_out_op.register_fake
def _steer_out_fake(llm_logits, slm_ctx_logits, slm_noctx_logits, hparams, out, update="closed_form", backend="auto"):
    return llm_logits.new_empty((llm_logits.shape[0],), dtype=torch.int32)


@torch.library.custom_op("costeer::steer_mapped_out", mutates_args=("out",))
def steer_mapped_out_op(
    llm_logits: torch.Tensor,
    slm_ctx_logits: torch.Tensor,
    slm_noctx_logits: Optional[torch.Tensor],
    hparams: torch.Tensor,
    slm_index: torch.Tensor,
    out: torch.Tensor,
    drop_unmapped: bool = False,
    update: str = "closed_form",
    backend: str = "auto",
) -> torch.Tensor:
    """Different vocabularies: LLM token v reads the small-model rows at ``slm_index[v]`` (int32
    [V_llm]; -1 or out of range: no counterpart, LLM logit kept or, with ``drop_unmapped``, -inf).
    Writes ``out`` (float32 [B, V_llm]); returns int32 status [B]."""
    name = registry.resolve("steer_mapped", backend, llm_logits.device)
    fn = registry.kernel(name, "steer_mapped")
    return fn(llm_logits, slm_ctx_logits, slm_noctx_logits, hparams, slm_index, drop_unmapped, out, update)


@steer_mapped_out_op.register_fake
def _steer_mapped_out_fake(llm_logits, slm_ctx_logits, slm_noctx_logits, hparams, slm_index, out,
                           drop_unmapped=False, update="closed_form", backend="auto"):
    return llm_logits.new_empty((llm_logits.shape[0],), dtype=torch.int32)


def steer(
    llm_logits: torch.Tensor,
    slm_ctx_logits: torch.Tensor,
    slm_noctx_logits: Optional[torch.Tensor],
    cfg: Optional[SteerConfig] = None,
    *,
    mode: str = "closed_form",
    backend: Optional[str] = None,
    out: Optional[torch.Tensor] = None,
    validate: bool = True,
    vocab_map=None,
    unmapped: str = "keep",
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """CoSteer: steer the LLM's next-token distribution with the small model's context delta.

    Computes ``log_softmax(z_L + c_T (z_c - z_n))``, which equals the paper's T-step update
    exactly (``docs/closed_form.md``), in one fused pass. ``torch.ops.costeer.steer`` (and
    ``steer_out``, ``steer_mapped_out``) underneath: opaque to torch.compile, with fake
    implementations.

    Parameters
    ----------
    llm_logits : torch.Tensor
        Cloud LLM logits z_L, [B, V] or [V]; float32, float16 or bfloat16 (any row stride).
    slm_ctx_logits : torch.Tensor
        Small-model logits with the private context z_c, same shape (any float dtype).
    slm_noctx_logits : torch.Tensor or None
        Small-model logits without the context z_n, same shape; ``None`` means
        ``slm_ctx_logits`` already holds the delta z_c - z_n.
    cfg : SteerConfig, optional
        The update's settings; fields may be 1-D tensors of length B (per-row settings).
    mode : {"closed_form", "iterative"}
        One streaming pass, or the literal T-step loop inside the kernel (a check, and the base
        for non-affine variants).
    backend : str, optional
        ``"triton"``, ``"torch"``, ``"cpu"`` / ``"cuda"`` (C++, when built) or ``None`` (the
        fastest available for the device; ``costeer_kernels.available_backends()``).
    out : torch.Tensor, optional
        float32 output of the result's shape (any row stride; rows must not overlap).
    validate : bool
        Raise ValueError for rows with NaN/+inf inputs, no finite LLM logit or invalid per-row
        settings (one host sync, reading the kernel's own statistics). With ``False`` nothing is
        read back (CUDA-graph safe) and such rows are all-NaN. Under torch.compile the check is
        an in-graph assertion (``torch._assert_async``: a RuntimeError without the row's details).
    vocab_map : VocabMap or torch.Tensor, optional
        The models have different vocabularies: a ``costeer.vocab.VocabMap`` or an integer
        tensor [V_llm] giving, for each LLM token, its index in the small model's vocabulary
        (-1: none). The small-model rows are then [B, V_slm] (any V_slm) and are gathered inside
        the kernel. Backends without support are skipped by ``backend=None``; naming one raises
        ValueError. Entries outside [-1, V_slm) raise ValueError with ``validate=True`` (one host
        sync for a raw tensor) and count as unmapped otherwise (never as another token).
    unmapped : {"keep", "drop"}
        LLM tokens without a counterpart: their LLM logit, no delta; or excluded (-inf: the
        paper's intersection variant).
    vocab_size : int, optional
        The tokenizer's size N when logit widths are padded past it (e.g. 152064 and 151936):
        inputs of any widths >= N are accepted and ids >= N come out -inf. The result has the
        LLM's width. Without it, all widths must match (or, with ``vocab_map``, the map's length
        must equal the LLM's width).

    Returns
    -------
    torch.Tensor
        float32 log-probs of the inputs' shape (``out`` when given).

    Notes
    -----
    -inf in ``llm_logits`` bans a token; in both small-model rows it is a shared mask (no
    delta); in ``slm_ctx_logits`` alone it bans the token (c_T > 0); in ``slm_noctx_logits``
    alone the row is invalid.

    Examples
    --------
    >>> import torch
    >>> from costeer_kernels import SteerConfig, reference_steer, steer
    >>> llm, ctx, noctx = torch.randn(3, 4, 1000).unbind(0)   # [B=4, V=1000] each
    >>> lp = steer(llm, ctx, noctx, SteerConfig(T=20))
    >>> torch.allclose(lp, reference_steer(llm, ctx, noctx, SteerConfig(T=20)), atol=1e-4)
    True
    >>> per_row = SteerConfig(T=torch.tensor([0, 5, 20, 50]))   # a strength per request
    >>> torch.allclose(steer(llm, ctx, noctx, per_row)[0], llm[0].log_softmax(-1), atol=1e-5)
    True
    """
    drop = checks.check_unmapped(unmapped)
    checks.check_mode(mode)
    cfg = checks.check_cfg(cfg)
    general = vocab_map is not None or vocab_size is not None
    zl, zc, zn, rank = checks.logit_rows(llm_logits, slm_ctx_logits, slm_noctx_logits, same_width=not general)
    B, V = zl.shape
    hp = checks.packed_hparams(cfg, B, zl.device)
    out2 = checks.check_out(out, llm_logits, zl)
    if not general:
        name = registry.resolve("steer", backend, zl.device)
        if out2 is None:
            res, status = torch.ops.costeer.steer(zl, zc, zn, hp, mode, name)
        else:
            status = torch.ops.costeer.steer_out(zl, zc, zn, hp, out2, mode, name)
            res = out2
        check_status(status, validate)
        if out is not None:
            return out
        return res.squeeze(0) if rank == 1 else res
    if vocab_map is not None:
        n = checks.check_vocab_size(vocab_size, {"llm_logits": V})
    else:
        widths = {"llm_logits": V, "slm_ctx_logits": zc.shape[1]}
        if zn is not None:
            widths["slm_noctx_logits"] = zn.shape[1]
        n = checks.check_vocab_size(vocab_size, widths)
    N = V if n is None else n
    idx = None
    if vocab_map is not None:
        idx = checks.map_index(vocab_map, N, zc.shape[1], zl.device, validate, exact=n is None)
    name = registry.resolve("steer" if idx is None else "steer_mapped", backend, zl.device)
    if out2 is None:
        out2 = torch.empty(B, V, dtype=torch.float32, device=zl.device)
    zl_n, out_n = zl[:, :N], out2[:, :N]
    if idx is None:
        zn_n = None if zn is None else zn[:, :N]
        status = torch.ops.costeer.steer_out(zl_n, zc[:, :N], zn_n, hp, out_n, mode, name)
    else:
        status = torch.ops.costeer.steer_mapped_out(zl_n, zc, zn, hp, idx, out_n, drop, mode, name)
    fill_tail(out2, N, status)
    check_status(status, validate)
    if out is not None:
        return out
    return out2.squeeze(0) if rank == 1 else out2


# ---------------------------------------------------------------------------------------------
# Padded logit rows (vocab_size): ids past the tokenizer. Shared with steer_from_hidden.


def fill_tail(out2: torch.Tensor, n: int, status: torch.Tensor) -> None:
    """Ids >= n (padding past the tokenizer) are -inf; all-NaN for invalid rows, like the rest."""
    if n < out2.shape[1]:
        tail = out2[:, n:]
        fill = torch.where((status != 0)[:, None], float("nan"), float("-inf")).to(torch.float32)
        tail.copy_(fill.expand_as(tail))
