"""ResidualNetwork / ClassificationResNet: 1-D/2-D/3-D shapes, float64 init references, errors, compile."""

import math
from functools import partial

import pytest
import torch

from adaln.networks import ClassificationResNet, ResidualNetwork
from adaln.nn.attention import Attention
from adaln.nn.blocks import AdaLNZeroResidualBlock
from adaln.nn.embeddings import PatchEmbed
from adaln.nn.hyena import Hyena
from adaln.nn.mlp import Mlp

F64 = torch.float64
SHAPES = [(1, (2, 6)), (2, (2, 4, 6)), (3, (2, 2, 4, 4))]


def block_factory(c, spatial_dims, mixer):
    if mixer == "hyena":
        mix = partial(Hyena, c, spatial_dims=spatial_dims, cond_dim=c)
    else:
        mix = partial(Attention, c, 2)
    norm = partial(torch.nn.LayerNorm, c, elementwise_affine=False)
    return partial(
        AdaLNZeroResidualBlock,
        sequence_mixer=mix,
        sequence_mixer_norm=norm,
        mlp=partial(Mlp, c, 2 * c),
        mlp_norm=norm,
        condition_norm=torch.nn.Identity,
        dropout=torch.nn.Identity,
        hidden_dim=c,
    )


def randomize_blocks(net):
    """Random non-zero weights everywhere, including the zero-initialised AdaLN-Zero projections."""
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return net


