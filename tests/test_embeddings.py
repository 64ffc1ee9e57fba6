"""adaln.nn.embeddings against float64 references of the source formulas (numpy, written independently).

Max abs errors are recorded with ``record_property("max_abs_err", ...)``; read them with
``--junitxml=FILE -o junit_family=xunit1``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import adaln.nn
from adaln.nn.embeddings import (
    FourierEmbedding,
    LabelEmbedder,
    LabelEmbedding,
    PatchEmbed,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    timestep_embedding,
)

NPZ = Path(adaln.nn.__file__).parent / "af3_fourier_constants.npz"


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def ref_timestep_embedding(t: np.ndarray, dim: int, max_period: float = 10000.0, shift: int = 0) -> np.ndarray:
    """GLIDE/DiT: freqs_i = exp(-ln(max_period) * i / (half - shift)); [cos(t f), sin(t f)], zero column if
    odd. shift 0 is fb DiT, shift 1 diffusers' get_timestep_embedding(downscale_freq_shift=1)."""
    half = dim // 2
    out = np.zeros((len(t), dim))
    for i in range(half):
        f = math.exp(-math.log(max_period) * i / (half - shift))
        out[:, i] = np.cos(t * f)
        out[:, half + i] = np.sin(t * f)
    return out


# ----------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize("dim", [256, 7, 2])
def test_timestep_embedding_float64_reference(dim, record_property):
    t = torch.tensor([0.0, 1.0, 3.7, 250.5, 999.0], dtype=torch.float64)
    out = timestep_embedding(t, dim)
    err = np.abs(np64(out) - ref_timestep_embedding(np64(t), dim)).max()
    record_property("max_abs_err", float(err))
    assert out.shape == (5, dim) and out.dtype == torch.float64
    assert err < 1e-12
    if dim % 2:
        assert not out[:, -1].any()


def test_timestep_embedding_int_and_float32_inputs(record_property):
    t = torch.randint(0, 1000, (16,))
    out = timestep_embedding(t, 256)
    assert out.dtype == torch.float32
    # fp32 arguments t * f (|t| < 1000) carry ~1000 * 2^-24 relative error: allow 2e-4 absolute
    err = np.abs(np64(out) - ref_timestep_embedding(np64(t), 256)).max()
    record_property("max_abs_err", float(err))
    assert err < 2e-4
    assert torch.equal(out[:, 0], torch.cos(t.float())) and torch.equal(out[:, 128], torch.sin(t.float()))


def test_timestep_embedder_keys_init_and_reference(record_property):
    torch.manual_seed(2)
    m = TimestepEmbedder(384)
    assert set(m.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
    assert abs(m.mlp[0].weight.std().item() - 0.02) < 1e-3 and not m.mlp[2].bias.any()
    m = m.double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.1)
    t = torch.tensor([3.0, 500.25], dtype=torch.float64)
    h = ref_timestep_embedding(np64(t), 256) @ np64(m.mlp[0].weight).T + np64(m.mlp[0].bias)
    h = h / (1 + np.exp(-h))
    ref = h @ np64(m.mlp[2].weight).T + np64(m.mlp[2].bias)
    err = np.abs(np64(m(t)) - ref).max()
    record_property("max_abs_err", float(err))
    assert err < 1e-12


