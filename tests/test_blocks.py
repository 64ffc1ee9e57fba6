"""AdaLNZeroResidualBlock, DiTBlock and FinalLayer against float64 references written here.

The block reference is seed 001's forward pseudo-code; the DiT references are facebookresearch/DiT
models.py's DiTBlock / FinalLayer (timm Attention reshape (B, N, 3, H, d), Mlp with tanh-GELU,
LayerNorm without affine eps 1e-6, modulate = x * (1 + scale) + shift), with fb's parameter names.
"""

import copy
import functools
import math
import sys
from collections.abc import Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaln.nn.blocks as blocks
from adaln.nn import AdaLNZeroResidualBlock, Attention, DiTBlock, DropPath, FinalLayer, Mlp

F64 = torch.float64
C = 16
SPATIAL = [(7,), (3, 4), (2, 3, 2)]


def randomize_(module: nn.Module, std: float = 0.5) -> nn.Module:
    """Overwrite every parameter, zero-initialised modulation included, with random values."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * std)
    return module


# ----------------------------------------------------------------------------- references


def ref_layer_norm(x, weight=None, bias=None, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight + bias


def ref_rms_norm(x, weight, eps):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * weight


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def ref_attention(x, w_qkv, b_qkv, w_proj, b_proj, heads):
    """timm Attention as fb DiT uses it: x (B, N, C)."""
    b, n, c = x.shape
    qkv = (x @ w_qkv.T + b_qkv).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = torch.softmax(q @ k.transpose(-2, -1) * (c // heads) ** -0.5, dim=-1)
    return (attn @ v).transpose(1, 2).reshape(b, n, c) @ w_proj.T + b_proj


def ref_mlp(x, w1, b1, w2, b2):
    return gelu_tanh(x @ w1.T + b1) @ w2.T + b2


class ScaleNorm(nn.Module):
    """A norm torch does not ship (x / (rms + eps) * g): exercises the generic modulate path."""

    def __init__(self, dim):
        super().__init__()
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + 1e-5) * self.g


class FiLMMixer(nn.Module):
    """A token mixer that declares ``conditioning``: mean-token mixing modulated by the condition."""

    def __init__(self, dim):
        super().__init__()
        self.mix = nn.Linear(dim, dim)
        self.film = nn.Linear(dim, dim)

    def forward(self, x, conditioning):
        tokens = tuple(range(1, x.dim() - 1))
        cond = self.film(conditioning).view(x.shape[0], *([1] * len(tokens)), x.shape[-1])
        return self.mix(x - x.mean(tokens, keepdim=True)) * (1 + cond)


class NamedConditioningMixer(nn.Module):
    """Declares ``conditioning`` by name and records what it received."""

    def __init__(self, dim):
        super().__init__()
        self.lin, self.received = nn.Linear(dim, dim), "never called"

    def forward(self, x, conditioning=None):
        self.received = conditioning
        return self.lin(x)


class KwargsMixer(NamedConditioningMixer):
    """nvSubquadratic ``QKVSequenceMixer``'s signature: ``forward(x, cp_group=None, **mixer_kwargs)``."""

    def forward(self, x, cp_group=None, **mixer_kwargs):
        self.received = mixer_kwargs.get("conditioning", "absent")
        return self.lin(x)


def lazy_config(target, **kwargs):
    """What nvSubquadratic's ``LazyConfig(target)(**kwargs)`` returns, as a plain dict."""
    return {"__target__": f"{target.__module__}.{target.__qualname__}", **kwargs}


def halve(value):
    """A non-module config target (as nvSubquadratic's init-function configs)."""
    return value / 2


class Wrapper(nn.Module):
    """A module that builds its child from a config itself, as nvSubquadratic's mixers do."""

    def __init__(self, inner_cfg, scale):
        super().__init__()
        self.received_cfg = inner_cfg if isinstance(inner_cfg, Mapping) else None
        self.inner, self.scale = blocks.build_module(inner_cfg, "inner_cfg"), scale

    def forward(self, x):
        return self.inner(x) * self.scale


