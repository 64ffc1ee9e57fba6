"""Fresh DiT, ConditionalDiT and ResidualDenoiser against facebookresearch/DiT ``initialize_weights``,
parameter by parameter: every tensor gets one rule (zero, xavier-uniform, normal std 0.02, sin-cos, or the
embedder's own), and the statistics are tight enough that the neighbouring inits (torch's default
kaiming-uniform, xavier on the unflattened conv kernel, N(0, 1) embeddings) fail them."""

from __future__ import annotations

import math
import re

import pytest
import torch

from adaln.models.conditioning import ConditionalDiT
from adaln.models.dit import DiT
from adaln.models.residual_denoiser import ResidualDenoiser
from adaln.nn.embeddings import get_2d_sincos_pos_embed

# Rules, first match wins: (regex on the parameter name, rule).
FB_RULES = (
    (r"(^|\.)adaLN_modulation\.proj\.1\.", "zero"),  # adaLN-Zero in every block and the final layer
    (r"^final_layer\.linear\.", "zero"),
    (r"^x_embedder\.proj\.weight$", "xavier_flat"),  # like an nn.Linear on the flattened patch
    (r"^t_embedder\.mlp\.[02]\.weight$", "normal_0.02"),
    (r"^y_embedder\.embedding_table\.weight$", "normal_0.02"),
    (r"\.bias$", "zero"),  # every other bias: _basic_init and the patch conv
    (r"\.weight$", "xavier"),  # every other Linear: _basic_init
)


def _xavier_bound(w: torch.Tensor) -> float:
    fan_out, fan_in = w.shape[0], w[0].numel()  # the kernel viewed as (out, -1), as fb does for the conv
    return math.sqrt(6 / (fan_in + fan_out))


def check_rule(name: str, p: torch.Tensor, rule: str) -> None:
    w = p.detach().double().flatten()
    n = w.numel()
    if rule == "zero":
        assert not w.any(), f"{name} must be zero"
    elif rule in ("xavier", "xavier_flat"):
        bound = _xavier_bound(p)
        assert p.dim() == (4 if rule == "xavier_flat" else 2), name
        # Uniform(-a, a): all within a, max within 3% of a (P(miss) = 0.97^n), std a / sqrt(3).
        assert w.abs().max() <= bound, f"{name}: max {w.abs().max():.4f} > xavier bound {bound:.4f}"
        assert w.abs().max() > 0.97 * bound, f"{name}: max {w.abs().max():.4f} well below xavier bound {bound:.4f}"
        std_tol = 4 * math.sqrt(0.8 / (4 * n))  # 4 standard errors of a uniform sample's std
        assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < std_tol, f"{name}: std {w.std():.4f}"
    elif rule == "normal_0.02":
        assert abs(w.std().item() / 0.02 - 1) < 4 / math.sqrt(2 * n), f"{name}: std {w.std():.5f} != 0.02"
        assert abs(w.mean().item()) < 4 * 0.02 / math.sqrt(n), f"{name}: mean {w.mean():.5f}"
        assert w.abs().max() > 2.5 * 0.02, f"{name}: no normal tail (max {w.abs().max():.4f})"  # uniform: 1.73 sd
    else:
        raise AssertionError(f"unknown rule {rule}")


def assert_fb_init(model: torch.nn.Module, extra_rules=(), own: tuple[str, ...] = ()) -> set[str]:
    """Check every parameter against ``extra_rules + FB_RULES``; names starting with ``own`` are skipped
    (layers that keep their own init). Returns the rules applied, to show each was exercised."""
    used = set()
    for name, p in model.named_parameters():
        if name.startswith(own):
            continue
        rule = next(r for pattern, r in (*extra_rules, *FB_RULES) if re.search(pattern, name))
        check_rule(name, p, rule)
        used.add(rule)
    return used


def assert_pos_embed(model) -> None:
    ref = torch.from_numpy(get_2d_sincos_pos_embed(model.hidden_size, model.grid_size)).float()
    torch.testing.assert_close(model.pos_embed.reshape(ref.shape), ref, rtol=0, atol=0)


ALL_RULES = {"zero", "xavier", "xavier_flat", "normal_0.02"}


def test_dit_init_is_fb_initialize_weights():
    torch.manual_seed(0)
    model = DiT(16, 2, 4, 64, 2, 4, num_classes=40)
    assert assert_fb_init(model) == ALL_RULES
    assert_pos_embed(model)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3.0, 500.0]), torch.tensor([0, 40])
    assert not model(x, t, y).any()  # zero output layer


def test_conditional_dit_init_is_fb_plus_its_embedders():
    torch.manual_seed(0)
    model = ConditionalDiT(16, 2, 4, 64, 2, 4, num_classes=40, vec_dim=48, token_dim=40)
    extra = (
        (r"^blocks\.\d+\.cross_modulation\.proj\.1\.", "zero"),  # cross-attention branch starts closed
        (r"^(vec_embedder\.linear_[12]|token_embedder\.y_proj\.fc[12])\.weight$", "normal_0.02"),
    )
    own = ("token_embedder.null_token",)
    assert assert_fb_init(model, extra, own) == ALL_RULES
    assert_pos_embed(model)
    null = model.token_embedder.null_token.detach().double()
    assert abs(null.std().item() * math.sqrt(40) - 1) < 0.4  # PixArt's randn / sqrt(token_dim)


@pytest.mark.parametrize("mixer", ["attention", "hyena"])
def test_residual_denoiser_init_is_fb_except_hyena(mixer):
    torch.manual_seed(0)
    model = ResidualDenoiser(16, 2, 4, 64, 2, mixer=mixer, num_heads=4, num_classes=40)
    extra = ((r"^blocks\.\d+\.condition_proj\.1\.", "zero"),)  # AdaLN-Zero of AdaLNZeroResidualBlock
    own = tuple(f"blocks.{i}.sequence_mixer." for i in range(2)) if mixer == "hyena" else ()
    assert assert_fb_init(model, extra, own) == ALL_RULES
    if mixer == "attention":
        assert_pos_embed(model)
    else:  # Hyena's own init survives _basic_init: non-zero Linear biases, zero FiLM output layer
        hyena = model.blocks[0].sequence_mixer
        assert hyena.in_proj.bias.any() and hyena.out_proj.bias.any()
        assert not hyena.filter.film.fc2.weight.any()


@pytest.mark.parametrize("wrong", ["torch_default", "unflattened_conv", "unit_embedding", "conv_bias"])
def test_the_checks_reject_neighbouring_inits(wrong):
    """The statistics above are not vacuous: each common wrong init fails them."""
    torch.manual_seed(0)
    model = DiT(16, 2, 4, 64, 2, 4, num_classes=40)
    with torch.no_grad():
        if wrong == "torch_default":
            model.blocks[0].attn.qkv.reset_parameters()
        elif wrong == "unflattened_conv":
            torch.nn.init.xavier_uniform_(model.x_embedder.proj.weight)
        elif wrong == "unit_embedding":
            model.y_embedder.embedding_table.reset_parameters()
        else:
            model.x_embedder.proj.reset_parameters()
            torch.nn.init.xavier_uniform_(model.x_embedder.proj.weight.view(64, -1))
    with pytest.raises(AssertionError):
        assert_fb_init(model)