def ref_layernorm(x, weight, bias, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


@pytest.mark.parametrize("spatial_dims,shape", SHAPES)
@pytest.mark.parametrize("mixer", ["hyena", "attention"])
def test_residual_network_shapes_and_identity_blocks_at_init(spatial_dims, shape, mixer):
    net = ResidualNetwork(3, 8, 5, 2, block_factory(8, spatial_dims, mixer), condition_dim=4).double()
    x, cond = torch.randn(*shape, 3, dtype=F64), torch.randn(shape[0], 4, dtype=F64)
    y = net(x, cond)
    assert y.shape == (*shape, 5)
    # adaln_zero: every block is the identity at init, so y = out_proj(LN(in_proj(x))).
    h = x @ net.in_proj.weight.T + net.in_proj.bias
    ref = ref_layernorm(h, net.final_norm.weight, net.final_norm.bias) @ net.out_proj.weight.T
    ref = ref + net.out_proj.bias
    assert (y - ref).abs().max().item() < 1e-12


def test_residual_network_per_token_condition_and_checkpointing_gradients():
    net = ResidualNetwork(3, 8, 5, 2, block_factory(8, 2, "hyena"), condition_dim=4)
    net = randomize_blocks(net).double()
    x, cond = torch.randn(2, 4, 5, 3, dtype=F64), torch.randn(2, 3, 3, 4, dtype=F64)
    grads = []
    for ckpt in (False, True):
        net.checkpoint_activations = ckpt
        net.zero_grad()
        y = net(x, cond)
        y.square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert grads[0].abs().max() > 0
    assert (grads[0] - grads[1]).abs().max().item() < 1e-12


def test_residual_network_from_hydra_config():
    cfg = {
        "_target_": "adaln.nn.blocks.AdaLNZeroResidualBlock",
        "sequence_mixer": {"_target_": "adaln.nn.hyena.Hyena", "dim": 8, "spatial_dims": 1, "cond_dim": 8},
        "sequence_mixer_norm": {"_target_": "torch.nn.LayerNorm", "normalized_shape": 8},
        "mlp": {"_target_": "adaln.nn.mlp.Mlp", "in_features": 8, "hidden_features": 16},
        "mlp_norm": {"_target_": "torch.nn.LayerNorm", "normalized_shape": 8},
        "condition_norm": {"_target_": "torch.nn.Identity"},
        "dropout": {"_target_": "torch.nn.Identity"},
        "hidden_dim": 8,
    }
    net = ResidualNetwork(3, 8, 2, 2, cfg)
    assert len(net.blocks) == 2 and net.blocks[0] is not net.blocks[1]
    assert isinstance(net.blocks[1].sequence_mixer, Hyena)
    assert net(torch.randn(2, 7, 3), torch.randn(2, 8)).shape == (2, 7, 2)


def test_residual_network_rejects_bad_inputs():
    net = ResidualNetwork(3, 8, 5, 1, block_factory(8, 1, "hyena"), condition_dim=4)
    with pytest.raises(ValueError, match=r"x must be \(B, \*spatial, 3\)"):
        net(torch.randn(2, 6, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="x must have at least 3 dims"):
        net(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="condition is required"):
        net(torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match=r"condition must be \(B, 4\)"):
        net(torch.randn(2, 6, 3), torch.randn(2, 8))
    with pytest.raises(ValueError, match="B = 2"):
        net(torch.randn(2, 6, 3), torch.randn(3, 4))
    with pytest.raises(TypeError, match="not a module instance"):
        ResidualNetwork(3, 8, 5, 2, block_factory(8, 1, "hyena")())
    with pytest.raises(TypeError, match="block must be"):
        ResidualNetwork(3, 8, 5, 2, 42)


def ref_classifier_at_init(net, x):
    """Blocks are the identity at init: logits = head(LN(mean_tokens(patch_conv(x)))), patches by reshape."""
    p, sd = net.patch_size, net.spatial_dims
    b, *spatial, cin = x.shape
    grid = [n // p for n in spatial]
    # split every axis into (grid, patch) and gather the patch axes next to the channels
    xs = x.reshape(b, *[d for n in grid for d in (n, p)], cin)
    order = [0] + [1 + 2 * i for i in range(sd)] + [2 + 2 * i for i in range(sd)] + [1 + 2 * sd]
    patches = xs.permute(*order)  # (B, *grid, *patch, Cin)
    w = net.in_proj.proj.weight.movedim(1, -1)  # (C, *patch, Cin)
    tokens = torch.einsum("b...i,ci->b...c", patches.flatten(1 + sd), w.flatten(1)) + net.in_proj.proj.bias
    pooled = tokens.reshape(b, -1, tokens.shape[-1]).mean(1)
    normed = ref_layernorm(pooled, net.final_norm.weight, net.final_norm.bias)
    return normed @ net.out_proj.weight.T + net.out_proj.bias


@pytest.mark.parametrize("spatial_dims,shape", [(1, (3, 8)), (2, (3, 4, 6)), (3, (3, 4, 2, 4))])
@pytest.mark.parametrize("mixer", ["hyena", "attention"])
def test_classification_resnet_shapes_and_init_reference(spatial_dims, shape, mixer):
    net = ClassificationResNet(2, 7, 8, 2, spatial_dims=spatial_dims, patch_size=2, mixer=mixer, num_heads=2)
    net = net.double()
    with torch.no_grad():
        for p in (net.in_proj.proj.weight, net.final_norm.weight, net.final_norm.bias, net.out_proj.bias):
            p.copy_(torch.randn_like(p))
    x = torch.randn(*shape, 2, dtype=F64)
    logits = net(x)
    assert logits.shape == (shape[0], 7)
    assert (logits - ref_classifier_at_init(net, x)).abs().max().item() < 1e-12


def test_classification_resnet_uses_the_one_patch_embed():
    torch.manual_seed(0)
    net = ClassificationResNet(3, 4, 16, 1, spatial_dims=3, patch_size=2)
    assert type(net.in_proj) is PatchEmbed and net.in_proj.channels_last
    assert isinstance(net.in_proj.proj, torch.nn.Conv3d) and net.in_proj.init == "torch"
    bound = 1 / math.sqrt(3 * 2**3)  # ConvNd's default init: weight and bias within 1 / sqrt(fan_in)
    for p in (net.in_proj.proj.weight, net.in_proj.proj.bias):
        assert 0.9 * bound < p.abs().max() <= bound
    assert net(torch.randn(2, 4, 6, 2, 3)).shape == (2, 4)


def test_classification_resnet_conditioning():
    net = randomize_blocks(ClassificationResNet(1, 4, 8, 2, spatial_dims=2, patch_size=1, condition_dim=3))
    x = torch.randn(2, 4, 4, 1)
    c1, c2 = torch.randn(2, 3), torch.randn(2, 3)
    assert (net(x, c1) - net(x, c2)).abs().max() > 1e-4
    assert net(x, torch.randn(2, 5, 3)).shape == (2, 4)  # per-token condition is mean-pooled by the blocks
    with pytest.raises(ValueError, match="condition is required"):
        net(x)
    plain = ClassificationResNet(1, 4, 8, 2, spatial_dims=2, patch_size=1)
    with pytest.raises(ValueError, match="no condition_dim"):
        plain(x, c1)
    # the learned null condition reaches the AdaLN projections: they get gradient from the first step
    plain(x).sum().backward()
    assert plain.blocks[0].condition_proj[1].weight.grad.abs().max() > 0


def test_classification_resnet_rejects_bad_inputs():
    net = ClassificationResNet(3, 4, 8, 1, spatial_dims=2, patch_size=2)
    with pytest.raises(ValueError, match="divisible by patch_size 2"):
        net(torch.randn(2, 5, 4, 3))
    with pytest.raises(ValueError, match=r"x must be \(B, \*spatial, 3\) with 2 token axes"):
        net(torch.randn(2, 3, 4, 4))  # channels-first is rejected, not silently misread
    with pytest.raises(ValueError, match=r"x must be \(B, \*spatial, 3\) with 2 token axes"):
        net(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="mixer must be one of"):
        ClassificationResNet(3, 4, 8, 1, spatial_dims=2, patch_size=2, mixer="mamba")
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3"):
        ClassificationResNet(3, 4, 8, 1, spatial_dims=4, patch_size=2)


def test_torch_compile_aot_eager():
    net = randomize_blocks(ClassificationResNet(1, 4, 8, 1, spatial_dims=2, patch_size=2, condition_dim=3))
    x, c = torch.randn(2, 4, 6, 1), torch.randn(2, 3)
    compiled = torch.compile(net, backend="aot_eager")
    y = compiled(x, c)
    y.sum().backward()
    assert torch.allclose(y, net(x, c), atol=1e-5)
    assert net.in_proj.proj.weight.grad is not None
