"""A hand-written (gpt-fast style) CoSteer decode loop on the embedded SmolLM2 model.

One model plays both roles here; three rows share one KV cache: the LLM's public prompt, the small
model's prompt with the private context, and the same without it. Each step is ONE forward of the
base model for the three rows, then the steering op on the last hidden states / logits, then argmax.

    python examples/decode_step.py --max-new-tokens 16 [--op steer|hidden] [--check]

--op hidden (default when available): costeer_kernels.projection.steer_from_hidden(z_L, h_c, h_n, W)
--op steer: torch.ops.costeer.steer(z_L, z_c, z_n, hparams, mode, backend), the raw op
--check: compare the tokens with costeer.Generator (exit 1 on a mismatch)
"""
import argparse
import inspect
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import costeer_kernels  # noqa: E402  (registers torch.ops.costeer.*)
from costeer.loop import build_prompts  # noqa: E402
from costeer.models import load_model  # noqa: E402
from costeer_kernels import SteerConfig  # noqa: E402
from transformers import DynamicCache  # noqa: E402

try:
    from costeer_kernels.projection import steer_from_hidden
except ImportError:  # not landed in this checkout
    steer_from_hidden = getattr(costeer_kernels, "steer_from_hidden", None)


@torch.inference_mode()
def forward(base, ids, mask, pos, cache):
    """Final hidden state of the last position of each row, [R, H]; the cache grows in place."""
    kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    return base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{kw: cache}).last_hidden_state[:, -1]


@torch.inference_mode()
def decode_step(model, h, cfg, hparams, op):
    """Rows of h: [LLM, small model with context, small model without]. Returns the next token id."""
    W = model.get_output_embeddings().weight
    z_llm = model.lm_head(h[0:1]).float()
    if op == "hidden":  # W (h_c - h_n): one product for both small-model passes
        logp = steer_from_hidden(z_llm, h[1:2], h[2:3], W, cfg)
    else:  # the raw op: float32/16 rows [B, V], hparams float64 [1 or B, 5] -> (log-probs, status)
        z = model.lm_head(h[1:3]).float()
        logp, status = torch.ops.costeer.steer(z_llm, z[0:1], z[1:2], hparams, "closed_form", "auto")
        if int(status.max()) != 0:
            raise ValueError(f"steer: invalid row (status {status.tolist()})")
    return int(logp[0].argmax())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", default="What should I cook tonight?")
    ap.add_argument("--context", default="I am vegan and allergic to peanuts.")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--T", type=int, default=2)
    ap.add_argument("--op", choices=("steer", "hidden"), default="hidden" if steer_from_hidden else "steer")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if args.op == "hidden" and steer_from_hidden is None:
        ap.error("--op hidden needs costeer_kernels.projection.steer_from_hidden")
    m = load_model("smollm2")
    model, tok = m.model, m.tokenizer
    cfg = SteerConfig(T=args.T)
    hparams = cfg.packed(None, m.device)  # what steer() passes to the op
    rows = list(build_prompts(tok, tok, args.prompt, args.context))  # public, with context, without
    L = max(map(len, rows))
    ids = torch.tensor([[m.pad_token_id] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    h = forward(model.model, ids, mask, pos, cache)  # prefill
    out = []
    for _ in range(args.max_new_tokens):
        t = decode_step(model, h, cfg, hparams, args.op)
        if t in m.eos_token_ids:
            break
        out.append(t)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        pos = pos[:, -1:] + 1
        h = forward(model.model, torch.tensor([[t]] * 3), mask, pos, cache)  # the token joins all 3 rows
    print(f"[{args.op}] {tok.decode(out, skip_special_tokens=True)!r}")
    if args.check:
        from costeer import Generator

        ref = Generator(llm=m, slm=m, cfg=cfg).generate(args.prompt, context=args.context, max_new_tokens=args.max_new_tokens)
        print("Generator:", repr(ref.text), "match" if ref.token_ids == out else "MISMATCH")
        return 0 if ref.token_ids == out else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