def make_block(norm="layer", mixer="attention", dropout=None, dim=C):
    norms = {
        "layer": lambda: nn.LayerNorm(dim, eps=1e-6),
        "rms": lambda: nn.RMSNorm(dim, eps=1e-5),
        "custom": lambda: ScaleNorm(dim),
    }[norm]
    mixers = {"attention": lambda: Attention(dim, 4), "film": lambda: FiLMMixer(dim)}
    return AdaLNZeroResidualBlock(
        mixers[mixer](), norms(), Mlp(dim, 2 * dim), norms(), nn.LayerNorm(dim), dropout or nn.Identity(), dim
    )


def ref_norm(module, x):
    if isinstance(module, nn.LayerNorm):
        return ref_layer_norm(x, module.weight, module.bias, module.eps)
    if isinstance(module, nn.RMSNorm):
        return ref_rms_norm(x, module.weight, module.eps)
    return x / (torch.sqrt((x**2).mean(-1, keepdim=True)) + 1e-5) * module.g


def ref_mixer(block, x, cond):
    m = block.sequence_mixer
    if isinstance(m, Attention):
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        out = ref_attention(flat, m.qkv.weight, m.qkv.bias, m.proj.weight, m.proj.bias, m.num_heads)
        return out.reshape(x.shape)
    tokens = tuple(range(1, x.dim() - 1))
    film = (cond @ m.film.weight.T + m.film.bias).view(x.shape[0], *([1] * len(tokens)), x.shape[-1])
    return ((x - x.mean(tokens, keepdim=True)) @ m.mix.weight.T + m.mix.bias) * (1 + film)


def ref_block(block, x, condition):
    """Seed 001's pseudo-code, float64, reading the block's parameters."""
    cond = condition.mean(dim=tuple(range(1, condition.dim() - 1))) if condition.dim() > 2 else condition
    cn = block.condition_norm
    cond = ref_layer_norm(cond, cn.weight, cn.bias, cn.eps)
    lin = block.condition_proj[1]
    params = (cond * torch.sigmoid(cond)) @ lin.weight.T + lin.bias
    shift_seq, scale_seq, gate_seq, shift_mlp, scale_mlp, gate_mlp = (
        p.view(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1]) for p in params.chunk(6, dim=-1)
    )
    h = ref_norm(block.sequence_norm, x) * (1 + scale_seq) + shift_seq
    x = x + ref_mixer(block, h, cond) * gate_seq
    h = ref_norm(block.mlp_norm, x) * (1 + scale_mlp) + shift_mlp
    m = block.mlp
    return x + ref_mlp(h, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias) * gate_mlp


def condition_for(kind, b, spatial):
    return torch.randn(b, C) if kind == "global" else torch.randn(b, *spatial, C)


# ----------------------------------------------------------------------------- AdaLNZeroResidualBlock


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("cond_kind", ["global", "spatial"])
def test_block_is_exactly_identity_at_init(spatial, cond_kind):
    block = make_block(dropout=nn.Dropout(0.5)).train()
    for name, p in block.named_parameters():
        if not name.startswith("condition_proj"):
            with torch.no_grad():
                p.copy_(torch.randn_like(p))
    x = torch.randn(2, *spatial, C) * 3
    assert torch.equal(block(x, condition_for(cond_kind, 2, spatial)), x)


