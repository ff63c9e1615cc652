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
