"""decode_attention (costeer_kernels/attention.py, csrc/attention_cpu.cpp): one query token per row
against its KV cache, grouped heads, against float64 of the same inputs on every CPU path."""
import pytest
import torch
import torch.nn.functional as F

from costeer_kernels import decode_attention

from .helpers import EPS32


def reference(q, k, v, mask, scale):
    """softmax(scale q k^T + mask) v in float64, the KV heads repeated for their query heads."""
    G = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = torch.einsum("bhd,bhld->bhl", q.double(), kk) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, :], float("-inf")) if mask.dtype == torch.bool else s + mask[:, None, :].double()
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a row with every key masked: zeros
    return torch.einsum("bhl,bhld->bhd", p, vv)


def sdpa32(q, k, v, mask, scale):
    G = q.shape[1] // k.shape[1]
    m = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q.float()[:, :, None], k.float().repeat_interleave(G, 1),
                                          v.float().repeat_interleave(G, 1), attn_mask=m, scale=scale)[:, :, 0]


def _check(out, q, k, v, mask, scale):
    """Within 4x SDPA's own float32 error plus 8 ulps of max |v| (a convex combination of the
    values: its rounding scales with them)."""
    ref = reference(q, k, v, mask, scale)
    eager = sdpa32(q, k, v, mask, scale).double()
    err = (out.double() - ref).abs()
    bound = 4 * (eager - ref).abs().nan_to_num(0.0) + 8 * EPS32 * v.double().abs().amax() + 1e-30
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"error {err.max().item():.3e} exceeds the bound (worst ratio {worst:.2f})"


def _inputs(B, Hq, Hkv, L, D, seed, spare=5, pad=True):
    """q [B, Hq, D] with a head stride of D (a [B, 1, Hq, D] projection transposed), k and v views of
    a larger cache buffer (as a KV cache grown in place), a bool mask with per-row left padding."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, Hq, D, generator=g).transpose(1, 2)[:, :, 0]
    kb = torch.randn(B, Hkv, L + spare, D, generator=g)
    vb = torch.randn(B, Hkv, L + spare, D, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    if pad:
        for b in range(B):
            mask[b, :(b * 7) % L] = False
    return q, kb[:, :, :L], vb[:, :, :L], mask


@pytest.mark.parametrize("B,Hq,Hkv,L,D", [(1, 9, 3, 1, 64), (2, 9, 3, 130, 64), (3, 4, 1, 77, 256), (1, 6, 6, 5, 17),
                                          (5, 8, 2, 257, 33), (16, 9, 3, 61, 64), (2, 2, 1, 1000, 8)])
def test_matches_float64(isa, B, Hq, Hkv, L, D):
    q, k, v, mask = _inputs(B, Hq, Hkv, L, D, seed=B * 100 + L)
    scale = D ** -0.5
    _check(decode_attention(q, k, v, mask, backend="cpu"), q, k, v, mask, scale)
    _check(decode_attention(q, k, v, None, 0.37, backend="cpu"), q, k, v, None, 0.37)


def test_float_mask_and_fully_masked_row(isa):
    q, k, v, _ = _inputs(3, 8, 2, 40, 32, seed=7)
    bias = torch.randn(3, 40)
    bias[0, :10] = float("-inf")
    bias[2] = float("-inf")  # nothing to attend to: zeros, not NaN
    out = decode_attention(q, k, v, bias, backend="cpu")
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    _check(out[:2], q[:2], k[:2], v[:2], bias[:2], 32 ** -0.5)
    none = torch.zeros(3, 40, dtype=torch.bool)
    assert torch.equal(decode_attention(q, k, v, none, backend="cpu"), torch.zeros(3, 8, 32))


def test_masked_keys_do_not_contribute(isa):
    """Padding keys holding huge or NaN values change nothing (they are skipped, not weighted by a
    tiny exponential)."""
    q, k, v, mask = _inputs(2, 4, 2, 30, 16, seed=3, pad=False)
    mask[:, :6] = False
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :6] = 1e30
    v2[:, :, :6] = float("nan")
    assert torch.equal(decode_attention(q, k, v, mask, backend="cpu")[:, :, :].isnan().any(), torch.tensor(False))
    a = decode_attention(q, k, v, mask, backend="cpu")
    b = decode_attention(q, k2.contiguous(), v2.contiguous(), mask, backend="cpu")
    assert not b.isnan().any()
    assert torch.allclose(a, b, atol=1e-6)


def test_nan_query_propagates(isa):
    q, k, v, mask = _inputs(2, 4, 2, 12, 16, seed=5)
    q[1, 0, 3] = float("nan")
    out = decode_attention(q, k, v, mask, backend="cpu")
    assert out[1, 0].isnan().all() and not out[0].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_half_precision(ext, dtype, backend):
    q, k, v, mask = _inputs(3, 9, 3, 50, 64, seed=11)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = decode_attention(q, k, v, mask, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape
    ref = reference(q, k, v, mask, 64 ** -0.5)
    tol = 4 * torch.finfo(dtype).eps * v.double().abs().amax() + 1e-3
    assert (out.double() - ref).abs().max() <= tol


def test_torch_backend_matches_float64():
    q, k, v, mask = _inputs(4, 9, 3, 45, 64, seed=2)
    _check(decode_attention(q, k, v, mask, backend="torch"), q, k, v, mask, 64 ** -0.5)


def test_errors_name_the_argument():
    q, k, v, mask = _inputs(2, 4, 2, 10, 8, seed=1)
    with pytest.raises(ValueError, match="q must be"):
        decode_attention(q[:, :, None], k, v)
    with pytest.raises(ValueError, match="k and v"):
        decode_attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="mask must be"):
        decode_attention(q, k, v, mask[:, :5])
    with pytest.raises(TypeError, match="mask must be"):
        decode_attention(q, k, v, mask.long())
    with pytest.raises(TypeError, match="q must be"):
        decode_attention(q.long(), k, v)
    with pytest.raises(TypeError, match="share one dtype"):
        decode_attention(q, k.double().float().half(), v)
    with pytest.raises(ValueError, match="scale must be finite"):
        decode_attention(q, k, v, scale=float("inf"))
    with pytest.raises(TypeError, match="scale must be"):
        decode_attention(q, k, v, scale="1")
    with pytest.raises(ValueError):
        decode_attention(q, k, v, backend="nope")


def test_registered_op_opcheck_and_compile(ext):
    q, k, v, mask = _inputs(2, 4, 2, 10, 8, seed=4)
    k, v = k.contiguous(), v.contiguous()
    torch.library.opcheck(torch.ops.costeer.decode_attention.default, (q.contiguous(), k, v, mask, 0.3, "cpu"))

    def f(q, k, v, mask):
        return decode_attention(q, k, v, mask) * 1.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(q, k, v, mask), f(q, k, v, mask))
