"""Attention, CrossAttention, Mlp, SwiGLU and DropPath against float64 references written here.

References follow the sources' formulas, not our code: timm/fb DiT attention (qkv output laid out
[q; k; v], heads contiguous; softmax(q k^T / sqrt(d)) v), PixArt cross-attention (kv laid out [k; v]),
timm Mlp with tanh-GELU, LLaMA SwiGLU, timm drop_path.
"""

import inspect
import math

import pytest
import torch

from adaln.nn.attention import Attention, CrossAttention
from adaln.nn.mlp import DropPath, Mlp, SwiGLU

F64 = torch.float64


def randomize_(module: torch.nn.Module) -> torch.nn.Module:
    """Overwrite every parameter (incl. norm weights that start at 1/0) with random values."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module


def ref_norm(x, kind, weight, bias, eps=1e-6):
    if kind is None:
        return x
    if kind == "layer":
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * weight + bias
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * weight


def ref_heads_attention(q, k, v, bias=None, keep=None):
    """q (B, H, N, d), k/v (B, H, M, d); softmax over keys of q k^T / sqrt(d) (+ bias, masked keys -inf)."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    if keep is not None:
        logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


def split_heads(t, heads):
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)


def merge_heads(t):
    b, h, n, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(b, n, h * d)


def norm_params(module, name):
    m = getattr(module, name)
    return getattr(m, "weight", None), getattr(m, "bias", None)


def ref_self_attention(attn, x, qk_norm, bias=None, keep=None):
    b, c = x.shape[0], x.shape[-1]
    h = attn.num_heads
    t = x.reshape(b, -1, c)
    qkv = t @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = (split_heads(qkv[..., i * c : (i + 1) * c], h) for i in range(3))
    q = ref_norm(q, qk_norm, *norm_params(attn, "q_norm"))
    k = ref_norm(k, qk_norm, *norm_params(attn, "k_norm"))
    out = merge_heads(ref_heads_attention(q, k, v, bias, keep))
    return (out @ attn.proj.weight.T + attn.proj.bias).reshape(x.shape)


def random_keep(b, n):
    keep = torch.rand(b, n) > 0.4
    keep[:, 0] = True  # every query needs at least one key
    return keep


@pytest.mark.parametrize("spatial", [(7,), (3, 4), (2, 3, 2)])
@pytest.mark.parametrize("qk_norm", [None, "layer", "rms"])
def test_attention_matches_float64_reference(spatial, qk_norm):
    b, c, h = 2, 12, 3
    n = math.prod(spatial)
    attn = randomize_(Attention(c, h, qk_norm=qk_norm)).to(F64)
    x = torch.randn(b, *spatial, c, dtype=F64)
    bias = torch.randn(b, h, n, n, dtype=F64)
    keep = random_keep(b, n)
    for kw, ref_kw in [
        ({}, {}),
        ({"bias": bias}, {"bias": bias}),
        ({"mask": keep}, {"keep": keep}),
        ({"bias": bias, "mask": keep}, {"bias": bias, "keep": keep}),
        ({"bias": bias[:1, :1], "mask": keep.reshape(b, *spatial)}, {"bias": bias[:1, :1], "keep": keep}),
    ]:
        out = attn(x, **kw)
        ref = ref_self_attention(attn, x, qk_norm, **ref_kw)
        assert out.shape == x.shape
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_attention_float32_close_to_float64():
    attn = randomize_(Attention(16, 4, qk_norm="rms"))
    x = torch.randn(3, 4, 5, 16)
    keep = random_keep(3, 20)
    out = attn(x, mask=keep)
    ref = ref_self_attention(attn.to(F64), x.to(F64), "rms", keep=keep)
    torch.testing.assert_close(out.to(F64), ref, rtol=0, atol=1e-5)