def test_one_optimiser_step_leaves_identity_through_the_gates():
    block = make_block()
    x, cond, target = torch.randn(2, 3, 4, C), torch.randn(2, C), torch.randn(2, 3, 4, C)
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    loss = (block(x, cond) * target).sum()
    loss.backward()
    grad = block.condition_proj[1].weight.grad.view(6, C, C)
    # seed 002: at init only the gates get a gradient; shift/scale and the branches see gate = 0
    for i, name in enumerate(("shift_seq", "scale_seq", "gate_seq", "shift_mlp", "scale_mlp", "gate_mlp")):
        assert (grad[i].abs().max() > 0) == name.startswith("gate"), name
    assert all(p.grad.abs().max() == 0 for p in block.sequence_mixer.parameters())
    opt.step()
    out = block(x, cond)
    assert not torch.equal(out, x)
    assert (out - x).abs().max() > 1e-3


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("cond_kind", ["global", "spatial"])
@pytest.mark.parametrize("norm, mixer", [("layer", "attention"), ("rms", "film"), ("custom", "attention")])
def test_block_matches_float64_reference(spatial, cond_kind, norm, mixer):
    block = randomize_(make_block(norm, mixer)).to(F64)
    x = torch.randn(2, *spatial, C, dtype=F64)
    condition = condition_for(cond_kind, 2, (3, 5)).to(F64)
    torch.testing.assert_close(block(x, condition), ref_block(block, x, condition), rtol=0, atol=1e-12)


def test_block_float32_close_to_float64_reference():
    block = randomize_(make_block("layer", "attention"))
    x, condition = torch.randn(2, 4, 5, C), torch.randn(2, 6, C)
    ref = ref_block(copy.deepcopy(block).to(F64), x.to(F64), condition.to(F64))
    torch.testing.assert_close(block(x, condition).to(F64), ref, rtol=0, atol=1e-4)


def test_pooled_and_pre_pooled_conditions_agree():
    block = randomize_(make_block("layer", "film"))
    x, condition = torch.randn(2, 6, C), torch.randn(2, 3, 5, C)
    assert torch.equal(block(x, condition), block(x, condition.mean(dim=(1, 2))))


def test_layer_and_rms_norms_go_through_norm_modulate(monkeypatch):
    calls = []

    def spy(name, fn):
        return lambda *a, **k: (calls.append((name, k.get("norm"))), fn(*a, **k))[1]

    monkeypatch.setattr(blocks, "norm_modulate", spy("norm_modulate", blocks.norm_modulate))
    monkeypatch.setattr(blocks, "modulate", spy("modulate", blocks.modulate))
    monkeypatch.setattr(blocks, "gate_residual", spy("gate_residual", blocks.gate_residual))
    x, cond = torch.randn(2, 5, C), torch.randn(2, C)
    for norm, expected in [("layer", ("norm_modulate", "layer")), ("rms", ("norm_modulate", "rms"))]:
        calls.clear()
        make_block(norm)(x, cond)
        assert calls == [expected, ("gate_residual", None)] * 2
    calls.clear()
    make_block("custom")(x, cond)
    assert calls == [("modulate", None), ("gate_residual", None)] * 2


def test_construction_from_module_factory_and_configs():
    target = "adaln.nn.attention.Attention"
    specs = [
        dict(sequence_mixer=Attention(C, 4), sequence_mixer_norm=nn.LayerNorm(C), mlp=Mlp(C, 32)),
        dict(
            sequence_mixer=lambda: Attention(C, 4),
            sequence_mixer_norm=functools.partial(nn.LayerNorm, C),
            mlp=functools.partial(Mlp, C, 32),
        ),
        dict(
            sequence_mixer={"_target_": target, "dim": C, "num_heads": 4},
            sequence_mixer_norm={"_target_": "torch.nn.LayerNorm", "normalized_shape": C},
            mlp={"_target_": "adaln.nn.mlp.Mlp", "in_features": C, "hidden_features": 32},
        ),
        dict(  # nvSubquadratic's keyword names and LazyConfig form
            sequence_mixer_cfg=lazy_config(Attention, dim=C, num_heads=4),
            sequence_mixer_norm_cfg=lazy_config(nn.LayerNorm, normalized_shape=C),
            mlp_cfg=lazy_config(Mlp, in_features=C, hidden_features=32),
        ),
    ]
    common = dict(
        mlp_norm=nn.LayerNorm(C), condition_norm=nn.Identity, dropout=lambda: DropPath(0.1), hidden_dim=C
    )
    built = [AdaLNZeroResidualBlock(**spec, **common) for spec in specs]
    reference = randomize_(built[0])
    x, cond = torch.randn(2, 5, C), torch.randn(2, C)
    for block in built:
        assert isinstance(block.sequence_mixer, Attention) and isinstance(block.mlp, Mlp)
        assert isinstance(block.sequence_norm, nn.LayerNorm) and isinstance(block.dropout, DropPath)
        block.load_state_dict(reference.state_dict())
        block.eval()
        assert torch.equal(block(x, cond), reference.eval()(x, cond))
    expected_keys = {"condition_proj.1.weight", "condition_proj.1.bias", "sequence_norm.bias", "mlp.fc1.bias"}
    assert expected_keys <= set(reference.state_dict())
    assert all(getattr(p, "_no_weight_decay", False) for p in reference.sequence_norm.parameters())
    assert all(getattr(p, "_no_weight_decay", False) for p in reference.mlp_norm.parameters())
    assert not hasattr(reference.mlp.fc1.weight, "_no_weight_decay")