@pytest.mark.parametrize("dim", [256, 7])
def test_timestep_embedding_diffusers_spacing_float64_reference(dim, record_property):
    t = torch.tensor([0.0, 1.0, 3.7, 250.5, 999.0], dtype=torch.float64)
    out = timestep_embedding(t, dim, freq_shift=1)
    err = np.abs(np64(out) - ref_timestep_embedding(np64(t), dim, shift=1)).max()
    record_property("max_abs_err", float(err))
    assert err < 1e-12
    assert np.abs(np64(out) - ref_timestep_embedding(np64(t), dim)).max() > 1e-2  # a different spacing
    f = torch.exp(-math.log(10000) * torch.arange(dim // 2, dtype=torch.float64) / (dim // 2 - 1))
    assert f[-1].item() == pytest.approx(1e-4, rel=1e-12)  # the lowest frequency is exactly 1 / max_period


def test_timestep_embedding_equals_diffusers_bit_for_bit():
    emb = pytest.importorskip("diffusers.models.embeddings")
    t = torch.cat([torch.arange(0, 1000, 37), torch.rand(8) * 999])
    for shift in (0, 1):
        theirs = emb.get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=shift)
        assert torch.equal(timestep_embedding(t, 256, freq_shift=shift), theirs), shift
    m = TimestepEmbedder(16, freq_shift=1)
    assert m.freq_shift == 1 and "freq_shift=1" in repr(m)
    assert torch.equal(m(t), m.mlp(timestep_embedding(t, 256, freq_shift=1)))


def test_timestep_embedding_bad_inputs():
    for shift in (2, -1):
        with pytest.raises(ValueError, match="freq_shift must be 0 .fb DiT. or 1"):
            timestep_embedding(torch.zeros(2), 8, freq_shift=shift)
    with pytest.raises(ValueError, match="freq_shift must be"):
        TimestepEmbedder(8, frequency_embedding_size=2, freq_shift=1)
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        timestep_embedding(torch.zeros(2, 3), 8)
    with pytest.raises(TypeError, match="t must be a torch.Tensor"):
        timestep_embedding([1.0, 2.0], 8)


# ----------------------------------------------------------------------------- labels


def test_label_embedding_table_and_lookup():
    m = LabelEmbedding(10, 8, dropout_prob=0.1)
    assert LabelEmbedder is LabelEmbedding and m.null_class == 10
    assert m.embedding_table.weight.shape == (11, 8)
    assert LabelEmbedding(10, 8, dropout_prob=0.0).embedding_table.weight.shape == (10, 8)
    torch.manual_seed(4)
    big = LabelEmbedding(1000, 64, 0.1)
    assert abs(big.embedding_table.weight.std().item() - 0.02) < 1e-3
    labels = torch.tensor([0, 3, 9, 10])
    assert torch.equal(m(labels, train=False), m.embedding_table.weight[labels])
    forced = m(labels, train=False, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert torch.equal(forced, m.embedding_table.weight[torch.tensor([10, 3, 10, 10])])


def test_label_dropout_uses_generator_and_rate():
    m = LabelEmbedding(10, 4, dropout_prob=0.5)
    labels = torch.randint(0, 10, (4000,))
    out_a = m(labels, train=True, generator=torch.Generator().manual_seed(7))
    out_b = m(labels, train=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out_a, out_b)
    dropped = torch.rand(4000, generator=torch.Generator().manual_seed(7)) < 0.5
    expected = torch.where(dropped, torch.full_like(labels, 10), labels)
    assert torch.equal(out_a, m.embedding_table.weight[expected])
    assert abs(dropped.float().mean().item() - 0.5) < 0.05
    m.eval()
    assert torch.equal(m(labels), m.embedding_table.weight[labels])  # train=None follows eval mode


def test_label_embedding_bad_inputs():
    m = LabelEmbedding(10, 4, dropout_prob=0.1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\]"):
        m(torch.tensor([0, 11]), train=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\]"):
        m(torch.tensor([-1, 2]), train=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
        LabelEmbedding(10, 4, dropout_prob=0.0)(torch.tensor([10]), train=False)
    with pytest.raises(TypeError, match="labels must be an int32/int64 tensor"):
        m(torch.tensor([1.0, 2.0]), train=False)
    with pytest.raises(ValueError, match=r"labels must have shape \(B,\)"):
        m(torch.zeros(2, 2, dtype=torch.long), train=False)
    with pytest.raises(ValueError, match="force_drop_ids must be a tensor of shape"):
        m(torch.tensor([1, 2]), train=False, force_drop_ids=torch.tensor([1]))
    with pytest.raises(ValueError, match="dropout_prob > 0"):
        LabelEmbedding(10, 4, 0.0)(torch.tensor([1]), force_drop_ids=torch.tensor([1]))


# ----------------------------------------------------------------------------- AF3 Fourier


def test_fourier_constants_are_the_official_ones():
    data = np.load(NPZ)
    w, b = data["weight"], data["bias"]
    assert w.shape == b.shape == (256,) and w.dtype == b.dtype == np.float64
    # first/last entries of _WEIGHT and _BIAS in alphafold3 noise_level_embeddings.py
    np.testing.assert_array_equal(w[[0, 1, 2, 255]], [0.45873642, 0.06516238, -0.07278306, -0.67204583])
    np.testing.assert_array_equal(b[[0, 1, 2, 255]], [0.00465965, 0.21738243, 0.22277749, 0.80793905])
    m = FourierEmbedding()
    assert torch.equal(m.weight, torch.from_numpy(w)) and torch.equal(m.bias, torch.from_numpy(b))
    assert not list(m.parameters()) and not m.state_dict()  # non-persistent buffers


@pytest.mark.parametrize("shape", [(), (5,), (2, 3)])
def test_fourier_embedding_float64_reference(shape, record_property):
    data = np.load(NPZ)
    sigma = torch.rand(shape, dtype=torch.float64) * 160 + 4e-4 * 16
    c_noise = 0.25 * torch.log(sigma / 16.0)  # AF3: c_noise = 1/4 log(sigma / sigma_data)
    out = FourierEmbedding()(c_noise)
    ref = np.cos(2 * np.pi * (np64(c_noise)[..., None] * data["weight"] + data["bias"]))
    err = np.abs(np64(out) - ref).max()
    record_property("max_abs_err", float(err))
    assert out.shape == (*shape, 256) and out.dtype == torch.float64
    assert err < 1e-12


def test_fourier_embedding_float32_matches_official_float32_maths(record_property):
    data = np.load(NPZ)
    c_noise = torch.randn(64)
    out = FourierEmbedding()(c_noise)
    w32, b32 = data["weight"].astype(np.float32), data["bias"].astype(np.float32)
    ref32 = np.cos(np.float32(2 * np.pi) * (c_noise.numpy()[:, None] * w32 + b32))
    err = np.abs(out.numpy() - ref32).max()
    record_property("max_abs_err", float(err))
    assert out.dtype == torch.float32 and err < 1e-5
    half = FourierEmbedding()(c_noise.bfloat16())
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()


def test_fourier_embedding_bad_inputs():
    with pytest.raises(ValueError, match="dim must be 256"):
        FourierEmbedding(128)
    with pytest.raises(TypeError, match="c_noise must be a floating-point tensor"):
        FourierEmbedding()(torch.tensor([1, 2]))


# ----------------------------------------------------------------------------- patches and positions


def test_patch_embed_float64_reference(record_property):
    p, (h, w), cin, d = 4, (8, 12), 3, 5
    m = PatchEmbed((h, w), p, cin, d).double()
    assert m.grid_size == (2, 3) and m.num_patches == 6 and m.patch_size == (4, 4)
    assert set(m.state_dict()) == {"proj.weight", "proj.bias"}
    with torch.no_grad():
        m.proj.bias.normal_()
    x = torch.randn(2, cin, h, w, dtype=torch.float64)
    out = m(x)
    wt, bias, xn = np64(m.proj.weight), np64(m.proj.bias), np64(x)
    ref = np.zeros((2, 6, d))
    for i in range(2):
        for j in range(3):
            patch = xn[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]
            ref[:, i * 3 + j] = np.einsum("bcuv,dcuv->bd", patch, wt) + bias
    err = np.abs(np64(out) - ref).max()
    record_property("max_abs_err", float(err))
    assert out.shape == (2, 6, d) and err < 1e-12


def test_patch_embed_bad_inputs():
    with pytest.raises(ValueError, match="must be divisible by patch_size 4"):
        PatchEmbed((8, 10), 4, 3, 5)
    m = PatchEmbed(8, 4, 3, 5)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, 8, 8\)"):
        m(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, 8, 8\)"):
        m(torch.randn(2, 3, 8, 12))
    with pytest.raises(ValueError, match="x must have at least 4 dims"):
        m(torch.randn(3, 8, 8))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        m(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize("spatial_dims,size", [(1, (8,)), (2, (4, 6)), (3, (2, 4, 6))])
def test_patch_embed_channels_last_float64_reference(spatial_dims, size, record_property):
    """channels_last=True: (B, *spatial, C) -> (B, *spatial / p, D), each token the patch dotted with the kernel."""
    p, cin, d = 2, 3, 5
    m = PatchEmbed(None, p, cin, d, spatial_dims=spatial_dims, channels_last=True).double()
    assert m.img_size is None and m.grid_size is None and m.patch_size == (p,) * spatial_dims
    with torch.no_grad():
        m.proj.bias.normal_()
    x = torch.randn(2, *size, cin, dtype=torch.float64)
    out = m(x)
    grid = [n // p for n in size]
    assert out.shape == (2, *grid, d)
    w, xn = np.moveaxis(np64(m.proj.weight), 1, -1).reshape(d, -1), np64(x)  # (D, *patch * Cin)
    ref = np.zeros((2, *grid, d))
    for idx in np.ndindex(*grid):
        patch = xn[(slice(None), *(slice(i * p, (i + 1) * p) for i in idx))]  # (B, *patch, Cin)
        ref[(slice(None), *idx)] = patch.reshape(2, -1) @ w.T + np64(m.proj.bias)
    err = np.abs(np64(out) - ref).max()
    record_property("max_abs_err", float(err))
    assert err < 1e-12
    assert m(torch.randn(1, *[2 * n for n in size], cin, dtype=torch.float64)).shape == (1, *[n for n in size], d)


def test_patch_embed_named_inits():
    torch.manual_seed(0)
    dit, torch_init = PatchEmbed(16, 2, 4, 64), PatchEmbed(16, 2, 4, 64, init="torch")
    bound = math.sqrt(6 / (4 * 2 * 2 + 64))  # xavier on the kernel viewed as (64, 16)
    assert not dit.proj.bias.any() and bound * 0.97 < dit.proj.weight.abs().max() <= bound
    assert torch_init.proj.bias.any() and torch_init.proj.weight.abs().max() <= 1 / math.sqrt(16)  # ConvNd default
    with pytest.raises(ValueError, match="init must be one of"):
        PatchEmbed(16, 2, 4, 64, init="xavier")
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3"):
        PatchEmbed(None, 2, 4, 64, spatial_dims=4)
    with pytest.raises(ValueError, match="patch_size must be an int >= 1"):
        PatchEmbed(16, 0, 4, 64)


def test_patch_embed_layout_errors():
    last = PatchEmbed(None, 2, 3, 5, channels_last=True)
    with pytest.raises(ValueError, match=r"x must be \(B, \*spatial, 3\) with 2 token axes \(channels-last\)"):
        last(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"every spatial size of x \(5, 4\) must be divisible by patch_size 2"):
        last(torch.randn(2, 5, 4, 3))
    fixed_last = PatchEmbed((4, 6), 2, 3, 5, channels_last=True)
    with pytest.raises(ValueError, match=r"x must have spatial size \(4, 6\), got \(4, 4\)"):
        fixed_last(torch.randn(2, 4, 4, 3))
    first = PatchEmbed(None, 2, 3, 5)
    assert first(torch.randn(2, 3, 4, 6)).shape == (2, 6, 5)
    with pytest.raises(ValueError, match=r"x must be \(B, 3, \*spatial\) with 2 spatial axes"):
        first(torch.randn(2, 4, 4, 6))


def test_2d_sincos_pos_embed_non_square_rederivation(record_property):
    d, (h, w) = 16, (3, 5)
    out = get_2d_sincos_pos_embed(d, (h, w))
    ref = np.zeros((h * w, d))
    q = d // 4
    for i in range(h):
        for j in range(w):
            for k in range(q):
                omega = 10000.0 ** (-k / q)
                # first half: column (w) coordinate; second half: row (h); each [sin..., cos...]
                ref[i * w + j, [k, q + k, 2 * q + k, 3 * q + k]] = [
                    math.sin(j * omega), math.cos(j * omega), math.sin(i * omega), math.cos(i * omega)
                ]
    err = np.abs(out - ref).max()
    record_property("max_abs_err", float(err))
    assert out.dtype == np.float64 and out.shape == (15, 16) and err < 1e-12


def test_2d_sincos_pos_embed_square_matches_dit_layout():
    g, d = 4, 8
    grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)))  # w first
    omega = 1.0 / 10000 ** (np.arange(d // 4, dtype=np.float64) / (d // 4))

    def one_axis(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    dit = np.concatenate([one_axis(grid[0]), one_axis(grid[1])], axis=1)
    np.testing.assert_allclose(get_2d_sincos_pos_embed(d, g), dit, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="embed_dim must be divisible by 4"):
        get_2d_sincos_pos_embed(6, 4)