def test_attention_masked_keys_have_no_influence():
    attn = randomize_(Attention(8, 2))
    x = torch.randn(2, 6, 8)
    keep = torch.tensor([[1, 1, 0, 1, 0, 1], [1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    x2 = torch.where(keep[..., None], x, torch.randn_like(x) * 100)
    out, out2 = attn(x, mask=keep), attn(x2, mask=keep)
    torch.testing.assert_close(out[keep], out2[keep], rtol=0, atol=1e-5)


def test_attention_parameter_names_follow_timm_and_no_conditioning_kwarg():
    assert set(Attention(8, 2).state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    assert set(Attention(8, 2, qkv_bias=False).state_dict()) == {"qkv.weight", "proj.weight", "proj.bias"}
    assert {"q_norm.weight", "k_norm.weight"} <= set(Attention(8, 2, qk_norm="rms").state_dict())
    assert "conditioning" not in inspect.signature(Attention.forward).parameters


def test_cross_attention_matches_float64_reference():
    b, c, cc, h, m = 2, 12, 10, 3, 5
    attn = randomize_(CrossAttention(c, cc, h, qk_norm="layer")).to(F64)
    x = torch.randn(b, 3, 4, c, dtype=F64)
    context = torch.randn(b, m, cc, dtype=F64)
    keep = random_keep(b, m)
    out = attn(x, context, mask=keep)

    t = x.reshape(b, -1, c)
    q = split_heads(t @ attn.q_linear.weight.T + attn.q_linear.bias, h)
    kv = context @ attn.kv_linear.weight.T + attn.kv_linear.bias
    k, v = split_heads(kv[..., :c], h), split_heads(kv[..., c:], h)
    q = ref_norm(q, "layer", *norm_params(attn, "q_norm"))
    k = ref_norm(k, "layer", *norm_params(attn, "k_norm"))
    ref = merge_heads(ref_heads_attention(q, k, v, keep=keep)) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(out, ref.reshape(x.shape), rtol=0, atol=1e-12)
    assert set(attn.state_dict()) >= {"q_linear.weight", "kv_linear.weight", "proj.weight"}


def test_attention_bad_inputs():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Attention(10, 3)
    with pytest.raises(ValueError, match="qk_norm"):
        Attention(8, 2, qk_norm="batch")
    attn = Attention(8, 2)
    with pytest.raises(ValueError, match=r"x must be \(B, \*spatial, 8\)"):
        attn(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="x must have at least 3 dims"):
        attn(torch.randn(2, 8))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        attn(torch.ones(2, 5, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="bias must be"):
        attn(torch.randn(2, 5, 8), bias=torch.randn(2, 2, 5, 4))
    with pytest.raises(ValueError, match="bias must be"):
        attn(torch.randn(2, 5, 8), bias=torch.randn(3, 2, 5, 5))
    with pytest.raises(TypeError, match="mask must be a bool"):
        attn(torch.randn(2, 5, 8), mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="mask must be"):
        attn(torch.randn(2, 5, 8), mask=torch.ones(2, 4, dtype=torch.bool))
    cross = CrossAttention(8, 6, 2)
    with pytest.raises(ValueError, match="context must be"):
        cross(torch.randn(2, 5, 8), torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="context must be"):
        cross(torch.randn(2, 5, 8), torch.randn(3, 4, 6))


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize(
    "act, fn",
    [
        ("gelu_tanh", gelu_tanh),
        ("gelu", lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))),
        ("silu", lambda x: x / (1 + torch.exp(-x))),
        ("relu", lambda x: x.clamp_min(0)),
    ],
)
def test_mlp_matches_float64_reference(act, fn):
    mlp = randomize_(Mlp(6, 20, 5, act=act)).to(F64)
    x = torch.randn(2, 3, 4, 6, dtype=F64)
    ref = fn(x @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), ref, rtol=0, atol=1e-12)
    assert set(mlp.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_mlp_defaults_and_errors():
    mlp = Mlp(8)
    assert (mlp.fc1.out_features, mlp.fc2.out_features) == (8, 8)
    assert isinstance(mlp.act, torch.nn.GELU) and mlp.act.approximate == "tanh"
    with pytest.raises(ValueError, match="act must be one of"):
        Mlp(8, act="swish")
    with pytest.raises(ValueError, match="x must have 8 channels"):
        mlp(torch.randn(2, 7))


def test_swiglu_matches_float64_reference():
    ff = randomize_(SwiGLU(6, 16)).to(F64)
    x = torch.randn(2, 5, 6, dtype=F64)
    a, g = x @ ff.w1.weight.T, x @ ff.w3.weight.T
    ref = (a * torch.sigmoid(a) * g) @ ff.w2.weight.T
    torch.testing.assert_close(ff(x), ref, rtol=0, atol=1e-12)
    assert set(ff.state_dict()) == {"w1.weight", "w2.weight", "w3.weight"}
    with pytest.raises(ValueError, match="x must have 6 channels"):
        ff(torch.randn(2, 5))


def test_drop_path_statistics():
    p = 0.3
    dp = DropPath(p)
    x = torch.randn(20000, 3, 4)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    assert torch.equal(DropPath(0.0).train()(x), x)
    out = dp(x)
    dropped = (out == 0).flatten(1).all(1)
    kept = ~dropped
    # Whole samples are dropped (never part of one) at rate p: binomial std 0.0032 at n=20000.
    assert ((out == 0).flatten(1).any(1) == dropped).all()
    assert abs(dropped.float().mean().item() - p) < 0.02
    torch.testing.assert_close(out[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)
    # Expectation preserved: E[out] = x; the mean over samples of ones stays 1 within 4 sigma.
    ones = torch.ones(20000, 4)
    assert abs(dp(ones).mean().item() - 1.0) < 4 * math.sqrt(p / (1 - p) / 20000)


def test_drop_path_bad_p():
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
            DropPath(p)