def nvsubquadratic_block_config():
    """An nvSubquadratic-style block config, every sub-module a LazyConfig, the mixer nesting another."""
    return lazy_config(
        AdaLNZeroResidualBlock,
        sequence_mixer_cfg=lazy_config(
            Wrapper,
            inner_cfg=lazy_config(nn.Linear, in_features=C, out_features=C),
            scale=lazy_config(halve, value=4.0),
        ),
        sequence_mixer_norm_cfg=lazy_config(nn.LayerNorm, normalized_shape=C),
        mlp_cfg=lazy_config(Mlp, in_features=C, hidden_features=32),
        mlp_norm_cfg=lazy_config(nn.RMSNorm, normalized_shape=C),
        condition_norm_cfg=lazy_config(nn.Identity),
        dropout_cfg=lazy_config(nn.Dropout, p=0.0),
        hidden_dim=C,
    )  # fmt: skip


def test_nvsubquadratic_config_builds_the_block_without_hydra(monkeypatch):
    monkeypatch.setitem(sys.modules, "hydra", None)  # any import of hydra or omegaconf would fail
    monkeypatch.setitem(sys.modules, "omegaconf", None)
    cfg = nvsubquadratic_block_config()
    block = blocks.instantiate(cfg)
    assert isinstance(block, AdaLNZeroResidualBlock) and isinstance(block.mlp_norm, nn.RMSNorm)
    mixer = block.sequence_mixer
    # nested module config reached the mixer unbuilt (it builds it); a non-module target was called
    assert isinstance(mixer, Wrapper) and mixer.received_cfg == cfg["sequence_mixer_cfg"]["inner_cfg"]
    assert mixer.received_cfg is not cfg["sequence_mixer_cfg"]["inner_cfg"]  # a copy the parent may fill in
    assert isinstance(mixer.inner, nn.Linear) and mixer.scale == 2.0
    assert cfg["sequence_mixer_cfg"]["scale"] == lazy_config(halve, value=4.0)  # config not mutated
    modules = (nn.LayerNorm(C), Mlp(C, 32), nn.RMSNorm(C), nn.Identity(), nn.Dropout(0.0))
    same = AdaLNZeroResidualBlock(Wrapper(nn.Linear(C, C), 2.0), *modules, C)
    same.load_state_dict(randomize_(block).state_dict())
    x, cond = torch.randn(2, 3, 4, C), torch.randn(2, C)
    assert torch.equal(block(x, cond), same(x, cond))


def test_omegaconf_dictconfig_is_accepted():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create(nvsubquadratic_block_config(), flags={"allow_objects": True})
    block = blocks.instantiate(cfg)
    assert isinstance(block.sequence_mixer.inner, nn.Linear) and block.sequence_mixer.scale == 2.0
    hydra_cfg = omegaconf.OmegaConf.create({"_target_": "adaln.nn.mlp.Mlp", "in_features": C})
    assert isinstance(blocks.build_module(hydra_cfg, "mlp"), Mlp)


def test_uncalled_lazy_config_is_a_factory_of_a_config():
    class UncalledLazyConfig:
        """nvSubquadratic's ``LazyConfig(cls)`` before it is called: calling it returns the config."""

        def __call__(self, **kwargs):
            return lazy_config(nn.LayerNorm, normalized_shape=C, **kwargs)

    norm = blocks.build_module(UncalledLazyConfig(), "sequence_mixer_norm")
    assert isinstance(norm, nn.LayerNorm) and norm.normalized_shape == (C,)


