"""Conditioners and ConditionalDiT against independent float64 formulas (SD3 pooled projection, PixArt
caption embedder and cross-attention block order, DiT AdaLN-Zero), null values, dropout rates, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adaln.diffusion import ClassifierFreeGuidance
from adaln.models.conditioning import (
    ConditionalDiT,
    CrossDiTBlock,
    TokenEmbedder,
    VectorEmbedder,
    conditional_dit_edm_denoiser,
    drop_samples,
)
from adaln.models.dit import DiT
from adaln.nn.blocks import DiTBlock
from adaln.nn.embeddings import LabelEmbedding

F64 = torch.float64
HIDDEN, HEADS, VEC, TOK = 32, 4, 12, 10


def randomize_(module: torch.nn.Module, std: float = 0.3, skip: tuple[str, ...] = ()) -> torch.nn.Module:
    """Random non-zero parameters everywhere (zero-initialised weights hide errors), except ``skip``."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not any(name.startswith(s) for s in skip):
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype) * std)
    return module


def model(**kw) -> ConditionalDiT:
    defaults = dict(num_classes=10, vec_dim=VEC, token_dim=TOK)
    return ConditionalDiT(8, 2, 3, HIDDEN, 2, HEADS, **{**defaults, **kw})


def inputs(b: int = 3, m: int = 5, dtype=F64):
    x = torch.randn(b, 3, 8, 8, dtype=dtype)
    t = torch.randn(b, dtype=dtype) * 300
    y = torch.randint(0, 10, (b,))
    vec = torch.randn(b, VEC, dtype=dtype)
    tokens = torch.randn(b, m, TOK, dtype=dtype)
    mask = torch.ones(b, m, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, 1:] = False
    return x, t, dict(y=y, vec=vec, tokens=tokens, token_mask=mask)


# ---- float64 references of the source formulas, written from the papers / source files -------------


def ref_ln(x):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-6)


def ref_linear(x, lin):
    return x @ lin.weight.to(F64).T + lin.bias.to(F64)


