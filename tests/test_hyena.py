"""Hyena against float64 references written from the source formulas (safari hyena.py, Poli et al. 2023)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from adaln.nn.blocks import AdaLNZeroResidualBlock
from adaln.nn.hyena import Hyena, fft_long_conv, filter_positions
from adaln.nn.mlp import Mlp

F64 = torch.float64


def direct_conv(u, k, mode):
    """y[b, t, c] = sum_s k[b, idx(t, s), c] u[b, s, c] by explicit loops over output and input positions.

    Kernel index of offset d = t - s per axis (nvSubquadratic ops/fftconv.py, ops/circular_fftconv.py):
    centred d + K // 2 (zero outside 0..K-1), causal d (d >= 0), circular (d + (K - 1) // 2) mod n
    (zero when >= K). ``mode`` is one string or one per axis ("centred" / "circular").
    """
    sizes, taps = u.shape[1:-1], k.shape[1:-1]
    modes = [mode] * len(sizes) if isinstance(mode, str) else list(mode)
    y = torch.zeros_like(u)
    kb = k.expand(u.shape[0], *k.shape[1:])
    for t in itertools.product(*map(range, sizes)):
        for s in itertools.product(*map(range, sizes)):
            idx = []
            for ti, si, n, kk, m in zip(t, s, sizes, taps, modes):
                if m == "centred":
                    idx.append(ti - si + kk // 2)
                elif m == "causal":
                    idx.append(ti - si)
                else:
                    idx.append((ti - si + (kk - 1) // 2) % n)
            if all(0 <= j < kk for j, kk in zip(idx, taps)):
                y[(slice(None), *t)] += kb[(slice(None), *idx)] * u[(slice(None), *s)]
    return y


# (sizes, mode, taps): odd and even sizes, full and shorter kernels, per-axis mixed boundaries.
CONV_CASES = [
    ((7,), "centred", (13,)),
    ((6,), "centred", (5,)),
    ((9,), "causal", (9,)),
    ((7,), "circular", (7,)),
    ((6,), "circular", (6,)),
    ((6,), "circular", (5,)),
    ((5, 7), "centred", (9, 13)),
    ((5, 4), "circular", (5, 3)),
    ((4, 5), ("circular", "centred"), (3, 9)),
    ((3, 5, 7), "centred", (5, 9, 13)),
    ((3, 5, 4), "circular", (3, 5, 4)),
    ((3, 4, 5), ("centred", "circular", "circular"), (5, 3, 5)),
]


@pytest.mark.parametrize("sizes,mode,taps", CONV_CASES)
@pytest.mark.parametrize("kernel_batch", [1, 2])
def test_fft_long_conv_matches_direct_convolution(sizes, mode, taps, kernel_batch):
    u = torch.randn(2, *sizes, 3, dtype=F64)
    k = torch.randn(kernel_batch, *taps, 3, dtype=F64)
    modes = [mode] * len(sizes) if isinstance(mode, str) else mode
    circular = tuple(m == "circular" for m in modes)
    y = fft_long_conv(u, k, spatial_dims=len(sizes), causal=mode == "causal", circular=circular)
    ref = direct_conv(u, k, mode)
    err = (y - ref).abs().max().item()
    assert y.dtype == F64 and y.shape == u.shape
    assert err < 1e-12, err


def test_fft_long_conv_circular_kernel_is_centred():
    """A circular kernel with a single one at index (K - 1) // 2 is the identity (offset 0)."""
    u = torch.randn(1, 6, 5, 2, dtype=F64)
    k = torch.zeros(1, 5, 5, 2, dtype=F64)
    k[0, 2, 2] = 1.0
    assert torch.allclose(fft_long_conv(u, k, spatial_dims=2, circular=True), u, atol=1e-12)
    k = torch.zeros(1, 6, 5, 2, dtype=F64)
    k[0, 2, 2] = 1.0  # K = 6 on the first axis: centre (6 - 1) // 2 = 2 as well
    assert torch.allclose(fft_long_conv(u, k, spatial_dims=2, circular=True), u, atol=1e-12)