def test_hydra_instantiate_features():
    mk = blocks.instantiate
    partial = mk({"_target_": "torch.nn.LayerNorm", "_partial_": True, "eps": 1e-3})
    assert isinstance(partial, functools.partial) and partial(C).eps == 1e-3
    linear = mk({"_target_": "torch.nn.Linear", "_args_": [C, 3], "bias": False})
    assert linear.weight.shape == (3, C) and linear.bias is None
    seq = mk({"_target_": "torch.nn.Sequential", "_args_": [{"_target_": "torch.nn.Identity"}]})
    assert isinstance(seq[0], nn.Identity)  # nested _target_ built first, as hydra does by default
    raw = mk({"_target_": "builtins.dict", "_recursive_": False, "inner": {"_target_": "torch.nn.Identity"}})
    assert raw == {"inner": {"_target_": "torch.nn.Identity"}}
    assert mk({"_target_": nn.Identity}).__class__ is nn.Identity  # a callable target
    assert mk({"_target_": "torch.nn.init.calculate_gain", "nonlinearity": "relu"}) == math.sqrt(2)


def test_bad_configs():
    mk = blocks.instantiate
    with pytest.raises(ValueError, match=r"config: unsupported keys \['_convert_'\]; supported are"):
        mk({"_target_": "torch.nn.Identity", "_convert_": "all"})
    with pytest.raises(ValueError, match="config has both '_target_' and '__target__'; use one"):
        mk({"_target_": "torch.nn.Identity", "__target__": "torch.nn.Identity"})
    message = r"mlp: target 'torch.nn.NoSuchNorm' not found \(no attribute 'NoSuchNorm'\)"
    with pytest.raises(ValueError, match=message):
        mk({"_target_": "torch.nn.NoSuchNorm"}, "mlp")
    with pytest.raises(ValueError, match=r"config: target 'no_such_package.Norm' names no importable module"):
        mk({"__target__": "no_such_package.Norm"})
    with pytest.raises(TypeError, match="config: target must be a dotted path or a callable, got 3"):
        mk({"_target_": 3})
    with pytest.raises(TypeError, match="config must be a mapping with a '_target_' or '__target__' key"):
        mk({"dim": C})
    cfg = dict(sequence_mixer_norm=nn.LayerNorm(C), mlp=Mlp(C), mlp_norm=nn.LayerNorm(C),
               condition_norm=nn.Identity(), dropout=nn.Identity(), hidden_dim=C)  # fmt: skip
    both = r"pass sequence_mixer or sequence_mixer_cfg \(nvSubquadratic's name\), not both"
    with pytest.raises(TypeError, match=both):
        AdaLNZeroResidualBlock(Attention(C, 4), **cfg, sequence_mixer_cfg=Attention(C, 4))
    missing = r"sequence_mixer is required \(nvSubquadratic's name: sequence_mixer_cfg\)"
    with pytest.raises(TypeError, match=missing):
        AdaLNZeroResidualBlock(**cfg)


def test_bad_module_specs():
    good = dict(sequence_mixer_norm=nn.LayerNorm(C), mlp=Mlp(C), mlp_norm=nn.LayerNorm(C))
    rest = dict(condition_norm=nn.Identity(), dropout=nn.Identity(), hidden_dim=C)
    with pytest.raises(TypeError, match="sequence_mixer must be an nn.Module, a zero-argument factory"):
        AdaLNZeroResidualBlock(42, **good, **rest)
    with pytest.raises(TypeError, match="sequence_mixer config must have a '_target_'"):
        AdaLNZeroResidualBlock({"dim": C}, **good, **rest)
    with pytest.raises(TypeError, match="sequence_mixer must build an nn.Module, got Tensor"):
        AdaLNZeroResidualBlock(lambda: torch.zeros(1), **good, **rest)


