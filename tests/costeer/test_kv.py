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


def _play(kv, script):
    """The logits of the prefill and of each operation of ``script`` on ``kv``."""
    outs = [kv.prefill().logits]
    for op, arg in script:
        if op == "step":
            outs.append(kv.step(arg).logits)
        elif op == "extend":
            outs.append(kv.extend(arg).logits.reshape(kv.rows, -1))
        elif op == "rollback":
            kv.rollback(arg)
        elif op == "edit":
            outs.append(kv.edit(*arg).logits)
    return outs


def _run(model, script):
    kv = KVBatch(model, ROWS, pad_token_id=0)
    return kv, _play(kv, script)


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


# Rows that share prefixes (the system prompt of a chat template: both passes of a request and
# every request of a batch), one duplicate, and one row that is another row's prefix.
PREFIX = list(range(40, 70))
SHARED_ROWS = [PREFIX + [3, 4, 5, 6], PREFIX + [7, 8], PREFIX + [3, 4, 5, 6], PREFIX[:20], list(range(5, 12))]


def _positions(model, rows, packed, monkeypatch, script=()):
    """Token positions the prefill's forward ran, and the logits of the prefill and the script."""
    monkeypatch.setattr(kvmod, "_PACKED_PREFILL", packed)
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].numel()))
    try:
        outs = _play(KVBatch(model, rows, pad_token_id=0), script)
    finally:
        hook.remove()
    return seen[:1], outs


def test_packed_prefill_runs_each_shared_prefix_once(model, monkeypatch):
    R = len(SHARED_ROWS)
    script = [("step", [1] * R), ("extend", [[4, 5, 6]] * R), ("rollback", 2), ("step", [9] * R),
              ("edit", ([1, 0, 2, 0, 1], [[11, 12], [13], [], [14], [15]]))] + [("step", [2] * R)] * 40
    ran, packed = _positions(model, SHARED_ROWS, True, monkeypatch, script)
    distinct = len(PREFIX) + 4 + 2 + 7  # the prefix once, each row's own tail once, the duplicate not at all
    assert ran == [distinct]
    ran_padded, padded = _positions(model, SHARED_ROWS, False, monkeypatch, script)
    assert ran_padded == [R * len(SHARED_ROWS[0])]
    assert len(packed) == len(padded)
    for a, b in zip(packed, padded):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # The duplicate rows stay the same computation; the prefix row equals the model on its own tokens.
    torch.testing.assert_close(packed[0][0], packed[0][2], rtol=0, atol=0)
    alone = model(torch.tensor([PREFIX[:20]])).logits[0, -1]
    torch.testing.assert_close(packed[0][3], alone, rtol=0, atol=1e-5)


def test_packed_prefill_only_where_it_saves(model, monkeypatch):
    one, _ = _positions(model, [PREFIX], True, monkeypatch)
    assert one == [len(PREFIX)]  # one row: nothing to pack
    same_len, _ = _positions(model, [PREFIX, list(range(3, 33))], True, monkeypatch)
    assert same_len == [2 * len(PREFIX)]  # no padding and no shared prefix: the plain prefill
    _plain(monkeypatch)  # transformers' own layers: not re-laid out, the plain prefill
    plain, _ = _positions(model, SHARED_ROWS, True, monkeypatch)
    assert plain == [len(SHARED_ROWS) * len(SHARED_ROWS[0])]
