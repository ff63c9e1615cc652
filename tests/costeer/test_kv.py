"""costeer/kv.py: the KV cache's full-attention layers grow in place, and every operation the loop
uses on it (step, extend, rollback, edit) gives the logits of transformers' own cache."""
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from costeer import kv as kvmod
from costeer.kv import KVBatch


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


ROWS = [list(range(3, 40)), list(range(5, 12)), list(range(7, 30))]


def _plain(monkeypatch):
    """KVBatch on transformers' own DynamicCache (concatenating layers)."""
    monkeypatch.setattr(kvmod, "_new_cache", lambda m: DynamicCache(config=m.config))


def _run(model, script):
    kv = KVBatch(model, ROWS, pad_token_id=0)
    outs = [kv.prefill().logits]
    for op, arg in script:
        if op == "step":
            outs.append(kv.step(arg).logits)
        elif op == "extend":
            outs.append(kv.extend(arg).logits.reshape(len(ROWS), -1))
        elif op == "rollback":
            kv.rollback(arg)
        elif op == "edit":
            outs.append(kv.edit(*arg).logits)
    return kv, outs


SCRIPT = [("step", [1, 2, 3])] * 3 + [
    ("extend", [[4, 5, 6, 7]] * 3),
    ("rollback", 3),
    ("step", [8, 9, 10]),
    ("edit", ([1, 0, 2], [[11, 12], [13], []])),
] + [("step", [14, 15, 16])] * 70  # past the first buffer's capacity: one regrowth


def test_cache_layers_grow_in_place(model):
    kv = KVBatch(model, ROWS, pad_token_id=0)
    kv.prefill()
    layer = kv.cache.layers[0]
    assert type(layer).__name__ == "GrowingLayer"
    buf = layer._kbuf.data_ptr()
    kv.step([1, 2, 3])
    assert layer.keys.data_ptr() == buf and layer.keys.shape[-2] == 38  # appended in place, no copy
    assert layer._kbuf.shape[-2] >= 74  # geometric: spare room for the next steps


def test_same_logits_as_transformers_cache(model, monkeypatch):
    _, grown = _run(model, SCRIPT)
    _plain(monkeypatch)
    kv, plain = _run(model, SCRIPT)
    assert type(kv.cache.layers[0]).__name__ == "DynamicLayer"
    assert len(grown) == len(plain)
    for a, b in zip(grown, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_batch_selection_replacing_keys_is_copied_not_overwritten(model):
    kv = KVBatch(model, ROWS, pad_token_id=0)
    kv.prefill()
    kv.step([1, 2, 3])
    layer = kv.cache.layers[0]
    before = layer.keys.clone()
    layer.batch_select_indices(torch.tensor([0, 1, 2]))  # keys now a new tensor, not the buffer
    k, _ = layer.update(torch.zeros(3, 2, 1, 8), torch.zeros(3, 2, 1, 8))
    assert torch.equal(k[:, :, :-1], before) and not k[:, :, -1].any()