@pytest.mark.parametrize("declares", ["named", "var_keyword"])
def test_conditioning_reaches_mixers_that_can_take_it(declares):
    mixer = NamedConditioningMixer(C) if declares == "named" else KwargsMixer(C)
    block = randomize_(
        AdaLNZeroResidualBlock(
            mixer, nn.LayerNorm(C), Mlp(C), nn.LayerNorm(C), nn.LayerNorm(C), nn.Identity(), C
        )
    )
    condition = torch.randn(2, 3, C)
    block(torch.randn(2, 4, C), condition)
    cn = block.condition_norm
    expected = ref_layer_norm(condition.mean(1), cn.weight, cn.bias, cn.eps)
    torch.testing.assert_close(mixer.received, expected, rtol=0, atol=1e-6)
    assert block.mixer_takes_conditioning


def test_film_switch():
    rest = (nn.LayerNorm(C), Mlp(C), nn.LayerNorm(C), nn.Identity(), nn.Identity(), C)
    x, cond = torch.randn(2, 4, C), torch.randn(2, C)
    plain = AdaLNZeroResidualBlock(Attention(C, 4), *rest)  # default: cannot take it, called with x alone
    assert not plain.mixer_takes_conditioning and plain(x, cond).shape == x.shape
    message = (
        r"film=True needs a sequence_mixer whose forward takes conditioning= "
        r"\(a parameter of that name or \*\*kwargs\); Attention.forward takes neither"
    )
    with pytest.raises(ValueError, match=message):
        AdaLNZeroResidualBlock(Attention(C, 4), *rest, film=True)
    kwargs_mixer = KwargsMixer(C)
    AdaLNZeroResidualBlock(kwargs_mixer, *rest, film=True)(x, cond)
    assert torch.equal(kwargs_mixer.received, cond)  # condition_norm is Identity here
    named = NamedConditioningMixer(C)
    off = AdaLNZeroResidualBlock(named, *rest, film=False)
    off(x, cond)
    assert named.received is None and not off.mixer_takes_conditioning
    with pytest.raises(TypeError, match="film must be None, True or False, got 'yes'"):
        AdaLNZeroResidualBlock(Attention(C, 4), *rest, film="yes")


def test_bf16_finite_and_close_to_fp32():
    block32 = randomize_(make_block("layer", "film"), std=0.3)
    block16 = copy.deepcopy(block32).to(torch.bfloat16)
    block32 = copy.deepcopy(block16).float()  # same (bf16-rounded) weights in fp32
    x, cond = torch.randn(2, 4, 4, C).bfloat16(), torch.randn(2, C).bfloat16()
    out16 = block16(x, cond)
    ref = block32(x.float(), cond.float())
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()
    # bf16 keeps 8 significant bits (rel. 2^-8 = 0.4%); the chained roundings of this block measured
    # 0.4% of the output scale, bounded here by ~4 bf16 ulps.
    assert (out16.float() - ref).abs().max() <= 0.015 * ref.abs().max()


@pytest.mark.parametrize("mixer", ["attention", "film"])
def test_torch_compile_fullgraph(mixer):
    block = randomize_(make_block("layer", mixer))
    x, cond = torch.randn(2, 3, 4, C), torch.randn(2, 5, C)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, cond), block(x, cond), rtol=1e-5, atol=1e-5)