def ref_gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def ref_mha(q, k, v, heads, keep=None):
    """softmax(q k^T / sqrt(d)) v per head; q (B, N, C), k/v (B, M, C); keep (B, M) bool."""
    b, n, c = q.shape
    d = c // heads
    q, k, v = (z.reshape(b, z.shape[1], heads, d).transpose(1, 2) for z in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    if keep is not None:
        logits = logits.masked_fill(~keep[:, None, None, :], -math.inf)
    return (torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(b, n, c)


def ref_cross_block(blk: CrossDiTBlock, x, c, context, keep):
    """PixArt block order with DiT AdaLN-Zero on every branch: self-attn -> cross-attn -> MLP."""
    mod = ref_linear(F.silu(c), blk.adaLN_modulation.proj[1])
    sh1, sc1, g1, sh2, sc2, g2 = (m[:, None] for m in mod.chunk(6, -1))
    sh_c, sc_c, g_c = (m[:, None] for m in ref_linear(F.silu(c), blk.cross_modulation.proj[1]).chunk(3, -1))
    h = ref_ln(x) * (1 + sc1) + sh1
    q, k, v = ref_linear(h, blk.attn.qkv).chunk(3, -1)
    x = x + g1 * ref_linear(ref_mha(q, k, v, HEADS), blk.attn.proj)
    h = ref_ln(x) * (1 + sc_c) + sh_c
    k, v = ref_linear(context, blk.cross_attn.kv_linear).chunk(2, -1)
    x = x + g_c * ref_linear(ref_mha(ref_linear(h, blk.cross_attn.q_linear), k, v, HEADS, keep), blk.cross_attn.proj)
    h = ref_ln(x) * (1 + sc2) + sh2
    return x + g2 * ref_linear(ref_gelu_tanh(ref_linear(h, blk.mlp.fc1)), blk.mlp.fc2)


def ref_vector_embedder(emb: VectorEmbedder, vec):
    """SD3 PixArtAlphaTextProjection(act_fn='silu'): linear_2(silu(linear_1(vec)))."""
    return ref_linear(F.silu(ref_linear(vec, emb.linear_1)), emb.linear_2)


def ref_token_embedder(emb: TokenEmbedder, tokens):
    """PixArt CaptionEmbedder y_proj (Mlp, tanh-GELU) on [null token; tokens]."""
    seq = torch.cat([emb.null_token.to(F64).expand(tokens.shape[0], 1, -1), tokens], 1)
    return ref_linear(ref_gelu_tanh(ref_linear(seq, emb.y_proj.fc1)), emb.y_proj.fc2)


def ref_timestep(t, mlp):
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=F64) / half)
    args = t[:, None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return ref_linear(F.silu(ref_linear(emb, mlp[0])), mlp[2])


def ref_model(m: ConditionalDiT, x, t, y, vec, tokens, mask):
    """The whole ConditionalDiT: patchify + sin-cos positions, t + y + pooled condition, blocks, final."""
    p = m.patch_size
    h = F.conv2d(x, m.x_embedder.proj.weight.to(F64), m.x_embedder.proj.bias.to(F64), stride=p)
    h = h.flatten(2).transpose(1, 2) + m.pos_embed.to(F64)
    c = ref_timestep(t, m.t_embedder.mlp) + m.y_embedder.embedding_table.weight.to(F64)[y]
    c = c + ref_vector_embedder(m.vec_embedder, vec)
    context = ref_token_embedder(m.token_embedder, tokens)
    keep = torch.cat([torch.ones(x.shape[0], 1, dtype=torch.bool), mask], 1)
    for blk in m.blocks:
        h = ref_cross_block(blk, h, c, context, keep)
    shift, scale = ref_linear(F.silu(c), m.final_layer.adaLN_modulation.proj[1]).chunk(2, -1)
    out = ref_linear(ref_ln(h) * (1 + scale[:, None]) + shift[:, None], m.final_layer.linear)
    gh, gw = m.grid_size
    out = out.reshape(x.shape[0], gh, gw, p, p, m.out_channels).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(x.shape[0], m.out_channels, gh * p, gw * p)


# ---- numerics against the references --------------------------------------------------------------


def test_cross_block_matches_float64_reference():
    blk = randomize_(CrossDiTBlock(HIDDEN, HEADS)).double()
    x, c = torch.randn(2, 16, HIDDEN, dtype=F64), torch.randn(2, HIDDEN, dtype=F64)
    context = torch.randn(2, 6, HIDDEN, dtype=F64)
    keep = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    ref = ref_cross_block(blk, x, c, context, keep)
    out = blk(x, c, context, keep)
    err = (out - ref).abs().max().item()
    assert err < 1e-12, err
    # float32 module against the float64 reference
    out32 = blk.float()(x.float(), c.float(), context.float(), keep)
    assert (out32.double() - ref).abs().max().item() < 1e-4


def test_embedders_match_float64_reference():
    vec_emb = randomize_(VectorEmbedder(VEC, HIDDEN, 0.0)).double()
    vec = torch.randn(4, VEC, dtype=F64)
    assert (vec_emb(vec) - ref_vector_embedder(vec_emb, vec)).abs().max().item() < 1e-12
    tok_emb = randomize_(TokenEmbedder(TOK, HIDDEN, 0.0)).double()
    tokens = torch.randn(4, 7, TOK, dtype=F64)
    context, keep = tok_emb(tokens)
    assert (context - ref_token_embedder(tok_emb, tokens)).abs().max().item() < 1e-12
    assert keep.shape == (4, 8) and keep.all()


def test_conditional_dit_matches_float64_reference():
    m = randomize_(model(), std=0.2).double().eval()
    x, t, cond = inputs()
    ref = ref_model(m, x, t, cond["y"], cond["vec"], cond["tokens"], cond["token_mask"])
    out = m(x, t, **cond)
    err = (out - ref).abs().max().item()
    assert out.shape == (3, 3, 8, 8)
    assert err < 1e-11, err


def test_class_only_model_equals_dit_with_the_same_weights():
    """With y only, ConditionalDiT is DiT (tested against fb DiT's formulas in test_dit.py)."""
    m = randomize_(ConditionalDiT(8, 2, 3, HIDDEN, 2, HEADS, num_classes=10)).double().eval()
    dit = DiT(8, 2, 3, HIDDEN, 2, HEADS, num_classes=10, learn_sigma=False).double().eval()
    dit.load_state_dict(m.state_dict())
    x, t, cond = inputs()
    torch.testing.assert_close(m(x, t, y=cond["y"]), dit(x, t, cond["y"]), rtol=0, atol=1e-13)


def test_edm_denoiser_is_edm_preconditioning():
    m = randomize_(model(), std=0.2).double().eval()
    x, _, cond = inputs()
    sigma = torch.tensor([0.1, 1.0, 20.0], dtype=F64)
    sd = 0.5
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    c_in = 1 / (sigma**2 + sd**2).sqrt()
    v = lambda s: s[:, None, None, None]  # noqa: E731
    ref = v(c_skip) * x + v(c_out) * m(v(c_in) * x, 1000 * sigma.log() / 4, **cond)
    torch.testing.assert_close(conditional_dit_edm_denoiser(m)(x, sigma, **cond), ref, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="learn_sigma"):
        conditional_dit_edm_denoiser(model(learn_sigma=True))


# ---- identity at init, masks, nulls --------------------------------------------------------------


def test_cross_attention_sub_block_is_identity_at_init():
    """Zero cross gate: the block equals the plain DiT block with the same (random) weights."""
    blk = randomize_(CrossDiTBlock(HIDDEN, HEADS), skip=("cross_modulation",)).double()
    assert not blk.cross_modulation.proj[1].weight.any() and not blk.cross_modulation.proj[1].bias.any()
    dit_blk = DiTBlock(HIDDEN, HEADS).double()
    missing, unexpected = dit_blk.load_state_dict(blk.state_dict(), strict=False)
    assert not missing and all(k.startswith(("cross_attn.", "cross_modulation.")) for k in unexpected)
    x, c = torch.randn(2, 16, HIDDEN, dtype=F64), torch.randn(2, HIDDEN, dtype=F64)
    context = torch.randn(2, 5, HIDDEN, dtype=F64) * 10
    assert torch.equal(blk(x, c, context), dit_blk(x, c))
    # and a whole model with zero cross gates ignores its tokens
    m = randomize_(model(), skip=tuple(f"blocks.{i}.cross_modulation" for i in range(2))).double()
    x, t, cond = inputs()
    other = {**cond, "tokens": torch.randn_like(cond["tokens"]) * 5, "token_mask": torch.ones_like(cond["token_mask"])}
    assert torch.equal(m(x, t, **cond), m(x, t, **other))
    # a freshly built model predicts exactly zero (adaLN-Zero everywhere + zero final layer)
    assert not model()(x.float(), t.float(), **{**cond, "vec": cond["vec"].float(),
                                                "tokens": cond["tokens"].float()}).any()


def test_padding_tokens_change_nothing():
    m = randomize_(model(), std=0.2).double().eval()
    x, t, cond = inputs(m=6)
    mask = cond["token_mask"]
    base = m(x, t, **cond)
    changed = cond["tokens"].clone()
    changed[~mask] = torch.randn(int((~mask).sum()), TOK, dtype=F64) * 100
    torch.testing.assert_close(m(x, t, **{**cond, "tokens": changed}), base, rtol=0, atol=1e-13)
    # a real token does matter
    real = cond["tokens"].clone()
    real[0, 0] += 1.0
    assert (m(x, t, **{**cond, "tokens": real}) - base).abs().max() > 1e-6
    # extra padding positions at the end change nothing either
    pad_tokens = torch.cat([cond["tokens"], torch.randn(3, 4, TOK, dtype=F64)], 1)
    pad_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1)
    torch.testing.assert_close(m(x, t, **{**cond, "tokens": pad_tokens, "token_mask": pad_mask}), base,
                               rtol=0, atol=1e-13)


