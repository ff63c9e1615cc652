"""Records the greedy token ids of the decoding loop on the embedded SmolLM2 model into
``greedy_old_loop.json`` (next to this file). It was run once on the loop before it moved to the
fused sampling ops (commit 0394421); ``tests/costeer/test_loop_greedy.py`` asserts that the
current loop still produces exactly these tokens.

    python tests/costeer/data/record_greedy.py
"""
import json
import os

from costeer import Generator, Request
from costeer.gating import ConfidenceGate
from costeer.models import load_model
from costeer_kernels import SteerConfig

PROMPTS = [
    ("Suggest a weekend activity.", "I love hiking in the mountains and I live in Zurich."),
    ("What should I cook tonight?", "I am vegan and allergic to peanuts."),
    ("Recommend a book for me.", "My favourite genre is science fiction; I enjoyed Dune."),
    ("Write a short note to my team about Friday.", "I manage a team of five nurses; we switch to night shifts on Friday."),
]
N = 24
# (name, SteerConfig kwargs, generate kwargs, Generator kwargs, batched?)
CASES = [
    ("cli_T3", dict(T=3), dict(), dict(), False),
    ("cli_T3_batch", dict(T=3), dict(), dict(), True),
    ("paper_T20", dict(T=20), dict(), dict(), False),
    ("T5_no_cobatch", dict(T=5), dict(), dict(cobatch=False), True),
    ("llm_only", dict(T=3), dict(mode="llm"), dict(), True),
    ("slm_only", dict(T=3), dict(mode="slm"), dict(), True),
    ("gate", dict(T=3), dict(), dict(gate="confidence"), True),
]


def record():
    smol = load_model("smollm2")
    out = {"model": "smollm2", "max_new_tokens": N, "prompts": PROMPTS, "cases": {}}
    for name, cfg, gen_kw, g_kw, batched in CASES:
        g_kw = dict(g_kw)
        if g_kw.get("gate") == "confidence":
            g_kw["gate"] = ConfidenceGate(0.9, 3)
        g = Generator(llm=smol, slm=smol, cfg=SteerConfig(**cfg), **g_kw)
        reqs = [Request(prompt=p, context=c, max_new_tokens=N) for p, c in PROMPTS]
        if batched:
            res = g.generate(reqs, **gen_kw)
        else:
            res = [g.generate(r, **gen_kw) for r in reqs]
        out["cases"][name] = {"cfg": cfg, "generate": gen_kw, "generator": {k: ("confidence" if k == "gate" else v) for k, v in g_kw.items()},
                              "batched": batched, "token_ids": [r.token_ids for r in res],
                              "finish_reason": [r.finish_reason for r in res]}
        print(name, [len(r.token_ids) for r in res], flush=True)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "greedy_old_loop.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    record()