def test_block_bad_inputs():
    block = make_block()
    x = torch.randn(2, 5, C)
    with pytest.raises(ValueError, match="condition is required"):
        block(x, None)
    with pytest.raises(ValueError, match=r"condition must be \(B, C\) or \(B, \*spatial, C\) with B = 2"):
        block(x, torch.randn(3, C))
    with pytest.raises(ValueError, match="condition must be"):
        block(x, torch.randn(2, 5, C + 1))
    with pytest.raises(ValueError, match=r"x must be \(B, \*spatial, 16\)"):
        block(torch.randn(2, 5, C + 2), torch.randn(2, C))
    with pytest.raises(ValueError, match="x must have at least 2 dims"):
        block(torch.randn(C), torch.randn(2, C))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        block(torch.ones(2, 5, C, dtype=torch.int64), torch.randn(2, C))
    with pytest.raises(TypeError, match="condition must be a floating-point tensor"):
        block(x, torch.ones(2, C, dtype=torch.int32))
    with pytest.raises(TypeError, match="condition must be a torch.Tensor"):
        block(x, [0.0] * C)
    empty = r"condition must have at least one token to mean-pool, got shape \(2, 0, 16\)"
    with pytest.raises(ValueError, match=empty):
        block(x, torch.randn(2, 0, C))
    with pytest.raises(ValueError, match=r"at least one token to mean-pool, got shape \(2, 3, 0, 16\)"):
        block(x, torch.randn(2, 3, 0, C))


@pytest.mark.parametrize(
    "field, module, side, channels",
    [
        ("sequence_mixer", lambda: Attention(8, 2), "input", 8),
        ("sequence_mixer_norm", lambda: nn.LayerNorm(8), "input", 8),
        ("mlp", lambda: Mlp(C, 32, 8), "output", 8),
        ("mlp", lambda: nn.Sequential(nn.Linear(C, 32), nn.GELU(), Mlp(32, 8, 12), nn.Dropout()), "output", 12),
        ("mlp_norm", lambda: nn.RMSNorm(20), "input", 20),
        ("condition_norm", lambda: nn.LayerNorm(4), "input", 4),
    ],
)
def test_mismatched_hidden_dim_fails_at_construction(field, module, side, channels):
    args = dict(
        sequence_mixer=Attention(C, 4),
        sequence_mixer_norm=nn.LayerNorm(C),
        mlp=Mlp(C),
        mlp_norm=nn.LayerNorm(C),
        condition_norm=nn.Identity(),
        dropout=nn.Identity(),
        hidden_dim=C,
    )
    args[field] = module
    with pytest.raises(ValueError, match=f"{field} has {side} channel dim {channels} but hidden_dim is 16"):
        AdaLNZeroResidualBlock(**args)


def test_undetectable_mismatch_fails_at_forward_and_bad_hidden_dim():
    class Widen(nn.Module):
        def forward(self, x):
            return torch.cat([x, x], dim=-1)

    rest = (nn.LayerNorm(C), Mlp(C), nn.LayerNorm(C), nn.Identity(), nn.Identity())
    block = AdaLNZeroResidualBlock(Widen(), *rest, C)
    message = r"sequence_mixer must return its input's shape \(2, 5, 16\), got \(2, 5, 32\)"
    with pytest.raises(ValueError, match=message):
        block(torch.randn(2, 5, C), torch.randn(2, C))
    for bad in (0, "16", 16.0, True):
        with pytest.raises(ValueError, match="hidden_dim must be a positive int"):
            AdaLNZeroResidualBlock(Widen(), *rest, bad)


# ----------------------------------------------------------------------------- DiTBlock / FinalLayer


def fb_modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def fb_dit_block(sd, x, c, heads):
    """facebookresearch/DiT DiTBlock.forward, float64, from an fb-named state dict."""
    mod = F.silu(c) @ sd["adaLN_modulation.1.weight"].T + sd["adaLN_modulation.1.bias"]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
    attn = ref_attention(
        fb_modulate(ref_layer_norm(x), shift_msa, scale_msa),
        sd["attn.qkv.weight"], sd["attn.qkv.bias"], sd["attn.proj.weight"], sd["attn.proj.bias"], heads,
    )
    x = x + gate_msa.unsqueeze(1) * attn
    h = fb_modulate(ref_layer_norm(x), shift_mlp, scale_mlp)
    mlp = ref_mlp(h, sd["mlp.fc1.weight"], sd["mlp.fc1.bias"], sd["mlp.fc2.weight"], sd["mlp.fc2.bias"])
    return x + gate_mlp.unsqueeze(1) * mlp


