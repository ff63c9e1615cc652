"""One decode step of a Llama-architecture model without transformers' per-layer Python.

A decode step of the embedded SmolLM2 (30 layers, 1-16 rows) spent about 6 of its 15 ms in
transformers' Python around the kernels: the causal-mask builder, the kwargs and deprecation
wrappers of every layer and attention call, ``nn.Module.__call__`` for each of ~300 modules.
``LlamaDecodeStep`` runs the same step as a flat loop over the layers that calls the SAME
operations in the same order (the RMSNorm, the rotary embedding, each linear layer's own
``forward`` -- the few-row kernel of ``costeer.fast_linear`` where attached --, the cache's
``update``, the decode-attention kernel of ``costeer.fast_attention``, the activation module), so
its hidden states are transformers' bit for bit, not merely close.

That equality is checked, not assumed: ``KVBatch`` runs its first decode step of each model both
ways (this one, then transformers' on the same cache after a rollback of the appended position,
keeping transformers' keys, values and output) and uses this step only if the two hidden states
are identical (``torch.equal``); otherwise (or if it raises) the model keeps transformers'
forward, with a warning. A future transformers whose Llama code computes
differently therefore costs nothing but the speed-up.

Used for one new token per row, float32 on the CPU, without autograd or hooks, for the exact
classes ``LlamaForCausalLM`` / ``LlamaModel`` / ``LlamaDecoderLayer`` / ``LlamaAttention`` /
``LlamaMLP`` / ``LlamaRMSNorm`` with the decode-attention kernel switched on; anything else (prefill,
speculative scoring of several positions, other architectures, GPU) is transformers' forward.
``COSTEER_FLAT_DECODE=0`` in the environment switches the flat step off (transformers' forward
everywhere), e.g. to compare the two.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

__all__ = ["LlamaDecodeStep", "decode_step_for", "checked"]

_ATTR = "_costeer_decode_step"  # on the model: the checked step, False once refused or failed


def _rms_norm(mod, x: torch.Tensor) -> torch.Tensor:
    # LlamaRMSNorm.forward's operations, in its order (the input is float32 here).
    variance = x.pow(2).mean(-1, keepdim=True)
    return mod.weight * (x * torch.rsqrt(variance + mod.variance_epsilon))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _no_hooks(mod) -> bool:
    return not (mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks
                or getattr(mod, "_forward_hooks_with_kwargs", None) or getattr(mod, "_backward_pre_hooks", None))


def _global_hooks() -> bool:
    m = torch.nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or getattr(m, "_global_backward_pre_hooks", None))


class LlamaDecodeStep:
    """The decode step of one ``LlamaForCausalLM`` (see the module docstring).

    ``step(ids [R, 1], key_mask [R, L], position_ids [R, 1], cache)`` appends each row's token to
    ``cache`` and returns the final hidden states [R, H] (after the final norm), as
    ``model.model(...).last_hidden_state[:, -1]`` does. ``key_mask`` is the 0/1 attention mask of
    every cached position, the new one included.
    """

    def __init__(self, model, kernel):
        base = model.model
        cfg = model.config
        self.model = model
        self.kernel = kernel
        self.embed = base.embed_tokens
        self.rotary = base.rotary_emb
        self.norm = base.norm
        self.layers = []
        for i, layer in enumerate(base.layers[: cfg.num_hidden_layers]):
            at, mlp = layer.self_attn, layer.mlp
            # The linear layers' own ``forward`` (looked up per call: use_linear_rows may replace
            # it) instead of ``nn.Module.__call__``: no hooks were registered (_eligible).
            self.layers.append((i, layer.input_layernorm, at.q_proj, at.k_proj, at.v_proj, at.o_proj,
                                layer.post_attention_layernorm, mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn,
                                at.head_dim, float(at.scaling)))

    def usable(self) -> bool:
        """No global module hooks and the model in eval mode (checked per step: cheap)."""
        return not _global_hooks() and not self.model.training

    def step(self, ids: torch.Tensor, key_mask: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
        R = ids.shape[0]
        x = self.embed(ids)  # [R, 1, H]
        cos, sin = self.rotary(x, position_ids=position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        mask = key_mask.bool()
        kernel = self.kernel
        for (i, norm1, q_p, k_p, v_p, o_p, norm2, gate_p, up_p, down_p, act, D, scale) in self.layers:
            h = _rms_norm(norm1, x)
            q = q_p.forward(h).view(R, 1, -1, D).transpose(1, 2)
            k = k_p.forward(h).view(R, 1, -1, D).transpose(1, 2)
            v = v_p.forward(h).view(R, 1, -1, D).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            keys, values = cache.update(k, v, i)
            qq = q[:, :, 0]
            if qq.stride(-1) != 1:
                qq = qq.contiguous()
            att = torch.empty((R, qq.shape[1], D), dtype=torch.float32)
            kernel(qq, keys, values, mask, scale, att)
            x = x + o_p.forward(att.view(R, 1, -1))
            h = _rms_norm(norm2, x)
            x = x + down_p.forward(act(gate_p.forward(h)) * up_p.forward(h))
        return self.norm(x)[:, -1]


def _eligible(model) -> Optional[str]:
    """Why ``model`` cannot take the step (None: it can)."""
    try:
        from transformers.models.llama import modeling_llama as ml
    except ImportError:  # pragma: no cover
        return "no transformers Llama"
    from .fast_attention import ATTENTION_NAME

    if type(model) is not ml.LlamaForCausalLM or type(getattr(model, "model", None)) is not ml.LlamaModel:
        return f"{type(model).__name__} is not a LlamaForCausalLM"
    cfg = model.config
    if getattr(cfg, "_attn_implementation", None) != ATTENTION_NAME:
        return f"attention is {getattr(cfg, '_attn_implementation', None)!r}, not the decode kernel"
    for layer in model.model.layers[: cfg.num_hidden_layers]:
        parts = (layer, layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm)
        if tuple(map(type, parts)) != (ml.LlamaDecoderLayer, ml.LlamaAttention, ml.LlamaMLP, ml.LlamaRMSNorm,
                                        ml.LlamaRMSNorm):
            return "a decoder layer of another kind"
    if not all(_no_hooks(m) for m in model.modules()):
        return "the model has forward hooks"
    if any(p.dtype != torch.float32 or not p.is_cpu for p in model.parameters()):
        return "not float32 on the CPU"
    return None


def decode_step_for(model) -> Optional[LlamaDecodeStep]:
    """The model's unchecked ``LlamaDecodeStep``, or None where it does not apply (or was refused)."""
    if os.environ.get("COSTEER_FLAT_DECODE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    got = getattr(model, _ATTR, None)
    if got is False:
        return None
    if isinstance(got, LlamaDecodeStep):
        return got
    from .fast_attention import _STATE, _register

    if _eligible(model) is not None or not _register() or _STATE["kernel"] is None:
        return None
    return LlamaDecodeStep(model, _STATE["kernel"])


def checked(model) -> Optional[bool]:
    """True once the step matched transformers' on this model, False once it did not, None before."""
    got = getattr(model, _ATTR, None)
    return True if isinstance(got, LlamaDecodeStep) else (False if got is False else None)


def record_check(model, step: LlamaDecodeStep, equal: bool, error: Optional[BaseException] = None) -> None:
    """Keep ``step`` for ``model`` if its first decode step matched transformers', else refuse it."""
    if equal:
        setattr(model, _ATTR, step)
        return
    setattr(model, _ATTR, False)
    why = f"failed ({type(error).__name__}: {error})" if error is not None else "differs from transformers' (bit for bit)"
    warnings.warn(f"costeer.fast_decode: the flat Llama decode step {why}; transformers' own forward is used "
                  "for this model", RuntimeWarning, stacklevel=3)
