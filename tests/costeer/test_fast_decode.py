"""costeer/fast_decode.py: the flat Llama decode step gives transformers' hidden states bit for bit.

Every comparison is against the same KVBatch operations with the flat step switched off
(``COSTEER_FLAT_DECODE=0``: transformers' forward, the same kernels underneath), ``torch.equal``:
the step is only worth having if it changes nothing but the time.
"""
import warnings

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from costeer import fast_decode
from costeer.fast_attention import use_decode_attention
from costeer.fast_linear import use_linear_rows
from costeer.kv import KVBatch
from costeer_kernels._extension import build_status

_BUILD = build_status()
pytestmark = pytest.mark.skipif(not _BUILD["loaded"], reason=f"the C++ extension is not loaded: {_BUILD['reason']}")
V = 211


def _llama(seed=0, kernels=True):
    # GQA (6 query heads on 2 KV heads), odd vocabulary: the shapes of SmolLM2 in miniature.
    cfg = LlamaConfig(vocab_size=V, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    if kernels:
        use_linear_rows(model)
        assert use_decode_attention(model)
    return model


ROWS = [list(range(3, 40)), list(range(5, 12)), list(range(7, 30))]
SCRIPT = [("step", [1, 2, 3])] * 3 + [
    ("extend", [[4, 5, 6, 7]] * 3),
    ("rollback", 3),
    ("step", [8, 9, 10]),
    ("edit", ([1, 0, 2], [[11], [13], []])),  # one position: a decode step with a masked hole
    ("edit", ([0, 2, 0], [[12, 17], [18], [19]])),
    ("step", [20, 21, 22]),
] + [("step", [14, 15, 16])] * 12


def _first(arg, r):
    """``SCRIPT``'s argument for the first ``r`` rows."""
    if isinstance(arg, tuple):  # edit: (rollback, tokens)
        return tuple(a[:r] for a in arg)
    return arg[:r] if isinstance(arg, list) else arg


def _play(model, rows, script, packed=False):
    kv = KVBatch(model, rows, pad_token_id=0)
    outs = [kv.prefill(head=False).hidden]
    for op, arg in script:
        if op == "step":
            outs.append(kv.step(arg, head=False).hidden)
        elif op == "extend":
            outs.append(kv.extend(arg).hidden.reshape(kv.rows, -1))
        elif op == "rollback":
            kv.rollback(arg)
        elif op == "edit":
            outs.append(kv.edit(*arg, head=False).hidden)
    return kv, outs


@pytest.fixture
def steps(monkeypatch):
    """Counts the flat step's calls."""
    seen = []
    real = fast_decode.LlamaDecodeStep.step

    def counted(self, ids, *args):
        seen.append(tuple(ids.shape))
        return real(self, ids, *args)

    monkeypatch.setattr(fast_decode.LlamaDecodeStep, "step", counted)
    return seen


def _reference(model, rows, script, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("COSTEER_FLAT_DECODE", "0")
        return _play(model, rows, script)[1]


@pytest.mark.parametrize("rows", [ROWS, ROWS[:1], [list(range(2, 9))] * 2], ids=["padded3", "one", "same2"])
def test_flat_step_is_transformers_bit_for_bit(rows, monkeypatch, steps):
    model = _llama()
    script = [(op, _first(a, len(rows))) for op, a in SCRIPT]
    want = _reference(model, rows, script, monkeypatch)
    assert not steps and fast_decode.checked(model) is None  # switched off: never ran, nothing recorded
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _, got = _play(model, rows, script)
    assert fast_decode.checked(model) is True
    decode_ops = sum(op == "step" or (op == "edit" and max(map(len, a[1])) == 1) for op, a in script)
    assert len(steps) == decode_ops  # every one-token step, the first one as the check
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"output {i}: max |diff| {(g - w).abs().max().item():.3g}"


def test_flat_step_after_packed_prefill(monkeypatch, steps):
    # Rows sharing a prefix are prefilled once per shared part (KVBatch._prefill_packed): the cache
    # the flat step appends to was built by index_select, not by a plain forward.
    model = _llama(seed=3)
    head = list(range(3, 60))
    rows = [head + [61, 62, 63], head + [64], head + [65, 66]]
    script = [("step", [1, 2, 3])] * 6
    want = _reference(model, rows, script, monkeypatch)
    _, got = _play(model, rows, script)
    assert len(steps) == 6 and fast_decode.checked(model) is True
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def _refused(model, script, want, match):
    """Plays ``script`` expecting the flat step to be refused with a RuntimeWarning matching
    ``match``: the outputs are transformers' (``want``), the model keeps its forward for good."""
    with pytest.warns(RuntimeWarning, match=match):
        _, got = _play(model, ROWS, script)
    assert fast_decode.checked(model) is False
    for g, w in zip(got, want):
        assert torch.equal(g, w)  # the refused step's output was never returned
    assert fast_decode.decode_step_for(model) is None  # refused for good on this model


def test_a_step_that_differs_is_refused_with_a_warning(monkeypatch, steps):
    model = _llama(seed=1)
    want = _reference(model, ROWS, SCRIPT[:4], monkeypatch)
    real_norm = fast_decode._rms_norm
    monkeypatch.setattr(fast_decode, "_rms_norm", lambda mod, x: real_norm(mod, x) * (1 + 2 ** -20))
    _refused(model, SCRIPT[:4], want, "transformers' own forward is used")
    assert len(steps) == 1  # the check only: afterwards transformers' forward


def test_where_the_flat_step_does_not_apply():
    assert fast_decode.decode_step_for(_llama(kernels=False)) is None  # SDPA, not the decode kernel
    hooked = _llama()
    hooked.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert fast_decode.decode_step_for(hooked) is None  # a hook would be skipped: not allowed
    assert fast_decode.decode_step_for(_llama().double()) is None
    cfg = Gemma3TextConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, attn_implementation="sdpa")
    gemma = Gemma3ForCausalLM(cfg).eval()
    use_decode_attention(gemma)
    assert fast_decode.decode_step_for(gemma) is None
    assert isinstance(fast_decode.decode_step_for(_llama()), fast_decode.LlamaDecodeStep)


def test_global_hooks_and_training_mode_use_transformers(monkeypatch, steps):
    model = _llama(seed=2)
    want = _reference(model, ROWS, SCRIPT[:3], monkeypatch)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        _, got = _play(model, ROWS, SCRIPT[:3])
    finally:
        handle.remove()
    assert not steps and fast_decode.checked(model) is None
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_embedded_smollm2_bit_for_bit(smol, monkeypatch, steps):
    tok, model = smol.tokenizer, smol.model
    if fast_decode.decode_step_for(model) is None:
        pytest.skip("the embedded model does not take the flat step here (no decode-attention kernel)")
    rows = [tok("The capital of France is")["input_ids"], tok("Write a haiku about the sea, please:")["input_ids"]]
    script = [("step", [28, 29])] * 4 + [("edit", ([1, 0], [[30], [31]]))] + [("step", [32, 33])] * 3
    want = _reference(model, rows, script, monkeypatch)
    _, got = _play(model, rows, script)
    assert fast_decode.checked(model) is True and len(steps) == 8
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_a_step_that_raises_is_refused_and_the_cache_restored(monkeypatch, steps):
    # Fails in the middle of the layers: the layers it already appended to are rolled back.
    model = _llama(seed=4)
    want = _reference(model, ROWS, SCRIPT[:5], monkeypatch)
    real_rotate = fast_decode._rotate_half
    calls = []

    def failing(x):
        calls.append(1)
        if len(calls) > 2:  # layer 0's queries and keys, then the error in layer 1
            raise RuntimeError("changed module layout")
        return real_rotate(x)

    monkeypatch.setattr(fast_decode, "_rotate_half", failing)
    _refused(model, SCRIPT[:5], want, "failed .RuntimeError: changed module layout")