def fb_final_layer(sd, x, c):
    mod = F.silu(c) @ sd["adaLN_modulation.1.weight"].T + sd["adaLN_modulation.1.bias"]
    shift, scale = mod.chunk(2, dim=1)
    return fb_modulate(ref_layer_norm(x), shift, scale) @ sd["linear.weight"].T + sd["linear.bias"]


def fb_to_ours(sd):
    return {k.replace("adaLN_modulation.1.", "adaLN_modulation.proj.1."): v for k, v in sd.items()}


def random_state(shapes, dtype=F64):
    return {k: torch.randn(*s, dtype=dtype) * 0.3 for k, s in shapes.items()}


def dit_block_state(c, ratio=4.0):
    h = int(c * ratio)
    return random_state({
        "attn.qkv.weight": (3 * c, c), "attn.qkv.bias": (3 * c,),
        "attn.proj.weight": (c, c), "attn.proj.bias": (c,),
        "mlp.fc1.weight": (h, c), "mlp.fc1.bias": (h,), "mlp.fc2.weight": (c, h), "mlp.fc2.bias": (c,),
        "adaLN_modulation.1.weight": (6 * c, c), "adaLN_modulation.1.bias": (6 * c,),
    })


@pytest.mark.parametrize("mlp_ratio", [4.0, 2.5])
def test_dit_block_matches_facebookresearch_float64(mlp_ratio):
    sd = dit_block_state(C, mlp_ratio)
    block = DiTBlock(C, 4, mlp_ratio=mlp_ratio).to(F64)
    block.load_state_dict(fb_to_ours(sd))  # strict: our keys are fb's up to the documented rename
    x, c = torch.randn(3, 10, C, dtype=F64), torch.randn(3, C, dtype=F64)
    torch.testing.assert_close(block(x, c), fb_dit_block(sd, x, c, 4), rtol=0, atol=1e-12)
    block32 = block.float()
    out32 = block32(x.float(), c.float())
    torch.testing.assert_close(out32.to(F64), fb_dit_block(sd, x, c, 4), rtol=0, atol=1e-4)


def test_final_layer_matches_facebookresearch_float64():
    p, out = 2, 3
    sd = random_state({
        "linear.weight": (p * p * out, C), "linear.bias": (p * p * out,),
        "adaLN_modulation.1.weight": (2 * C, C), "adaLN_modulation.1.bias": (2 * C,),
    })
    layer = FinalLayer(C, p, out).to(F64)
    layer.load_state_dict(fb_to_ours(sd))
    x, c = torch.randn(3, 10, C, dtype=F64), torch.randn(3, C, dtype=F64)
    torch.testing.assert_close(layer(x, c), fb_final_layer(sd, x, c), rtol=0, atol=1e-12)
    out32 = layer.float()(x.float(), c.float())
    torch.testing.assert_close(out32.to(F64), fb_final_layer(sd, x, c), rtol=0, atol=1e-4)


def test_dit_block_identity_at_init_and_bad_inputs():
    block = DiTBlock(C, 4)
    x = torch.randn(2, 6, C)
    assert torch.equal(block(x, torch.randn(2, C)), x)
    with pytest.raises(ValueError, match=r"c must be \(B, C\) = \(2, 16\)"):
        block(x, torch.randn(3, C))
    with pytest.raises(ValueError, match=r"x must be \(B, N, 16\)"):
        block(torch.randn(2, 6, 8), torch.randn(2, C))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DiTBlock(C, 3)
    layer = FinalLayer(C, 2, 4)
    with pytest.raises(ValueError, match=r"c must be \(B, C\)"):
        layer(x, torch.randn(2, C + 1))


def test_residual_network_builds_nvsubquadratic_block_configs():
    from adaln.networks.residual import ResidualNetwork

    net = ResidualNetwork(3, C, 2, 2, nvsubquadratic_block_config())
    assert all(isinstance(b, AdaLNZeroResidualBlock) for b in net.blocks)
    assert net.blocks[0] is not net.blocks[1]
    assert net.blocks[0].sequence_mixer.inner is not net.blocks[1].sequence_mixer.inner
    assert net(torch.randn(2, 5, 3), torch.randn(2, C)).shape == (2, 5, 2)
