"""costeer.fast_linear: a model's nn.Linear layers on the few-row kernel for decode-sized calls."""
import copy

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from costeer.fast_linear import DEFAULT_MAX_ROWS, use_linear_rows
from costeer_kernels._extension import build_status

_BUILD = build_status()
pytestmark = pytest.mark.skipif(not _BUILD["loaded"], reason=f"the C++ extension is not loaded: {_BUILD['reason']}")


def _llama(seed=0):
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()



def _step_logits(model, plain, seed):
    """The logits of one decode step after a 3 x 7 prefill of random ids, from each model."""
    ids = torch.randint(0, 300, (3, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        oq, op = model(ids, use_cache=True), plain(ids, use_cache=True)
        nxt = op.logits[:, -1:].argmax(-1)
        return (model(nxt, past_key_values=oq.past_key_values).logits,
                plain(nxt, past_key_values=op.past_key_values).logits)

def test_routes_every_plain_linear_and_keeps_the_state_dict():
    model = _llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n = use_linear_rows(model)
    assert n == sum(type(m) is nn.Linear for m in model.modules()) == 2 * 7 + 1
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_decode_steps_match_blas_and_float64():
    """Greedy decode of 3 rows (the co-batched pair's shape) with and without the kernel: against a
    float64 copy of the model, the kernel's logits are within 4x BLAS's own float32 error."""
    base = _llama()
    fast = copy.deepcopy(base)
    exact = copy.deepcopy(base).double()
    assert use_linear_rows(fast) > 0
    ids = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ob, of, oe = base(ids, use_cache=True), fast(ids, use_cache=True), exact(ids, use_cache=True)
        for _ in range(4):
            nxt = ob.logits[:, -1:].argmax(-1)
            ob = base(nxt, past_key_values=ob.past_key_values, use_cache=True)
            of = fast(nxt, past_key_values=of.past_key_values, use_cache=True)
            oe = exact(nxt, past_key_values=oe.past_key_values, use_cache=True)
            e_blas = (ob.logits.double() - oe.logits).abs().max().item()
            e_fast = (of.logits.double() - oe.logits).abs().max().item()
            assert e_fast <= 4 * e_blas + 1e-5, (e_fast, e_blas)


def test_large_calls_grad_and_half_precision_keep_f_linear():
    lin = nn.Linear(16, 8)
    use_linear_rows(lin, max_rows=4)
    x = torch.randn(5, 16)  # 5 rows > max_rows: F.linear, bit for bit
    with torch.no_grad():
        assert torch.equal(lin(x), nn.functional.linear(x, lin.weight, lin.bias))
    # autograd: the kernel has no backward, so training goes through F.linear and gets gradients
    y = lin(torch.randn(2, 16))
    y.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.shape == (8, 16)
    half = nn.Linear(16, 8).bfloat16()
    use_linear_rows(half)
    with torch.no_grad():
        xb = torch.randn(2, 16, dtype=torch.bfloat16)
        assert torch.equal(half(xb), nn.functional.linear(xb, half.weight, half.bias))


def test_small_call_uses_the_kernel(monkeypatch):
    from costeer_kernels import _extension

    seen = []
    real = _extension.linear_cpp
    monkeypatch.setattr(_extension, "linear_cpp", lambda *a: seen.append(a[0].shape) or real(*a))
    lin = nn.Linear(16, 8)
    use_linear_rows(lin)
    with torch.no_grad():
        y = lin(torch.randn(1, 3, 16))
    assert y.shape == (1, 3, 8) and seen == [(3, 16)]


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (2.5, TypeError), (True, TypeError)])
def test_max_rows_is_checked(bad, exc):
    with pytest.raises(exc, match="max_rows"):
        use_linear_rows(nn.Linear(2, 2), max_rows=bad)


def test_load_model_routes_cpu_models_unless_disabled(monkeypatch, tmp_path):
    from costeer import models

    from .tiny import make_tiny_model

    folder = make_tiny_model(str(tmp_path / "tiny"))
    monkeypatch.setattr(models, "_CACHE", {})
    m = models.load_model(folder)
    assert all(type(l.forward).__name__ == "_FewRowForward" for l in m.model.modules() if type(l) is nn.Linear)
    monkeypatch.setattr(models, "_CACHE", {})
    monkeypatch.setenv("COSTEER_LINEAR_ROWS", "0")
    m = models.load_model(folder)
    assert not any(type(l.forward).__name__ == "_FewRowForward" for l in m.model.modules() if type(l) is nn.Linear)
    assert DEFAULT_MAX_ROWS >= 3


