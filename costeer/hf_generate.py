"""A ``custom_generate`` decoding loop for Hugging Face ``generate()`` that steers and samples in one op.

    from costeer.hf import CoSteerLogitsProcessor
    from costeer.hf_generate import generate as costeer_generate

    proc = CoSteerLogitsProcessor(slm, context=[...], prompt=[...], cfg=SteerConfig(T=2))
    out = llm.generate(input_ids, attention_mask=mask, custom_generate=costeer_generate, costeer=proc,
                       max_new_tokens=64, do_sample=True, temperature=0.7, top_p=0.9)

transformers prepares the inputs, the generation config, the logits processors and the stopping
criteria, then calls this loop instead of its own ``_sample``. Per step: the LLM's next-token
logits (its rows in a ``costeer.kv.KVBatch``: left padding from ``attention_mask``, its own KV
cache), the non-sampling logits processors (repetition penalty, min length, bad words, ...), the
small model's two passes (the ``CoSteerLogitsProcessor``'s state), then ONE
``costeer_kernels.steer_sample`` call that steers and picks the token (greedy, or Gumbel-max with
the config's temperature / top_k / top_p / min_p, seeded by ``costeer_seed``, offset = step).

Greedy tokens equal those of ``generate(logits_processor=[proc])``. Sampling draws differ from
that path (another RNG) but are reproducible for a given ``costeer_seed``.

As a string (the form ``custom_generate`` takes for Hub repos and local folders): ``CUSTOM_GENERATE_DIR``
holds ``custom_generate/generate.py``, which forwards here:
``llm.generate(..., custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True, costeer=proc)``.
"""
from __future__ import annotations

import os
import secrets
from typing import Optional

import torch

import costeer_kernels

from .hf import CoSteerLogitsProcessor
from .kv import KVBatch

__all__ = ["generate", "CUSTOM_GENERATE_DIR"]

CUSTOM_GENERATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_custom_generate")

# Processors that steer_sample applies itself (from the generation config), or that change nothing.
_HANDLED = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "LogitNormalization")
_UNSUPPORTED = ("TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper", "TopHLogitsWarper")


def _split_processors(logits_processor):
    keep = []
    for p in list(logits_processor or []):
        name = type(p).__name__
        if isinstance(p, CoSteerLogitsProcessor):
            raise ValueError("pass the CoSteerLogitsProcessor as costeer=..., not in logits_processor, with "
                             "the costeer custom_generate loop (it would steer twice)")
        if name in _UNSUPPORTED:
            raise ValueError(f"{name} is not supported by the costeer custom_generate loop (steer_sample applies "
                             "temperature, top_k, top_p and min_p); use logits_processor=[CoSteerLogitsProcessor] "
                             "with the standard loop instead")
        if name not in _HANDLED:
            keep.append(p)
    return keep


def generate(model, input_ids: torch.LongTensor, logits_processor=None, stopping_criteria=None,
             generation_config=None, synced_gpus: bool = False, streamer=None,
             costeer: Optional[CoSteerLogitsProcessor] = None, costeer_seed: Optional[int] = None, **model_kwargs):
    """The decoding loop (``custom_generate=`` callable). Returns the sequences [R, L + new] (or a
    ``GenerateDecoderOnlyOutput`` holding them with ``return_dict_in_generate=True``)."""
    if not isinstance(costeer, CoSteerLogitsProcessor):
        raise ValueError("the costeer custom_generate loop needs costeer=CoSteerLogitsProcessor(...) "
                         "(the small model, the private context and the SteerConfig)")
    gc = generation_config
    if gc is None:
        raise ValueError("generation_config is required (generate() passes it)")
    if gc.num_beams is not None and gc.num_beams > 1:
        raise ValueError("the costeer custom_generate loop does not do beam search (num_beams > 1); use "
                         "logits_processor=[CoSteerLogitsProcessor(...)] with the standard loop for beam search")
    if synced_gpus:
        raise ValueError("synced_gpus is not supported by the costeer custom_generate loop")
    if model.config.is_encoder_decoder:
        raise ValueError("the costeer custom_generate loop supports decoder-only models")
    processors = _split_processors(logits_processor)
    pad = gc._pad_token_tensor if getattr(gc, "_pad_token_tensor", None) is not None else gc.pad_token_id
    if pad is None:
        pad = costeer.pad_token_id
    pad = int(pad)
    has_eos = any(hasattr(c, "eos_token_id") for c in (stopping_criteria or []))

    # The LLM's rows: strip the left padding (generate() drops an all-ones mask), one KV batch.
    mask = model_kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    rows = [input_ids[i][mask[i].to(torch.bool)].tolist() for i in range(input_ids.shape[0])]
    llm = KVBatch(model, rows, pad)

    sample = bool(gc.do_sample)
    temperature = float(gc.temperature if gc.temperature is not None else 1.0) if sample else 0.0
    top_k = int(gc.top_k or 0) if sample else 0
    top_p = float(gc.top_p if gc.top_p is not None else 1.0) if sample else 1.0
    min_p = float(gc.min_p or 0.0) if sample else 0.0
    seed = int(costeer_seed) if costeer_seed is not None else secrets.randbits(62)

    costeer.reset()
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    out = llm.prefill()
    step = 0
    while True:
        scores = out.logits.to(input_ids.device)
        for p in processors:
            scores = p(input_ids, scores)
        local = costeer.small_model_logits(input_ids)
        zl, zc, zn, n = costeer.steer_inputs(scores, local)
        if n is not None:  # padded widths: the sampled id is always < n
            zl, zc, zn = zl[:, :n], zc[:, :n], zn[:, :n]
        tokens, _ = costeer_kernels.steer_sample(zl, zc, zn, costeer.row_config(zl.device), temperature=temperature,
                                                 top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, offset=step)
        tokens = tokens.to(input_ids.device)
        if has_eos:
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(tokens.cpu())
        if stopping_criteria is not None:
            unfinished = unfinished & ~stopping_criteria(input_ids, None)
        if not bool(unfinished.any()):
            break
        out = llm.step(tokens)
        step += 1
    if streamer is not None:
        streamer.end()
    if gc.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=input_ids)
    return input_ids