def test_null_conditioning_reproduces_the_unconditional_path():
    m = randomize_(model(), std=0.2).double().eval()
    x, t, cond = inputs()
    uncond = m(x, t)  # every conditioner missing -> its null
    nulls = dict(y=torch.full((3,), 10), vec=torch.zeros(3, VEC, dtype=F64), tokens=cond["tokens"],
                 token_mask=torch.zeros_like(cond["token_mask"]))
    torch.testing.assert_close(m(x, t, **nulls), uncond, rtol=0, atol=1e-13)
    assert (m(x, t, **cond) - uncond).abs().max() > 1e-6
    # the nulls model.null_cond() names, through ClassifierFreeGuidance's batched call
    assert m.null_cond() == {"y": 10, "vec": 0.0, "token_mask": False}
    d = conditional_dit_edm_denoiser(m)
    sigma = torch.tensor([0.3, 2.0, 9.0], dtype=F64)
    d_u, d_c = d(x, sigma), d(x, sigma, **cond)
    torch.testing.assert_close(ClassifierFreeGuidance(d, 0.0, null_cond=m.null_cond())(x, sigma, **cond), d_u,
                               rtol=0, atol=1e-12)
    guided = ClassifierFreeGuidance(d, 3.0, null_cond=m.null_cond())(x, sigma, **cond)
    torch.testing.assert_close(guided, d_u + 3.0 * (d_c - d_u), rtol=0, atol=1e-12)
    # one conditioner nulled at a time
    assert m.null_cond(["vec"]) == {"vec": 0.0}
    assert m.null_cond(["token_mask"]) == {"token_mask": False}


def test_time_only_model_has_no_conditioners():
    m = randomize_(ConditionalDiT(8, 2, 3, HIDDEN, 2, HEADS)).double()
    x, t, _ = inputs()
    assert m.conditioners == () and m.null_cond() == {}
    assert m(x, t).shape == (3, 3, 8, 8)
    assert all(type(b) is DiTBlock for b in m.blocks)


