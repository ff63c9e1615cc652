"""The plain reference loop: what the paper's public code does, for tests and the benchmark.

Three separate KV-cached forward passes per token (LLM on the public prompt, small model with and
without the context), batch size 1, the literal T-step update (``costeer_kernels.reference_steer``),
argmax. No batching, no co-batching, no overlap.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from costeer_kernels import SteerConfig, reference_steer

from .loop import DEFAULT_CONTEXT_TEMPLATE, build_prompts
from .kv import _cache_kwarg, _new_cache


class _Single:
    def __init__(self, model, ids: List[int]):
        self.model = model
        self.cache = _new_cache(model)
        self.kw = _cache_kwarg(model.forward)
        self.ids = torch.tensor([ids], dtype=torch.long)

    def next_logits(self, token: Optional[int] = None) -> torch.Tensor:
        x = self.ids if token is None else torch.tensor([[token]], dtype=torch.long)
        with torch.inference_mode():
            out = self.model(input_ids=x, use_cache=True, **{self.kw: self.cache})
        return out.logits[0, -1].float()


def reference_generate(llm, slm, prompt: str, context: str, *, cfg: Optional[SteerConfig] = None,
                       max_new_tokens: int = 16, context_template: str = DEFAULT_CONTEXT_TEMPLATE,
                       system_prompt: Optional[str] = None, mode: str = "costeer") -> List[int]:
    """Greedy token ids (EOS excluded) of CoSteer ("costeer"), the LLM alone ("llm")."""
    pub, ctx, noctx = build_prompts(llm.tokenizer, slm.tokenizer, prompt, context,
                                    context_template=context_template, system_prompt=system_prompt)
    eos = set(slm.eos_token_ids)
    L = _Single(llm.model, pub)
    C = _Single(slm.model, ctx) if mode == "costeer" else None
    N = _Single(slm.model, noctx) if mode == "costeer" else None
    out: List[int] = []
    tok = None
    for _ in range(max_new_tokens):
        zl = L.next_logits(tok)
        if mode == "costeer":
            zc = C.next_logits(tok)
            zn = N.next_logits(tok)
            V = min(zl.shape[0], zc.shape[0])
            logp = reference_steer(zl[:V], zc[:V], zn[:V], cfg or SteerConfig())
        else:
            logp = torch.log_softmax(zl, -1)
        tok = int(logp.argmax())
        if tok in eos:
            break
        out.append(tok)
    return out
