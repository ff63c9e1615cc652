"""Greedy tokens of the decoding loop equal the old loop's, token for token, on the embedded model.

``data/greedy_old_loop.json`` was recorded by ``data/record_greedy.py`` on the loop before it
picked tokens with the fused ops (steer, then a torch argmax per row); the loop now picks them with
``steer_from_hidden`` / ``steer_sample``. Every recorded case runs again: single requests and
batches, the CLI's T=3 and the paper's T=20, co-batched and separate passes, the LLM alone, the
small model alone, the confidence gate.
"""
import json
import os

import pytest

from costeer import Generator, Request
from costeer.gating import ConfidenceGate
from costeer_kernels import SteerConfig

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "greedy_old_loop.json")
with open(DATA) as f:
    FIXTURE = json.load(f)


@pytest.mark.parametrize("name", sorted(FIXTURE["cases"]))
def test_greedy_tokens_equal_the_old_loop(smol, name):
    case = FIXTURE["cases"][name]
    kw = dict(case["generator"])
    if kw.get("gate") == "confidence":
        kw["gate"] = ConfidenceGate(0.9, 3)
    gen = Generator(llm=smol, slm=smol, cfg=SteerConfig(**case["cfg"]), **kw)
    reqs = [Request(prompt=p, context=c, max_new_tokens=FIXTURE["max_new_tokens"]) for p, c in FIXTURE["prompts"]]
    if case["batched"]:
        results = gen.generate(reqs, **case["generate"])
    else:
        results = [gen.generate(r, **case["generate"]) for r in reqs]
    assert [r.token_ids for r in results] == case["token_ids"]
    assert [r.finish_reason for r in results] == case["finish_reason"]
