"""Route a transformers model's decode-step attention through ``costeer_kernels.decode_attention``.

``use_decode_attention(model)`` registers one attention function with transformers'
``AttentionInterface`` (name ``"costeer_sdpa"``, with SDPA's mask builder) and switches the model
to it. Calls with ONE query token per row, float32 on the CPU, no dropout, soft-capping, sinks or
position bias (a decode step of Llama, Qwen, Mistral, Gemma 3, ...) run the C++ kernel: the
grouped query heads read their KV head in place, the padding mask applied per key (2 rows of
SmolLM2 x 100 keys on a 2-core Xeon: 10.9 against SDPA's 17.6-23.5 us a layer, 16 rows 64 against
70-109; bench/bench_attention.py).
Everything else (prefill, speculative scoring, GPU, other dtypes, autograd) is transformers' own
``sdpa_attention_forward``, unchanged. The result is SDPA's up to float32 rounding (both within a
few ulps of float64: tests/costeer/test_fast_attention.py).
"""
from __future__ import annotations

import torch

__all__ = ["use_decode_attention", "ATTENTION_NAME"]

ATTENTION_NAME = "costeer_sdpa"
_STATE = {"kernel": None, "sdpa": None}  # set by _register(): the C++ op and transformers' SDPA function


def _kernel():
    from costeer_kernels import _extension

    return getattr(torch.ops.costeer_ext, "decode_attention", None) if _extension.load_extension() else None


# (transformers' mask, (B, L), its [B, L] view), one tuple swapped whole (threads may share it)
_LAST_MASK = [(None, None, None)]


def _decode_mask(mask, B: int, L: int):
    """The [B, L] key mask of a 4-D decode mask ([B or 1, 1, 1, L], bool or float32), None when
    there is none, False when it has another form (then SDPA runs). transformers builds one mask
    per forward and hands it to every layer: the view is made once (a view, so an in-place change
    of the mask is seen)."""
    if mask is None:
        return None
    last = _LAST_MASK[0]
    if mask is last[0] and last[1] == (B, L):
        return last[2]
    view = _mask_view(mask, B, L)
    _LAST_MASK[0] = (mask, (B, L), view)
    return view


def _mask_view(mask, B: int, L: int):
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        return False
    if mask.shape[-1] != L or mask.shape[0] not in (1, B) or mask.dtype not in (torch.bool, torch.float32):
        return False
    m = mask[:, 0, 0, :]
    return m.expand(B, L) if m.shape[0] != B else m


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
               **kwargs):
    B, Hq, q_len, D = query.shape
    if (q_len == 1 and query.dtype is torch.float32 and key.dtype is torch.float32 and value.dtype is torch.float32
            and query.is_cpu and key.is_cpu and not dropout and kwargs.get("softcap") is None
            and kwargs.get("s_aux") is None and kwargs.get("position_bias") is None
            and not kwargs.get("output_attentions", False) and key.dim() == 4 and key.shape[1] > 0
            and Hq % key.shape[1] == 0 and key.stride(-1) == 1 and value.stride(-1) == 1
            and value.shape == key.shape and key.shape[-1] == D
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))
            and not torch.compiler.is_compiling()):
        mask = _decode_mask(attention_mask, B, key.shape[2])
        kernel = _STATE["kernel"]
        if mask is not False and kernel is not None:
            q = query[:, :, 0]
            if q.stride(-1) != 1:
                q = q.contiguous()
            out = torch.empty((B, Hq, D), dtype=torch.float32)
            scale = float(scaling) if scaling is not None else D ** -0.5
            kernel(q, key, value, mask, scale, out)
            return out.view(B, 1, Hq, D), None  # [B, q_len, heads, D], as sdpa_attention_forward returns
    return _STATE["sdpa"](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _register() -> bool:
    if _STATE["sdpa"] is not None:
        return True
    kernel = _kernel()
    if kernel is None:
        return False
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:  # pragma: no cover - a transformers without the attention interface
        return False
    AttentionInterface.register(ATTENTION_NAME, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    _STATE.update(kernel=kernel, sdpa=sdpa_attention_forward)
    return True


def use_decode_attention(model) -> bool:
    """Switch ``model`` (a transformers model using SDPA attention) to the decode-attention kernel.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model whose ``config._attn_implementation`` is ``"sdpa"``; others (eager, flash, flex,
        a model without the attention interface) are left as they are.

    Returns
    -------
    bool
        True when the model now uses it; False when nothing changed (another attention, no C++
        kernel here, a transformers without ``AttentionInterface``).

    Examples
    --------
    >>> import torch, transformers
    >>> from costeer.fast_attention import use_decode_attention
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> use_decode_attention(model) in (True, False)
    True
    """
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    if not hasattr(model, "set_attn_implementation") or not _register():
        return False
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, KeyError, AttributeError):  # pragma: no cover - this transformers refuses custom names
        return False
    return cfg._attn_implementation == ATTENTION_NAME