def test_attached_q8_0_head_is_read_and_dropped_when_the_weight_changes(monkeypatch):
    """A head given the Q8_0 blocks of its own (exactly representable) weight: the decode steps' logits
    are bit for bit those of the float32 weight, the kernel gets the blocks, and a weight written in
    place, converted or replaced no longer uses them."""
    from costeer.fast_linear import attach_q8_0, q8_0_weight
    from costeer_kernels import _extension
    from costeer_kernels.q8_0 import dequantize_q8_0, quantize_q8_0

    model = _llama(3)
    head = model.get_output_embeddings()
    with torch.no_grad():
        blocks = quantize_q8_0(head.weight)
        head.weight.copy_(dequantize_q8_0(blocks))  # the GGUF case: the float32 head IS d * q
    plain = copy.deepcopy(model)
    use_linear_rows(model)
    use_linear_rows(plain)
    attach_q8_0(head, blocks)
    assert q8_0_weight(head) is not None and q8_0_weight(plain.get_output_embeddings()) is None
    seen = []
    real = _extension.linear_cpp
    monkeypatch.setattr(_extension, "linear_cpp", lambda x, w, b: seen.append(w.dtype) or real(x, w, b))
    use_linear_rows(model)  # re-bind the patched kernel
    assert torch.equal(*_step_logits(model, plain, seed=2))
    assert torch.uint8 in seen
    with torch.no_grad():
        head.weight.mul_(2.0)  # written in place: the blocks no longer hold its values
    assert q8_0_weight(head) is None
    head.weight = nn.Parameter(torch.randn(300, 64))
    assert q8_0_weight(head) is None
    with pytest.raises(ValueError, match="blocks hold a"):
        attach_q8_0(head, blocks[:, :34])
    with pytest.raises(TypeError, match="uint8"):
        attach_q8_0(head, torch.randn(300, 64))