def test_fft_long_conv_half_precision_runs_in_fp32():
    u = torch.randn(2, 6, 5, 4)
    k = torch.randn(1, 11, 9, 4)
    y = fft_long_conv(u.bfloat16(), k.bfloat16(), spatial_dims=2)
    ref = direct_conv(u.bfloat16().double(), k.bfloat16().double(), "centred")
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_fft_long_conv_rejects_bad_shapes():
    u = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"k must be \(1 or 2, \*K, 3\) with K <= S on circular axes"):
        fft_long_conv(u, torch.randn(1, 10, 3), spatial_dims=1)
    with pytest.raises(ValueError, match=r"k must be .* K <= S on circular axes"):
        fft_long_conv(u, torch.randn(1, 6, 3), spatial_dims=1, circular=True)
    with pytest.raises(ValueError, match=r"with K = S"):
        fft_long_conv(u, torch.randn(1, 4, 3), spatial_dims=1, causal=True)
    with pytest.raises(ValueError, match="circular must be a bool or 2 bools"):
        fft_long_conv(torch.randn(1, 3, 3, 2), torch.randn(1, 3, 3, 2), spatial_dims=2, circular=(True,))
    with pytest.raises(ValueError, match="u must be"):
        fft_long_conv(u, torch.randn(1, 9, 3), spatial_dims=2)
    with pytest.raises(ValueError, match="causal=True needs spatial_dims=1"):
        fft_long_conv(torch.randn(1, 3, 3, 2), torch.randn(1, 3, 3, 2), spatial_dims=2, causal=True)
    with pytest.raises(TypeError, match="u must be a floating-point tensor"):
        fft_long_conv(torch.ones(2, 5, 3, dtype=torch.long), torch.randn(1, 9, 3), spatial_dims=1)


# ---------------------------------------------------------------------------------------------------
# Float64 reference of the whole operator, written from the source formulas.
# ---------------------------------------------------------------------------------------------------


