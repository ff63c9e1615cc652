"""costeer.fast_attention: a transformers model's decode-step attention on the C++ kernel.

Each model is compared against a float64 copy of itself: the kernel's logits must be within 4x
SDPA's own float32 error, the greedy tokens the same, and everything that is not a one-token
decode step (prefill, float64, autograd) SDPA's result bit for bit.
"""
import copy
import json
import os

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from costeer import fast_attention
from costeer.fast_attention import ATTENTION_NAME, use_decode_attention
from costeer.kv import _cache_kwarg
from costeer_kernels._extension import build_status

_BUILD = build_status()
pytestmark = pytest.mark.skipif(not _BUILD["loaded"], reason=f"the C++ extension is not loaded: {_BUILD['reason']}")
V = 300


def _llama(seed=0):
    cfg = LlamaConfig(vocab_size=V, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _gemma(seed=0):
    # Two layers: one sliding (window 5, shorter than the prompt, so its decode mask hides keys),
    # one global; Gemma 3's own scaling (query_pre_attn_scalar) reaches the kernel as `scaling`.
    cfg = Gemma3TextConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=5,
                           layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24,
                           max_position_embeddings=128, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(cfg).eval()


def _left_padded(rows=3, length=9, seed=1):
    """Random ids with a left-padded attention mask (row r has r pads), the shape of a batch."""
    ids = torch.randint(1, V, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(rows, length, dtype=torch.long)
    for r in range(rows):
        mask[r, :r] = 0
    return ids, mask


def _greedy(model, ids, mask, steps):
    """Prefill then ``steps`` greedy decode steps; returns (prefill logits, [step logits], tokens)."""
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        first = out.logits
        logits, tokens = [], []
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            tokens.append(nxt)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = model(nxt, attention_mask=mask, use_cache=True, **{_cache_kwarg(model.forward): out.past_key_values})
            logits.append(out.logits)
    return first, logits, torch.cat(tokens, 1)


@pytest.fixture
def calls(monkeypatch):
    """Counts the C++ kernel's calls (after registering it)."""
    assert fast_attention._register()
    seen = []
    kernel = fast_attention._STATE["kernel"]

    def counted(*args):
        seen.append(args[0].shape)
        return kernel(*args)

    monkeypatch.setitem(fast_attention._STATE, "kernel", counted)
    return seen


@pytest.mark.parametrize("make", [_llama, _gemma], ids=["llama-gqa", "gemma3-sliding"])
def test_decode_steps_match_sdpa_and_float64(make, calls):
    base = make()
    fast = copy.deepcopy(base)
    exact = copy.deepcopy(base).double()
    assert use_decode_attention(fast)
    assert fast.config._attn_implementation == ATTENTION_NAME
    ids, mask = _left_padded()
    pb, lb, tb = _greedy(base, ids, mask, 5)
    n_prefill = len(calls)
    pf, lf, tf = _greedy(fast, ids, mask, 5)
    pe, le, _ = _greedy(exact, ids, mask, 5)
    assert torch.equal(pf, pb)  # prefill (9 query tokens) is SDPA's own call
    assert torch.equal(tf, tb)
    # every decode step of every layer ran the kernel (a float64 model never does)
    assert len(calls) - n_prefill == 5 * base.config.num_hidden_layers
    for b, f, e in zip(lb, lf, le):
        e_sdpa = (b.double() - e).abs().max().item()
        e_fast = (f.double() - e).abs().max().item()
        assert e_fast <= 4 * e_sdpa + 1e-5, (e_fast, e_sdpa)


def test_one_row_without_mask(calls):
    """One row, no padding: transformers passes no mask; the kernel attends to every key."""
    base = _llama(3)
    fast = copy.deepcopy(base)
    exact = copy.deepcopy(base).double()
    use_decode_attention(fast)
    ids = torch.randint(1, V, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        outs = [m(ids, use_cache=True) for m in (base, fast, exact)]
        nxt = outs[0].logits[:, -1:].argmax(-1)
        b, f, e = (m(nxt, **{_cache_kwarg(m.forward): o.past_key_values}).logits
                   for m, o in zip((base, fast, exact), outs))
    assert calls, "the decode step did not reach the kernel"
    assert (f.double() - e).abs().max() <= 4 * (b.double() - e).abs().max() + 1e-5


def test_autograd_and_other_models_keep_sdpa(calls):
    model = _llama()
    use_decode_attention(model)
    ids = torch.randint(1, V, (2, 1), generator=torch.Generator().manual_seed(2))
    model(ids).logits.sum().backward()  # grad enabled, weights require grad: SDPA, which has a backward
    assert not calls
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    eager = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         attn_implementation="eager"))
    assert not use_decode_attention(eager)
    assert eager.config._attn_implementation == "eager"


def test_saved_model_does_not_name_the_kernel(tmp_path):
    """A model saved after switching loads anywhere: its config.json names no costeer attention."""
    model = _llama()
    use_decode_attention(model)
    model.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "config.json")) as f:
        assert ATTENTION_NAME not in json.dumps(json.load(f))
