"""Sampling in the decoding loop: reproducible from the seed, and the very draws of
``costeer_kernels.steer_sample`` for the same inputs (the loop has no sampler of its own)."""
import torch

from costeer import Generator
from costeer.loop import build_prompts
from costeer_kernels import SteerConfig, steer_sample

PROMPT, CONTEXT = "Suggest a weekend activity.", "I love hiking in the mountains and I live in Zurich."
OPTS = dict(temperature=0.9, top_k=40, top_p=0.95, min_p=0.02)
N = 6


def _last_logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def test_sampled_tokens_equal_steer_sample_and_repeat(smol):
    cfg = SteerConfig(T=3)
    gen = Generator(llm=smol, slm=smol, cfg=cfg, cobatch=False)  # LLM stream + steer_from_hidden(sample=...)
    res = gen.generate(PROMPT, context=CONTEXT, max_new_tokens=N, seed=1234, **OPTS)
    again = Generator(llm=smol, slm=smol, cfg=cfg).generate(PROMPT, context=CONTEXT, max_new_tokens=N, seed=1234, **OPTS)
    assert again.token_ids == res.token_ids  # co-batched path: the same draws
    other = gen.generate(PROMPT, context=CONTEXT, max_new_tokens=N, seed=99, **OPTS)
    assert other.token_ids != res.token_ids
    pub, ctx, noctx = build_prompts(smol.tokenizer, smol.tokenizer, PROMPT, CONTEXT)
    toks = res.token_ids
    for t in range(len(toks)):
        zl = _last_logits(smol.model, pub + toks[:t])
        zc = _last_logits(smol.model, ctx + toks[:t])
        zn = _last_logits(smol.model, noctx + toks[:t])
        tok, _ = steer_sample(zl, zc, zn, cfg, seed=1234, offset=t, **OPTS)
        assert int(tok) == toks[t], t


def test_top_k_one_is_greedy(smol):
    gen = Generator(llm=smol, slm=smol, cfg=SteerConfig(T=3))
    greedy = gen.generate(PROMPT, context=CONTEXT, max_new_tokens=N)
    k1 = gen.generate(PROMPT, context=CONTEXT, max_new_tokens=N, temperature=1.5, top_k=1, seed=5)
    assert k1.token_ids == greedy.token_ids


def test_cobatched_step_projects_one_head_row_per_request(smol, monkeypatch):
    """One model in both roles: the update folds into the hidden state (W (h_llm + c_T (h_c - h_n))),
    so each step projects ONE row of the head per request, and the draws stay steer_sample's over
    z_L + c_T (z_c - z_n) (the test above); with a confidence gate the LLM's own logits are needed: 2."""
    import costeer.loop as loop
    from costeer.gating import ConfidenceGate

    head_rows = []
    real = loop.costeer_kernels.linear_rows

    def spy(x, w, *a, **k):
        head_rows.append(x.shape[0])
        return real(x, w, *a, **k)

    monkeypatch.setattr(loop.costeer_kernels, "linear_rows", spy)
    reqs = [dict(prompt=PROMPT, context=CONTEXT), dict(prompt="Name a fruit.", context="I like red things.")]
    from costeer.types import Request

    gen = Generator(llm=smol, slm=smol, cfg=SteerConfig(T=3))
    plain = gen.generate([Request(max_new_tokens=4, **r) for r in reqs])
    assert head_rows and set(head_rows) == {2}, head_rows  # B = 2 requests: 2 rows, not 4
    head_rows.clear()
    gated = Generator(llm=smol, slm=smol, cfg=SteerConfig(T=3), gate=ConfidenceGate(threshold=1.0))  # never confident
    again = gated.generate([Request(max_new_tokens=4, **r) for r in reqs])
    assert head_rows and set(head_rows) == {4}, head_rows
    assert [r.token_ids for r in again] == [r.token_ids for r in plain]  # always steering: the same greedy tokens
