"""CoSteer inside Hugging Face ``generate()``: a logits processor that steers any causal LM.

    from transformers import LogitsProcessorList
    from costeer.hf import CoSteerLogitsProcessor

    proc = CoSteerLogitsProcessor(slm, context=["I am vegan."], prompt=["What should I cook tonight?"],
                                  tokenizer=llm_tokenizer, cfg=SteerConfig(T=2))
    out = llm.generate(input_ids, attention_mask=mask, logits_processor=LogitsProcessorList([proc]))

The processor owns the small model's with- and without-context passes (one ``costeer.slm.LocalRunner``,
its own KV cache, 2R rows for R sequences) and follows the tokens ``generate()`` appends: the first
call prefills, every later call feeds the last token of each row. The LLM's scores of each step are
replaced by ``costeer_kernels.steer(scores, z_ctx, z_noctx, cfg)``, the steered log-probs, so greedy
search, sampling (temperature / top-k / top-p apply after the processor) and beam search all work.

For the fused steering + sampling op (``costeer_kernels.steer_sample``) use the ``custom_generate``
loop in ``costeer.hf_generate`` with the same processor object.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

import costeer_kernels
from costeer_kernels import SteerConfig

from .loop import DEFAULT_CONTEXT_TEMPLATE, build_prompts
from .models import DEFAULT_MODEL, LoadedModel, load_model, same_vocabulary
from .slm import LocalOutput, LocalRunner

try:  # transformers is a dependency of costeer; keep the import soft for the kernels-only install
    from transformers import LogitsProcessor as _Base
except Exception:  # pragma: no cover
    _Base = object

__all__ = ["CoSteerLogitsProcessor", "DEFAULT_CONTEXT_PREFIX"]

# How the context enters the small model's with-context prompt when no prompt text is given (the
# rows of input_ids are then the small model's without-context prompts as they are).
DEFAULT_CONTEXT_PREFIX = "Here is some information about me:\n{context}\n\n"


def _as_list(name: str, value, allow_none: bool = False) -> Optional[List[str]]:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{name} must be a string or a non-empty list of strings, got {type(value).__name__}")


def _repeat_cfg(cfg: SteerConfig, n: int, k: int, device) -> SteerConfig:
    """Per-request tensor fields [n] -> per-row [n*k] on ``device`` (rows of a request are adjacent)."""
    if not cfg.per_row:
        return cfg
    kw = {}
    for name in ("T", "alpha", "beta", "lam", "eta"):
        v = getattr(cfg, name)
        if isinstance(v, torch.Tensor):
            if v.shape[0] not in (n, n * k):
                raise ValueError(f"cfg.{name} has {v.shape[0]} values, expected one per request ({n})")
            if v.shape[0] == n and k > 1:
                v = v.repeat_interleave(k)
            v = v.to(device)
        kw[name] = v
    return SteerConfig(**kw)


class CoSteerLogitsProcessor(_Base):
    """Steers the scores of ``model.generate()`` with a local small model that reads a private context.

    Args:
        slm: the small model: a ``costeer.models.LoadedModel`` or a spec for ``load_model``
            (default: the embedded SmolLM2-135M-Instruct).
        context: the private context, one string for every request or a list (one per request).
            Only the small model reads it.
        prompt: the public user message of each request (string or list), as given to the chat
            template. With it, the small model's prompts are built exactly like ``costeer.Generator``
            builds them (``costeer.loop.build_prompts``: chat template, the context inside the
            user message through ``context_template``), so greedy ``generate()`` reproduces
            ``Generator`` token for token when the LLM's ``input_ids`` are
            ``chat_ids(tokenizer, prompt)``. Without it, the small model's without-context prompt is the
            LLM's input row itself (left padding stripped) and its with-context prompt is
            ``context_prefix.format(context=...)`` tokenized, followed by that row.
        tokenizer: the LLM's tokenizer (default: the small model's). It must map every token
            string to the same id as the small model's tokenizer (checked); different vocabularies
            are not supported here.
        cfg: ``SteerConfig``; tensor fields hold one value per request (per-request strength).
        context_template, system_prompt: as in ``costeer.Generator``.
        context_prefix: see ``prompt``.
        attention_mask: the mask passed to ``generate()`` (left padding); used to strip the padding
            from the rows when ``prompt`` is not given. Without it, leading ``pad_token_id`` tokens
            are stripped.
        pad_token_id: the LLM's pad id (default: the tokenizer's, else the small model's).

    Rows: ``input_ids`` may have R = n*k rows for n requests (``num_return_sequences`` or
    ``num_beams`` = k): rows i*k .. i*k+k-1 belong to request i and get its context.

    Vocabulary widths: the LLM's scores and the small model's logits may differ in width only by
    padding past the shared tokenizer's size N = len(tokenizer) (e.g. 49152 vs 49280): the steer op
    is then called with ``vocab_size=N``, the ids >= N of the result are -inf (never chosen), and
    the result keeps the LLM's width.

    Incremental state: every call must extend each row of the previous call by exactly one token.
    Rows that were reordered (beam search) are matched to the previous row they extend (among the
    rows with the same prompt and context), and the small model's KV rows are reordered alike. Anything else (a row that
    extends no previous sequence, a different number of rows, more than one new token) raises
    ValueError. A call whose ``input_ids`` equal the first call's starts over (the same processor can
    serve several ``generate()`` calls on the same inputs); ``reset()`` forgets everything.
    """

    def __init__(self, slm: Union[str, LoadedModel] = DEFAULT_MODEL, context: Union[str, Sequence[str]] = "", *,
                 prompt: Union[str, Sequence[str], None] = None, tokenizer=None, cfg: Optional[SteerConfig] = None,
                 context_template: str = DEFAULT_CONTEXT_TEMPLATE, system_prompt: Optional[str] = None,
                 context_prefix: str = DEFAULT_CONTEXT_PREFIX, attention_mask: Optional[torch.Tensor] = None,
                 pad_token_id: Optional[int] = None, device: str = "cpu"):
        if cfg is not None and not isinstance(cfg, SteerConfig):
            raise TypeError(f"cfg must be a SteerConfig or None, got {type(cfg).__name__}")
        if not isinstance(context_template, str) or "{context}" not in context_template or "{prompt}" not in context_template:
            raise ValueError("context_template must be a string containing {context} and {prompt}")
        if not isinstance(context_prefix, str) or "{context}" not in context_prefix:
            raise ValueError("context_prefix must be a string containing {context}")
        self.slm = slm if isinstance(slm, LoadedModel) else load_model(slm, device=device)
        self.contexts = _as_list("context", context)
        self.prompts = _as_list("prompt", prompt, allow_none=True)
        if self.prompts is not None and len(self.contexts) not in (1, len(self.prompts)):
            raise ValueError(f"context has {len(self.contexts)} entries but prompt has {len(self.prompts)}")
        if self.prompts is not None and len(self.contexts) == 1:
            self.contexts = self.contexts * len(self.prompts)
        self.tokenizer = tokenizer if tokenizer is not None else self.slm.tokenizer
        if not same_vocabulary(self.tokenizer, self.slm.tokenizer):
            raise ValueError("the LLM's tokenizer and the small model's must map every token to the same id; "
                             "CoSteer with different vocabularies is not supported by CoSteerLogitsProcessor")
        self.cfg = cfg if cfg is not None else SteerConfig()
        self.context_template = context_template
        self.system_prompt = system_prompt
        self.context_prefix = context_prefix
        self.attention_mask = attention_mask
        if pad_token_id is None:
            pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.slm.pad_token_id
        self.pad_token_id = int(pad_token_id)
        self.vocab_size = len(self.tokenizer)
        self.reset()

    # -- state ------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the small model's state; the next call prefills again."""
        self.runner: Optional[LocalRunner] = None
        self._first: Optional[torch.Tensor] = None  # input_ids of the first call (CPU)
        self._prev: Optional[torch.Tensor] = None  # input_ids of the previous call (CPU)
        self._k = 1
        self._keys: List[tuple] = []  # per row: (prompt, context); rows with equal keys may trade places
        self._cfg_rows: Optional[SteerConfig] = None
        self.steps = 0

    def _strip(self, ids: torch.Tensor, row: int) -> List[int]:
        if self.attention_mask is not None:
            m = self.attention_mask
            if m.shape != ids.shape:
                raise ValueError(f"attention_mask has shape {tuple(m.shape)} but the first input_ids have "
                                 f"{tuple(ids.shape)}; pass the mask given to generate()")
            return ids[row][m[row].to(torch.bool).cpu()].tolist()
        toks = ids[row].tolist()
        i = 0
        while i < len(toks) - 1 and toks[i] == self.pad_token_id:
            i += 1
        return toks[i:]

    def _prefill(self, ids: torch.Tensor) -> LocalOutput:
        R = ids.shape[0]
        n = len(self.prompts) if self.prompts is not None else len(self.contexts)
        if n == 1 and self.prompts is None:
            n = R  # one context for every row
        if R % n:
            raise ValueError(f"input_ids has {R} rows but the processor has {n} requests (contexts/prompts); "
                             "the rows must be k copies of each request (num_return_sequences / num_beams)")
        k = R // n
        contexts = self.contexts if len(self.contexts) == n else self.contexts * n
        if len(contexts) != n:
            raise ValueError(f"context has {len(self.contexts)} entries but input_ids has {n} requests")
        slm = self.slm
        ctx_rows, noctx_rows = [], []
        for i in range(n):
            if self.prompts is not None:
                _, ctx, noctx = build_prompts(self.tokenizer, slm.tokenizer, self.prompts[i], contexts[i],
                                              context_template=self.context_template, system_prompt=self.system_prompt)
            else:
                noctx = self._strip(ids, i * k)
                prefix = self.context_prefix.format(context=contexts[i])
                ctx = list(slm.tokenizer(prefix, add_special_tokens=False)["input_ids"]) + noctx
            if len(ctx) >= slm.max_len:
                raise ValueError(f"context is too long (request {i}): the small model's prompt with the context has "
                                 f"{len(ctx)} tokens but its window is {slm.max_len}; shorten the context")
            ctx_rows += [ctx] * k
            noctx_rows += [noctx] * k
            key = (self.prompts[i] if self.prompts is not None else None, contexts[i])
            self._keys += [key] * k
        self.runner = LocalRunner(slm.model, {"ctx": ctx_rows, "noctx": noctx_rows}, slm.pad_token_id, max_len=slm.max_len)
        self._k = k
        self._first = ids
        return self.runner.prefill()

    def _reorder(self, src: torch.Tensor) -> None:
        """Row r of the small model's state becomes the previous row src[r] (beam search)."""
        kv = self.runner.kv
        R = self.runner.batch
        full = torch.cat([src + g * R for g in range(len(self.runner.names))])
        dev = full.to(kv.device)
        kv.cache.reorder_cache(dev)
        kv._mask = kv._mask.index_select(0, dev)
        kv._next_pos = kv._next_pos.index_select(0, dev)
        kv.lengths = kv.lengths.index_select(0, full)

    def _follow(self, ids: torch.Tensor) -> LocalOutput:
        prev = self._prev
        if ids.shape[0] != prev.shape[0]:
            raise ValueError(f"input_ids has {ids.shape[0]} rows, the previous call had {prev.shape[0]}; "
                             "use one CoSteerLogitsProcessor per generate() call (or call reset())")
        if ids.shape[1] != prev.shape[1] + 1:
            raise ValueError(f"input_ids grew from {prev.shape[1]} to {ids.shape[1]} tokens; CoSteerLogitsProcessor "
                             "follows generate() one token per call (use a new processor or reset() for a new "
                             "generation; assisted/speculative decoding is not supported)")
        same = (ids[:, :-1] == prev).all(1)
        if not bool(same.all()):
            src = torch.arange(ids.shape[0])
            for r in torch.nonzero(~same).flatten().tolist():
                hits = (ids[r, :-1][None] == prev).all(1).nonzero().flatten().tolist()
                hits = [s for s in hits if self._keys[s] == self._keys[r]]
                if not hits:
                    raise ValueError(f"input_ids row {r} does not extend any sequence of the previous call with "
                                     "the same prompt and context: the processor follows generate() one appended "
                                     "token per call (rows may be reordered, as beam search does)")
                src[r] = hits[0]
            self._reorder(src)
        return self.runner.step(ids[:, -1])

    def small_model_logits(self, input_ids: torch.Tensor) -> LocalOutput:
        """Advance the small model to ``input_ids`` and return its next-token logits (ctx, noctx)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a 2-D LongTensor [rows, length]")
        ids = input_ids.detach().to("cpu", torch.long)
        restart = self._first is not None and ids.shape == self._first.shape and torch.equal(ids, self._first)
        if self.runner is None or restart:
            self.reset()
            out = self._prefill(ids)
        else:
            out = self._follow(ids)
        self._prev = ids
        self.steps += 1
        return out

    def row_config(self, device) -> SteerConfig:
        """The SteerConfig with per-request tensor fields expanded to the rows, on ``device``."""
        if self._cfg_rows is None:
            n = self.runner.batch // self._k
            self._cfg_rows = _repeat_cfg(self.cfg, n, self._k, device)
        return self._cfg_rows

    def steer_inputs(self, scores: torch.Tensor, out: LocalOutput):
        """(z_L, z_ctx, z_noctx, vocab_size or None) on the scores' device."""
        zc = out.logits["ctx"].to(scores.device)
        zn = out.logits["noctx"].to(scores.device)
        if scores.shape[0] != zc.shape[0]:
            raise ValueError(f"scores has {scores.shape[0]} rows, input_ids {zc.shape[0]}")
        n = None
        if scores.shape[1] != zc.shape[1]:
            n = self.vocab_size
            if min(scores.shape[1], zc.shape[1]) < n:
                raise ValueError(f"the LLM's scores have width {scores.shape[1]} and the small model's logits "
                                 f"{zc.shape[1]}; widths may only differ by padding past the tokenizer's "
                                 f"{n} tokens")
        return scores, zc, zn, n

    # -- the hook ---------------------------------------------------------------------------------

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = self.small_model_logits(input_ids)
        zl, zc, zn, n = self.steer_inputs(scores, out)
        cfg = self.row_config(scores.device)
        if n is None:
            return costeer_kernels.steer(zl, zc, zn, cfg)
        return costeer_kernels.steer(zl, zc, zn, cfg, vocab_size=n)
