"""The decoding loop on the real SmolLM2 model: token-for-token equality with the plain reference
loop, batching, modes, sampling, stop strings, streaming."""
import pytest
import torch

from costeer import Generator, Request
from costeer.cli import CLI_DEFAULTS
from costeer.reference_loop import reference_generate as _reference_generate
from costeer_kernels import SteerConfig

CASES = [
    ("Suggest a weekend activity.", "I love hiking in the mountains and I live in Zurich."),
    ("What should I cook tonight?", "I am vegan and allergic to peanuts."),
    ("Recommend a book for me.", "My favourite genre is science fiction; I enjoyed Dune."),
]
N = 10
_REFS = {}


def reference_generate(llm, slm, prompt, context, cfg=None, max_new_tokens=N, mode="costeer"):
    """The plain reference loop, memoized: several tests compare against the same runs."""
    key = (prompt, context, None if cfg is None else cfg.values(), max_new_tokens, mode)
    if key not in _REFS:
        _REFS[key] = _reference_generate(llm, slm, prompt, context, cfg=cfg, max_new_tokens=max_new_tokens, mode=mode)
    return _REFS[key]


@pytest.fixture(scope="module")
def gen(smol):
    return Generator(llm=smol, slm=smol, cfg=SteerConfig(**CLI_DEFAULTS))


@pytest.mark.parametrize("prompt,context", CASES)
def test_greedy_equals_reference_loop(gen, smol, prompt, context):
    ref = reference_generate(smol, smol, prompt, context, cfg=gen.cfg, max_new_tokens=N)
    res = gen.generate(prompt, context=context, max_new_tokens=N)
    assert res.token_ids == ref
    assert res.text == smol.tokenizer.decode(ref, skip_special_tokens=True)
    assert res.finish_reason in ("length", "eos")


def test_greedy_equals_reference_paper_strength_and_no_cobatch(smol):
    cfg = SteerConfig(T=5)  # c_T = 1.13
    prompt, context = CASES[0]
    ref = reference_generate(smol, smol, prompt, context, cfg=cfg, max_new_tokens=N)
    for cobatch in (True, False):
        g = Generator(llm=smol, slm=smol, cfg=cfg, cobatch=cobatch)
        assert g.generate(prompt, context=context, max_new_tokens=N).token_ids == ref


def test_batch_of_requests_equals_reference(gen, smol):
    reqs = [Request(prompt=p, context=c, max_new_tokens=N) for p, c in CASES]
    results = gen.generate(reqs)
    for (p, c), res in zip(CASES, results):
        assert res.token_ids == reference_generate(smol, smol, p, c, cfg=gen.cfg, max_new_tokens=N)


def test_modes_and_timings(gen, smol):
    prompt, context = CASES[1]
    llm = gen.generate(prompt, context=context, max_new_tokens=8, mode="llm")
    assert llm.token_ids == reference_generate(smol, smol, prompt, context, max_new_tokens=8, mode="llm")
    slm = gen.generate(prompt, context=context, max_new_tokens=8, mode="slm")
    assert slm.token_ids and slm.text
    res = gen.generate(prompt, context=context, max_new_tokens=8)
    s = res.timing_summary()
    assert s["steps"] == len(res.timings) >= 1
    assert s["total_ms"] > 0 and s["prefill_ms"] > 0
    assert res.tokens_per_s > 0


def test_streaming_sampling_and_stop(gen):
    prompt, context = CASES[0]
    pieces = []
    res = gen.generate(prompt, context=context, max_new_tokens=10, temperature=0.8, seed=123,
                       on_text=lambda i, s: pieces.append(s))
    assert "".join(pieces) == res.text
    again = gen.generate(prompt, context=context, max_new_tokens=10, temperature=0.8, seed=123)
    assert again.token_ids == res.token_ids
    chunks = list(gen.stream(prompt, context=context, max_new_tokens=10))
    assert chunks[-1].done and "".join(c.text for c in chunks) == chunks[-1].result.text
    # stop string: cut at the first word of the greedy answer's second half
    full = chunks[-1].result.text
    word = full.split()[3]
    stopped = gen.generate(prompt, context=context, max_new_tokens=10, stop=[word])
    assert stopped.finish_reason == "stop"
    assert word not in stopped.text and full.startswith(stopped.text)


def test_gate_hook_switches_steering_off(gen, smol):
    prompt, context = CASES[1]
    calls = []

    def gate(i, step, lp):
        calls.append(step)
        return False  # never steer: CoSteer becomes the LLM alone

    g = Generator(llm=smol, slm=smol, cfg=gen.cfg, gate=gate)
    res = g.generate(prompt, context=context, max_new_tokens=8)
    llm = gen.generate(prompt, context=context, max_new_tokens=8, mode="llm")
    assert res.token_ids == llm.token_ids
    assert calls == [0]  # asked once, then steering is off for good


def test_confidence_gate_in_the_loop(gen, smol):
    """ConfidenceGate wired into Generator: never confident = CoSteer, always confident = the LLM
    alone (the small model off from the first token), and the paper's rule (0.9 for 3 tokens)
    steers a prefix identical to CoSteer's, then stops the small-model passes."""
    from costeer.gating import ConfidenceGate

    prompt, context = CASES[2]
    full = gen.generate(prompt, context=context, max_new_tokens=N)
    llm = gen.generate(prompt, context=context, max_new_tokens=N, mode="llm")
    for cobatch in (True, False):
        never = Generator(llm=smol, slm=smol, cfg=gen.cfg, cobatch=cobatch, gate=ConfidenceGate(threshold=1.0))
        res = never.generate(prompt, context=context, max_new_tokens=N)
        assert res.token_ids == full.token_ids and res.steered_tokens == len(res.token_ids) + (res.finish_reason == "eos")
        always = Generator(llm=smol, slm=smol, cfg=gen.cfg, cobatch=cobatch, gate=ConfidenceGate(threshold=0.0, patience=1))
        res = always.generate(prompt, context=context, max_new_tokens=N)
        assert res.token_ids == llm.token_ids and res.steered_tokens == 0
    paper = Generator(llm=smol, slm=smol, cfg=gen.cfg, cobatch=False, gate=ConfidenceGate(0.9, 3))
    res = paper.generate(prompt, context=context, max_new_tokens=N)
    k = res.steered_tokens
    assert res.token_ids[:k] == full.token_ids[:k]
    again = paper.generate(prompt, context=context, max_new_tokens=N)  # the gate resets per generation
    assert again.token_ids == res.token_ids and again.steered_tokens == k
    with pytest.raises(TypeError, match="gate must be"):
        Generator(llm=smol, slm=smol, gate=3)