def test_runs_in_bfloat16_autocast_and_float64():
    m = randomize_(model(), std=0.1)
    x, t, cond = inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, t, **cond)
    ref = m(x, t, **cond)
    assert torch.isfinite(out).all() and (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
    assert m.double()(x.double(), t.double(), **{**cond, "vec": cond["vec"].double(),
                                                 "tokens": cond["tokens"].double()}).dtype == F64


# ---- dropout ---------------------------------------------------------------------------------------


def _within(frac: float, p: float, n: int) -> bool:
    return abs(frac - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12  # 5 binomial standard deviations


@pytest.mark.parametrize("p", [0.0, 0.15, 0.5, 1.0])
def test_each_conditioner_honours_its_dropout_rate(p):
    n = 20000
    g = torch.Generator().manual_seed(7)
    labels = LabelEmbedding(10, 4, p if p > 0 else 0.1)
    labels.dropout_prob = p
    dropped_y = labels.token_drop(torch.randint(0, 10, (n,)), generator=g) == 10
    vec_emb = VectorEmbedder(3, 4, p)
    dropped_vec = (vec_emb.token_drop(torch.rand(n, 3) + 0.1, generator=g) == 0).all(1)
    tok_emb = TokenEmbedder(3, 4, p).train()
    _, keep = tok_emb(torch.randn(n, 2, 3), generator=g)
    dropped_tok = ~keep[:, 1:].any(1)
    assert keep[:, 0].all()  # the null token is never masked
    for dropped in (dropped_y, dropped_vec, dropped_tok):
        assert _within(dropped.double().mean().item(), p, n)
    if 0 < p < 1:  # independent draws per conditioner
        assert _within((dropped_vec & dropped_tok).double().mean().item(), p * p, n)


def test_dropout_only_in_training_and_reproducible_with_a_generator():
    m = randomize_(model(y_dropout=0.5, vec_dropout=0.5, token_dropout=0.5), std=0.2).double()
    x, t, cond = inputs(b=8)
    m.eval()
    assert torch.equal(m(x, t, **cond), m(x, t, **cond))
    m.train()
    a = m(x, t, **cond, generator=torch.Generator().manual_seed(3))
    b = m(x, t, **cond, generator=torch.Generator().manual_seed(3))
    c = m(x, t, **cond, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert drop_samples(5, 0.0, None, torch.device("cpu")).sum() == 0


# ---- bad inputs ------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    m = model()
    x, t, cond = inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="token_mask must have shape"):
        m(x, t, **{**cond, "token_mask": cond["token_mask"][:, :3]})
    with pytest.raises(TypeError, match="token_mask must be a bool"):
        m(x, t, **{**cond, "token_mask": cond["token_mask"].float()})
    with pytest.raises(ValueError, match="token_mask was given without tokens"):
        m(x, t, token_mask=cond["token_mask"])
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, M, token_dim\)"):
        m(x, t, tokens=torch.randn(3, 5, TOK + 1))
    with pytest.raises(ValueError, match=r"vec must have shape \(B, vec_dim\) = \(3, 12\)"):
        m(x, t, vec=torch.randn(3, VEC + 1))
    with pytest.raises(TypeError, match="vec must be a floating-point"):
        m(x, t, vec=torch.ones(3, VEC, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must have shape"):
        m(torch.randn(3, 3, 6, 6), t)
    with pytest.raises(ValueError, match=r"t must have shape"):
        m(x, t[:2])
    with pytest.raises(TypeError, match=r"y must be an integer \(int32/int64\) torch.Tensor"):
        m(x, t, y=torch.zeros(3))
    with pytest.raises(ValueError, match=r"y must have shape \(B,\) = \(3,\)"):
        m(x, t, y=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"y must hold class ids in \[0, 10\] \(10 = null class\)"):
        m(x, t, y=torch.tensor([0, 11, 2]))
    class_only = ConditionalDiT(8, 2, 3, HIDDEN, 1, HEADS, num_classes=10)
    with pytest.raises(ValueError, match=r"\['vec'\] given but this model is not configured"):
        class_only(x, t, vec=cond["vec"])
    with pytest.raises(ValueError, match=r"\['tokens'\] given"):
        class_only(x, t, tokens=cond["tokens"])
    with pytest.raises(ValueError, match="cannot null"):
        class_only.null_cond(["vec"])
    no_null = ConditionalDiT(8, 2, 3, HIDDEN, 1, HEADS, num_classes=10, y_dropout=0.0)
    with pytest.raises(ValueError, match="y is required"):
        no_null(x, t)
    with pytest.raises(ValueError, match="y_dropout must be a probability"):
        model(y_dropout=1.5)
    with pytest.raises(ValueError, match="vec_dim must be a positive int"):
        model(vec_dim=0)