def test_attached_q4_1_layers_give_the_float32_logits(monkeypatch):
    """Every layer of a model given the Q4_1 blocks of its own (exactly representable) weight, as the
    model cache does for a GGUF model's layers: the kernel reads the blocks and the decode steps'
    logits are bit for bit those of the float32 weights; blocks of the wrong shape are refused."""
    from costeer.fast_linear import attach_blocks, attached_blocks, detach_blocks, q8_0_weight
    from costeer_kernels import _extension
    from costeer_kernels.q4_1 import dequantize_q4_1, quantize_q4_1

    model = _llama(4)
    layers = [m for m in model.model.modules() if type(m) is nn.Linear]
    with torch.no_grad():
        for lin in layers:
            lin.weight.copy_(dequantize_q4_1(quantize_q4_1(lin.weight)))  # the GGUF case
    plain = copy.deepcopy(model)
    for lin in layers:
        assert attach_blocks(lin, quantize_q4_1(lin.weight)) == "q4_1"
    assert all(attached_blocks(lin)[1] == "q4_1" for lin in layers)
    assert q8_0_weight(layers[0]) is None  # Q4_1 blocks are no Q8_0 head for steer_from_hidden
    seen = []
    real = _extension.linear_cpp
    monkeypatch.setattr(_extension, "linear_cpp", lambda x, w, b: seen.append(w.dtype) or real(x, w, b))
    if use_linear_rows(model) == 0 or use_linear_rows(plain) == 0:
        pytest.skip("the C++ extension is not loaded")
    assert torch.equal(*_step_logits(model, plain, seed=5))
    assert seen.count(torch.uint8) >= 2 * len(layers)  # prefill (7 rows x 3) and the step
    # In-place writes: one through the parameter drops the blocks; one through .data (its own version
    # counter) is not seen, and detach_blocks makes the layer read its float32 weight again.
    lin, x = layers[0], torch.randn(2, layers[0].in_features)
    with torch.no_grad():
        lin.weight.mul_(1.0)
        assert attached_blocks(lin) is None
        attach_blocks(lin, quantize_q4_1(lin.weight))
        lin.weight.data.mul_(2.0)
        assert attached_blocks(lin) is not None  # documented: not detectable
        assert detach_blocks(lin) and not detach_blocks(lin)
        assert attached_blocks(lin) is None
        assert torch.equal(lin(x), real(x, lin.weight, lin.bias))
    with pytest.raises(ValueError, match="Q4_1 \\[N, 40\\], Q5_0 \\[N, 44\\] or Q8_0 \\[N, 68\\]"):
        attach_blocks(layers[0], torch.zeros(layers[0].out_features, 41, dtype=torch.uint8))
    with pytest.raises(ValueError, match="blocks hold 3 rows"):
        attach_blocks(layers[0], torch.zeros(3, 40, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        attach_blocks(layers[0], torch.randn(64, 64))


def test_layers_with_blocks_take_the_kernel_up_to_block_rows(monkeypatch):
    """A layer with GGUF blocks attached takes the kernel for calls of up to block_rows rows
    (prefill included), reading the blocks: the kernel's result, not BLAS's; beyond it, and for a
    layer without blocks beyond max_rows, F.linear bit for bit."""
    from costeer.fast_linear import attach_blocks
    from costeer_kernels import linear_rows
    from costeer_kernels.q4_1 import dequantize_q4_1, quantize_q4_1

    lin, plain = nn.Linear(64, 24), nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight.copy_(dequantize_q4_1(quantize_q4_1(lin.weight)))
    from costeer_kernels import _extension

    blocks = quantize_q4_1(lin.weight)
    attach_blocks(lin, blocks)
    x = torch.randn(40, 64)
    seen = []
    real = _extension.linear_cpp
    monkeypatch.setattr(_extension, "linear_cpp", lambda a, w, b: seen.append((a.shape[0], w.dtype)) or real(a, w, b))
    with torch.no_grad():
        use_linear_rows(lin, max_rows=4, block_rows=None)
        use_linear_rows(plain, max_rows=4, block_rows=None)
        assert torch.equal(lin(x), real(x, blocks, lin.bias)) and seen == [(40, torch.uint8)]
        assert torch.equal(plain(x), nn.functional.linear(x, plain.weight, plain.bias))  # no blocks
        use_linear_rows(lin, max_rows=4, block_rows=16)
        assert torch.equal(lin(x), nn.functional.linear(x, lin.weight, lin.bias))  # 40 > 16 rows
        assert torch.equal(lin(x[:16]), real(x[:16], blocks, lin.bias))
        assert seen == [(40, torch.uint8), (16, torch.uint8)]
        assert torch.equal(real(x[:16], blocks, lin.bias), linear_rows(x[:16], blocks, lin.bias, backend="cpu"))


def test_default_block_rows(monkeypatch):
    from costeer import fast_linear

    monkeypatch.setenv("COSTEER_BLOCK_ROWS", "all")
    assert fast_linear.default_block_rows() is None
    monkeypatch.setenv("COSTEER_BLOCK_ROWS", "48")
    assert fast_linear.default_block_rows() == 48
    for bad in ("0", "many", "-3"):
        monkeypatch.setenv("COSTEER_BLOCK_ROWS", bad)
        with pytest.raises(ValueError, match="COSTEER_BLOCK_ROWS must be an int >= 1 or \"all\""):
            fast_linear.default_block_rows()
    monkeypatch.delenv("COSTEER_BLOCK_ROWS")
    monkeypatch.setattr(fast_linear.platform, "machine", lambda: "x86_64")
    from costeer_kernels import _extension

    monkeypatch.setattr(_extension, "cpu_vendor", lambda: "AuthenticAMD")
    assert fast_linear.default_block_rows(8) is None
    monkeypatch.setattr(_extension, "cpu_vendor", lambda: "GenuineIntel")
    assert fast_linear.default_block_rows(8) == 8
    for bad in (0, True, 2.5, "x"):
        with pytest.raises(ValueError, match="block_rows must be"):
            use_linear_rows(nn.Linear(2, 2), block_rows=bad)