def ref_filter(f, sizes, mode, cond=None):
    """safari HyenaFilter: [t, cos fw, -sin fw] -> (Linear, Sin) x 3 (+ FiLM) -> Linear, * exp(-|delta| t).

    Taps: offsets -(n-1)..n-1 (centred), 0..n-1 (causal), -((n-1)//2)..n//2 (circular); t = offset/(n-1).
    """
    bands = torch.linspace(1e-4, 3, 4, dtype=F64)  # 4 bands: f = 1e-4, 1, 2, 3
    axes_feats, axes_t = [], []
    for n in sizes:
        bounds = {"centred": (-(n - 1), n - 1), "causal": (0, n - 1), "circular": (-((n - 1) // 2), n // 2)}
        m = torch.arange(bounds[mode][0], bounds[mode][1] + 1, dtype=F64)
        w = 2 * math.pi * m / len(m)
        axes_t.append(m / max(n - 1, 1))
        fw = w[:, None] * bands
        axes_feats.append(torch.cat([axes_t[-1][:, None], torch.cos(fw), -torch.sin(fw)], 1))
    taps = [len(t) for t in axes_t]
    z = torch.zeros(*taps, sum(a.shape[1] for a in axes_feats), dtype=F64)
    dist = torch.zeros(*taps, dtype=F64)
    for idx in itertools.product(*map(range, taps)):
        z[idx] = torch.cat([a[i] for a, i in zip(axes_feats, idx)])
        dist[idx] = sum(abs(t[i]) for t, i in zip(axes_t, idx))
    h = z[None]
    film = None
    if cond is not None:
        hidden = F.gelu(cond @ f.film.fc1.weight.T + f.film.fc1.bias)
        film = (hidden @ f.film.fc2.weight.T + f.film.fc2.bias).reshape(cond.shape[0], len(f.layers), 2, -1)
    for i, layer in enumerate(f.layers):
        h = torch.sin(f.act.freq * (h @ layer.weight.T + layer.bias))
        if film is not None:
            shape = (cond.shape[0],) + (1,) * len(sizes) + (-1,)
            h = (1 + film[:, i, 0]).reshape(shape) * h + film[:, i, 1].reshape(shape)
    deltas = torch.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, f.channels, dtype=F64).abs()
    return (h @ f.out.weight.T) * torch.exp(-dist[..., None] * deltas)


def ref_hyena(m, x, cond=None):
    """Poli et al. 2023 Def. 3.1: v <- x_n * (h_n * v + D_n v), n = 1..N, after in_proj and short conv."""
    c, sd = m.dim, m.spatial_dims
    u = x @ m.in_proj.weight.T + m.in_proj.bias
    w = m.short_conv.conv.weight  # (channels, 1, *kernel)
    ks = w.shape[-1]
    uc = u.movedim(-1, 1)
    if m.causal:
        uc = F.pad(uc, (ks - 1, 0))
    elif m.circular:
        uc = F.pad(uc, (ks // 2,) * (2 * sd), mode="circular")
    else:
        uc = F.pad(uc, (ks // 2,) * (2 * sd))
    conv = (F.conv1d, F.conv2d, F.conv3d)[sd - 1]
    u = conv(uc, w, m.short_conv.conv.bias, groups=w.shape[0]).movedim(1, -1)
    chunks = [u[..., i * c : (i + 1) * c] for i in range(m.order + 1)]
    v = chunks[-1]
    mode = "causal" if m.causal else "circular" if m.circular else "centred"
    k = ref_filter(m.filter, x.shape[1:-1], mode, cond)
    for n in range(m.order):
        k_n, d_n = k[..., n * c : (n + 1) * c], m.filter.bias[n * c : (n + 1) * c]
        v = chunks[n] * (direct_conv(v, k_n, mode) + d_n * v)
    return v @ m.out_proj.weight.T + m.out_proj.bias


def randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module


HYENA_CASES = [
    (dict(spatial_dims=1), (2, 7)),
    (dict(spatial_dims=1, causal=True, order=3), (2, 6)),
    (dict(spatial_dims=1, circular=True, short_kernel=5), (2, 7)),
    (dict(spatial_dims=2), (2, 3, 5)),
    (dict(spatial_dims=2, circular=True, order=1), (2, 4, 3)),
    (dict(spatial_dims=3, filter_hidden=8), (1, 3, 2, 3)),
]


@pytest.mark.parametrize("kwargs,shape", HYENA_CASES)
def test_hyena_matches_float64_reference(kwargs, shape):
    m = randomize(Hyena(4, filter_hidden=kwargs.pop("filter_hidden", 16), **kwargs)).double()
    x = torch.randn(*shape, 4, dtype=F64)
    y = m(x)
    ref = ref_hyena(m, x)
    err = (y - ref).abs().max().item()
    assert y.shape == x.shape
    assert err < 1e-10 * max(1.0, ref.abs().max().item()), err


@pytest.mark.parametrize("kwargs,shape", [HYENA_CASES[0], HYENA_CASES[3], HYENA_CASES[5]])
def test_hyena_film_matches_float64_reference(kwargs, shape):
    m = randomize(Hyena(4, filter_hidden=kwargs.pop("filter_hidden", 16), cond_dim=5, **kwargs)).double()
    x, cond = torch.randn(*shape, 4, dtype=F64), torch.randn(shape[0], 5, dtype=F64)
    y = m(x, cond)
    ref = ref_hyena(m, x, cond)
    assert (y - ref).abs().max().item() < 1e-10 * max(1.0, ref.abs().max().item())


def test_film_is_exact_identity_at_init_and_learns_the_condition():
    m = Hyena(8, spatial_dims=2, cond_dim=6, filter_hidden=16)
    x = torch.randn(3, 5, 6, 8)
    c1, c2 = torch.randn(3, 6), torch.randn(3, 6)
    y0 = m(x)
    assert torch.equal(m(x, c1), y0)
    assert torch.equal(m(x, c2), y0)
    plain = Hyena(8, spatial_dims=2, filter_hidden=16)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("filter.film.")})
    assert torch.allclose(plain(x), y0, rtol=0, atol=1e-6)

    loss = (m(x, c1) - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    assert m.filter.film.fc2.weight.grad.abs().max() > 0
    with torch.no_grad():  # one plain SGD step
        for p in m.parameters():
            p -= 0.1 * p.grad
    assert (m(x, c1) - m(x, c2)).abs().max() > 1e-6


def test_causal_hyena_ignores_the_future():
    m = Hyena(4, spatial_dims=1, causal=True, short_kernel=4)
    x = torch.randn(2, 9, 4)
    x2 = x.clone()
    x2[:, 5:] += torch.randn(2, 4, 4)
    y, y2 = m(x), m(x2)
    assert torch.allclose(y[:, :5], y2[:, :5], atol=1e-6)
    assert (y[:, 5:] - y2[:, 5:]).abs().max() > 1e-3


def test_circular_filter_taps_are_the_shortest_signed_offsets():
    """Periodic boundary: the neighbour at offset -1 is as near as the one at +1 (same t, same window)."""
    for n in (5, 6):
        _, t = filter_positions((n,), mode="circular", dtype=F64)
        c = (n - 1) // 2  # kernel index of offset 0 in fft_long_conv's circular mode
        assert t[c, 0] == 0 and t[c - 1, 0] == -t[c + 1, 0] == -1 / (n - 1)
        assert torch.equal(t[:, 0] * (n - 1), torch.arange(-c, n - c, dtype=F64))


def test_circular_hyena_is_shift_equivariant():
    m = Hyena(4, spatial_dims=2, circular=True).double()
    x = torch.randn(2, 5, 6, 4, dtype=F64)
    shifted = m(torch.roll(x, (2, -1), dims=(1, 2)))
    assert torch.allclose(shifted, torch.roll(m(x), (2, -1), dims=(1, 2)), atol=1e-12)


def test_hyena_any_size_and_dtypes():
    m = Hyena(8, spatial_dims=2)
    for size in ((4, 4), (7, 3), (1, 1)):
        assert m(torch.randn(2, *size, 8)).shape == (2, *size, 8)
    x = torch.randn(2, 5, 5, 8)
    y32 = m(x)
    y16 = m.to(torch.bfloat16)(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    rel = ((y16.float() - y32).norm() / y32.norm()).item()
    assert rel < 5e-2, rel
    assert m.double()(x.double()).dtype == F64


def test_hyena_rejects_bad_arguments():
    with pytest.raises(ValueError, match="causal=True is only defined for spatial_dims=1"):
        Hyena(4, spatial_dims=2, causal=True)
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3"):
        Hyena(4, spatial_dims=4)
    with pytest.raises(ValueError, match="short_kernel"):
        Hyena(4, short_kernel=4)
    with pytest.raises(ValueError, match="mutually exclusive"):
        Hyena(4, causal=True, circular=True)
    m = Hyena(4, spatial_dims=2)
    with pytest.raises(ValueError, match=r"x must be \(B, \*spatial, 4\) with 2 token axes"):
        m(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match=r"x must be \(B, \*spatial, 4\)"):
        m(torch.randn(2, 5, 5, 3))
    with pytest.raises(ValueError, match="no cond_dim"):
        m(torch.randn(2, 5, 5, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"conditioning must be \(B, cond_dim\) = \(2, 6\)"):
        Hyena(4, cond_dim=6)(torch.randn(2, 5, 4), torch.randn(2, 5))


def test_adaln_zero_block_forwards_conditioning_to_hyena_and_is_identity_at_init():
    c = 8
    block = AdaLNZeroResidualBlock(
        sequence_mixer=lambda: Hyena(c, spatial_dims=2, cond_dim=c),
        sequence_mixer_norm=lambda: torch.nn.LayerNorm(c, elementwise_affine=False),
        mlp=lambda: Mlp(c, 4 * c),
        mlp_norm=lambda: torch.nn.LayerNorm(c, elementwise_affine=False),
        condition_norm=torch.nn.Identity,
        dropout=torch.nn.Identity,
        hidden_dim=c,
    )
    seen = {}
    block.sequence_mixer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    x, cond = torch.randn(2, 4, 5, c), torch.randn(2, c)
    assert torch.equal(block(x, cond), x)
    assert torch.equal(seen["conditioning"], cond)
