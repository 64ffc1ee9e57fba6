"""nvSubquadratic's Hyena (QKVSequenceMixer / Hyena / CKConvND / SIREN and RFF kernels / KernelFiLMGenerator)
against float64 references written here from nvSubquadratic's formulas (modules/ckconv_nd.py, kernels_nd.py,
film.py, masks_nd.py, hyena_nd.py, sequence_mixer.py; ops/fftconv.py, circular_fftconv.py): direct
convolution sums, no FFT."""

import functools
import math

import pytest
import torch
from torch import nn

from adaln.nn.blocks import AdaLNZeroResidualBlock
from adaln.nn.ckconv import (
    CausalConv1D,
    CKConvND,
    ExponentialModulationND,
    GaussianModulationND,
    HyenaND,
    KernelFiLMGenerator,
    L2Norm,
    QKVSequenceMixer,
    RandomFourierKernelND,
    SIRENKernelND,
    hyena_mixer,
    small_init,
    wang_init,
)
from adaln.nn.mlp import Mlp

F64 = torch.float64
C, COND, HID = 4, 3, 8  # channels, condition width, kernel-network width


# ---------------------------------------------------------------------------------------------------
# Float64 references.
# ---------------------------------------------------------------------------------------------------


def ref_conv(u, k, modes):
    """y[t] = sum_s k[idx(t - s)] u[s] by a direct sum over every (t, s) pair, per axis:
    zero: idx = d + K // 2 (crop start K // 2 of ops/fftconv.py); causal: idx = d >= 0;
    circular: idx = (d + (K - 1) // 2) mod n (shift -((K - 1) // 2) of ops/circular_fftconv.py); taps
    outside 0..K-1 are zero."""
    sizes, taps = u.shape[1:-1], k.shape[1:-1]
    d_axes = len(sizes)
    gather, valid = [], torch.ones((), dtype=torch.bool)
    for a, (n, kk, mode) in enumerate(zip(sizes, taps, modes)):
        d = torch.arange(n)[:, None] - torch.arange(n)[None, :]  # (t, s)
        idx = {"zero": d + kk // 2, "causal": d, "circular": (d + (kk - 1) // 2) % n}[mode]
        ok = (idx >= 0) & (idx < kk)
        shape = [1] * (2 * d_axes)
        shape[2 * a], shape[2 * a + 1] = n, n
        gather.append(idx.clamp(0, kk - 1).view(shape))
        valid = valid & ok.view(shape)
    kb = k.expand(u.shape[0], *k.shape[1:])
    w = kb[(slice(None), *gather)] * valid[None, ..., None]  # (B, t1, s1, ..., tD, sD, C)
    letters = "ijklmnop"
    t_idx, s_idx = letters[:d_axes], letters[d_axes : 2 * d_axes]
    w_idx = "".join(t + s for t, s in zip(t_idx, s_idx))
    return torch.einsum(f"b{w_idx}c,b{s_idx}c->b{t_idx}c", w, u)


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def positions(grid_lens, L_cache):
    """Kernel grid: offsets -(L-1)..L-1 per axis at step 1 / (L_cache - 1), (1, *(2L-1), D)."""
    axes = [torch.arange(-(n - 1), n, dtype=F64) / (L - 1) for n, L in zip(grid_lens, L_cache)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)[None]


def lin(layer, h):
    return h @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def ref_film(gen, cond):
    out = lin(gen.mlp[2], gelu(lin(gen.mlp[0], cond)))
    out = out.view(cond.shape[0], gen.num_film_layers, 2, gen.kernel_hidden_dim)
    return [(out[:, i, 0], out[:, i, 1]) for i in range(gen.num_film_layers)]


def apply_film(h, gamma, beta):
    shape = (gamma.shape[0],) + (1,) * (h.dim() - 2) + (-1,)
    return gamma.view(shape) * h + beta.view(shape)


def ref_siren(kernel, grid_lens, L_cache, cond=None):
    """h = sin(W0 p + b0); h = sin(W_i h + b_i) (+ FiLM gamma*h + beta) for each hidden layer; W_out h + b."""
    p = positions(grid_lens, L_cache)
    h = torch.sin(lin(kernel.positional_embedding.linear, p))
    film = ref_film(kernel.film_generator, cond) if cond is not None and kernel.film_generator else None
    if film and kernel.film_after_pos_embed:
        h, film = apply_film(h, *film[0]), film[1:]
    for i, layer in enumerate(kernel.hidden_linears):
        h = torch.sin(lin(layer, h))
        if film:
            h = apply_film(h, *film[i])
    return lin(kernel.out_linear, h), p


def ref_rff(kernel, grid_lens, L_cache):
    """phi = [cos(W p + b), sin(W p + b)]; MLP with SiLU; linear readout."""
    z = lin(kernel.positional_embedding.linear, positions(grid_lens, L_cache))
    h = torch.cat([torch.cos(z), torch.sin(z)], dim=-1)
    for layer in kernel.kernel_network:
        if isinstance(layer, nn.Linear):
            h = lin(layer, h)
            h = h * torch.sigmoid(h)  # every Linear is followed by the SiLU
    return lin(kernel.out_linear, h), positions(grid_lens, L_cache)


def ref_mask(mask, p, k):
    if mask is None:
        return k
    if isinstance(mask, ExponentialModulationND):
        return k * torch.exp(-p.abs()[..., None] * mask.weight.abs()).prod(dim=-2)
    std = mask.std_param.clamp(mask.min_std, mask.max_std)
    return k * torch.exp(-0.5 * (p.square()[..., None] / std.square()).sum(dim=-2))


def ref_ckconv(conv, z, cond, L_cache):
    """grid_lens (n+1)//2 on single-grid axes (L_cache halved there); kernel, mask, causal crop, conv + Dz."""
    sizes = z.shape[1:-1]
    single = conv.single_grid
    grid_lens = [(n + 1) // 2 if s else n for n, s in zip(sizes, single)]
    L_eff = [(L + 1) // 2 if s else L for L, s in zip(L_cache, single)]
    if isinstance(conv.kernel, SIRENKernelND):
        k, p = ref_siren(conv.kernel, grid_lens, L_eff, cond)
    else:
        k, p = ref_rff(conv.kernel, grid_lens, L_eff)
    k = ref_mask(conv.mask, p, k)
    if conv.is_causal:
        k = k[:, sizes[0] - 1 :]
    modes = ["causal"] if conv.is_causal else ["circular" if c else "zero" for c in conv.periodic]
    return ref_conv(z, k, modes) + conv.shortcut * z


def ref_norm(norm, x):
    if norm is None:
        return x
    if isinstance(norm, nn.RMSNorm):
        return x / torch.sqrt(x.square().mean(-1, keepdim=True) + norm.eps) * norm.weight
    if isinstance(norm, L2Norm):
        return x / x.norm(dim=-1, keepdim=True)
    if isinstance(norm, nn.GroupNorm):  # one group: statistics over channels and tokens of each sample
        dims = tuple(range(1, x.dim()))
        mu, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)  # LayerNorm
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def ref_gate(gate, x):
    return {nn.SiLU: lambda t: t * torch.sigmoid(t), nn.Sigmoid: torch.sigmoid, nn.Identity: lambda t: t}[
        type(gate)
    ](x)


def ref_mixer(m, x, cond, L_cache):
    """QKVSequenceMixer(Hyena): qkv proj, depthwise short conv, QK-norm, gates, CKConv, norms, out proj."""
    h = m.mixer
    q, k, v = lin(m.qkv_proj, x).chunk(3, dim=-1)
    conv_w = h.short_conv.weight
    ks, d = conv_w.shape[-1], x.dim() - 2
    u = torch.cat([q, k, v], dim=-1).movedim(-1, 1)
    pads = (ks - 1, 0) if h.global_conv.is_causal else (ks // 2,) * (2 * d)
    u = (torch.conv1d, torch.conv2d, torch.conv3d)[d - 1](
        nn.functional.pad(u, pads), conv_w, groups=conv_w.shape[0]
    )
    q, k, v = u.movedim(1, -1).chunk(3, dim=-1)
    q = ref_norm(h.q_norm, q)
    if isinstance(h.gate_nonlinear, nn.Identity):
        k = ref_norm(h.k_norm, k)
    z = ref_norm(h.pixelhyena_norm, q * ref_gate(h.gate_nonlinear, k))
    y = ref_ckconv(h.global_conv, z, cond, L_cache) * ref_gate(h.gate_nonlinear_2, v)
    return lin(m.out_proj, ref_norm(h.output_norm, y))


# ---------------------------------------------------------------------------------------------------
# Builders.
# ---------------------------------------------------------------------------------------------------


def siren_cfg(d, L_cache, film=True, cond_dim=COND, **kw):
    film_cfg = functools.partial(KernelFiLMGenerator, cond_dim, HID, 2) if film else None
    return functools.partial(
        SIRENKernelND, C, d, HID, 3, HID, 10.0, L_cache, True, hidden_omega_0=1.0, film_cfg=film_cfg, **kw
    )


def rff_cfg(d, L_cache):
    return functools.partial(
        RandomFourierKernelND, C, d, HID, 3, HID, 2.0, L_cache, True, nonlinear_cfg=nn.SiLU
    )


def short_conv(d, causal):
    if d == 1:
        return CausalConv1D(3 * C, 3 * C, 3, groups=3 * C, bias=False, is_causal=causal)
    return (nn.Conv2d, nn.Conv3d)[d - 2](3 * C, 3 * C, 3, groups=3 * C, padding=1, bias=False)


def build(d, kernel, mask, grid_type, fft_padding, causal=False, norm="rms", gate="silu"):
    conv = CKConvND(d, C, kernel, mask, grid_type=grid_type, fft_padding=fft_padding, is_causal=causal)
    norms = {
        "rms": lambda: nn.RMSNorm(C, eps=1e-6),
        "layer": lambda: nn.LayerNorm(C),
        "group": lambda: nn.GroupNorm(1, C),
    }
    gates = {"silu": (nn.SiLU(), nn.Sigmoid()), "id": (nn.Identity(), None)}[gate]
    mixer = HyenaND(conv, short_conv(d, causal), gates[0], norms[norm], L2Norm, norms[norm], gates[1])
    return QKVSequenceMixer(C, mixer, qkv_bias=True)


def randomize(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.endswith("std_param"):  # the Gaussian window's std stays inside its clamp range
                p.copy_(torch.randn_like(p) * 0.5)
    return module


def exp_mask(d):
    return functools.partial(ExponentialModulationND, d, C)


def gauss_mask(d):
    return functools.partial(GaussianModulationND, d, C)


# (data_dim, kernel, mask, grid_type, fft_padding, causal, norm, gate, sizes, L_cache)
OPERATOR_CASES = [
    (1, "siren", None, "double", "zero", True, "rms", "silu", (7,), 8),
    (1, "siren", "exp", "double", "zero", False, "layer", "id", (9,), 8),
    (1, "rff", "gauss", "single", "circular", False, "rms", "silu", (7,), 8),
    (2, "siren", "gauss", "double", "zero", False, "rms", "silu", (5, 7), 6),
    (2, "siren", None, "single", "circular", False, "group", "id", (5, 7), 6),
    (2, "siren", "exp", "single", "circular", False, "rms", "silu", (5, 6), 6),  # even axis: K = n - 1
    (2, "rff", "exp", None, ["circular", "zero"], False, "rms", "silu", (5, 3), 6),
    (2, "siren", None, "double", "zero", False, "rms", "silu", (9, 7), 4),  # larger than L_cache
    (3, "siren", "exp", "double", "zero", False, "rms", "silu", (3, 5, 3), 4),
    (3, "siren", "gauss", "single", "circular", False, "layer", "silu", (3, 5, 3), 4),
]


def make_case(d, kernel, mask, grid_type, fft_padding, causal, norm, gate, L_cache):
    kcfg = siren_cfg(d, L_cache) if kernel == "siren" else rff_cfg(d, L_cache)
    mcfg = {None: None, "exp": exp_mask(d), "gauss": gauss_mask(d)}[mask]
    return build(d, kcfg, mcfg, grid_type, fft_padding, causal, norm, gate)


# ---------------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", OPERATOR_CASES, ids=lambda c: f"{c[0]}d-{c[1]}-{c[4]}-{'causal' if c[5] else ''}"
)
def test_operator_matches_float64_reference(case):
    d, kernel, mask, grid_type, fft_padding, causal, norm, gate, sizes, L_cache = case
    m = randomize(make_case(d, kernel, mask, grid_type, fft_padding, causal, norm, gate, L_cache)).double()
    x = torch.randn(2, *sizes, C, dtype=F64)
    cond = torch.randn(2, COND, dtype=F64)
    y = m(x, conditioning=cond)
    ref = ref_mixer(m, x, cond if kernel == "siren" else None, (L_cache,) * d)
    err = (y - ref).abs().max().item()
    assert y.shape == x.shape and y.dtype == F64
    assert err <= 1e-10 * max(1.0, ref.abs().max().item()), err


@pytest.mark.parametrize("sizes,padding,grid", [((6,), "zero", "double"), ((5, 4), "circular", "single")])
def test_siren_and_rff_kernels_match_float64_reference(sizes, padding, grid):
    d, L_cache = len(sizes), (5,) * len(sizes)
    grid_lens = [(n + 1) // 2 if grid == "single" else n for n in sizes]
    L_eff = [(L + 1) // 2 if grid == "single" else L for L in L_cache]
    cond = torch.randn(3, COND, dtype=F64)
    for cfg, film in ((siren_cfg(d, L_cache), True), (rff_cfg(d, L_cache), False)):
        conv = randomize(CKConvND(d, C, cfg, grid_type=grid, fft_padding=padding)).double()
        k, p = conv.kernel(grid_lens, conditioning=cond)  # the RFF kernel ignores the condition
        if film:
            k_ref, p_ref = ref_siren(conv.kernel, grid_lens, L_eff, cond)
        else:
            k_ref, p_ref = ref_rff(conv.kernel, grid_lens, L_eff)
        assert k.shape == (3 if film else 1, *(2 * n - 1 for n in grid_lens), C)
        assert (p - p_ref).abs().max() < 1e-14
        assert (k - k_ref).abs().max() < 1e-10 * max(1.0, k_ref.abs().max().item())


def test_kernel_initialisation_follows_the_source():
    torch.manual_seed(0)
    L_cache, d = (16, 8), 2
    siren = SIRENKernelND(C, d, 64, 3, 32, 10.0, L_cache, True)
    first = siren.positional_embedding.linear.weight  # U(+-2 pi omega_0 / data_dim)
    assert 0.9 < first.abs().max() / (2 * math.pi * 10.0 / d) <= 1
    for layer in siren.hidden_linears:  # U(+-sqrt(6 / fan_in)), bias 0
        assert 0.9 < layer.weight.abs().max() / math.sqrt(6 / layer.in_features) <= 1
        assert not layer.bias.any()
    wang = math.sqrt(6 / 64) * math.sqrt(1 / (16 * 8))  # SIREN bound times sqrt(1 / prod(L_cache))
    assert 0.7 < siren.out_linear.weight.abs().max() / wang <= 1
    rff = RandomFourierKernelND(C, d, 64, 3, 512, 3.0, L_cache, True, nn.GELU)
    assert abs(rff.positional_embedding.linear.weight.std().item() / (2 * math.pi * 3.0) - 1) < 0.1
    default_bound = 1 / math.sqrt(64)  # PyTorch's Linear init, then sqrt(1 / prod(L_cache))
    assert 0.7 < rff.out_linear.weight.abs().max() / (default_bound * math.sqrt(1 / 128)) <= 1
    exp = ExponentialModulationND(2, 5)
    assert torch.allclose(exp.weight, torch.linspace(2.3, 13.81, 5).expand(2, 5) / 2)
    gauss = GaussianModulationND(1, 4, grid_size=31)
    min_std = (2 / 30) * math.sqrt(-1 / (2 * math.log(0.1)))
    high = math.sqrt(-1 / (2 * math.log(0.1)))
    expected = torch.logspace(math.log10(min_std), math.log10(high), 4, dtype=F64)
    assert torch.allclose(gauss.std_param.double()[0], expected, rtol=1e-6)
    assert gauss.max_std == pytest.approx(math.sqrt(-1 / (2 * math.log(0.95))))
    conv = CKConvND(1, 64, functools.partial(SIRENKernelND, 64, 1, HID, 3, HID, 10.0, 8, True))
    assert 0.9 / 8 < conv.shortcut.abs().max() <= 1 / 8  # U(+-1 / sqrt(C))


def test_ckconv_halves_L_cache_on_single_grid_axes_and_sizes_the_mask():
    conv = CKConvND(2, C, siren_cfg(2, (9, 16)), gauss_mask(2), grid_type="single", fft_padding="circular")
    assert conv.kernel.L_cache == (5, 8)
    # grid_size = 2 * max(L_cache) - 1 = 15: the narrowest window falls to 0.1 one grid step (2 / 14) out
    assert conv.mask.min_std == pytest.approx((2 / 14) * math.sqrt(-1 / (2 * math.log(0.1))))
    mixed = CKConvND(2, C, siren_cfg(2, 9), grid_type=None, fft_padding=["zero", "circular"])
    assert mixed.kernel.L_cache == (9, 5) and mixed.periodic == (False, True)


def test_film_generator_is_identity_at_init_and_conditions_after_perturbation():
    gen = KernelFiLMGenerator(COND, HID, 2)
    assert not gen.mlp[2].weight.any()
    bias = gen.mlp[2].bias.view(2, 2, HID)
    assert torch.equal(bias[:, 0], torch.ones(2, HID)) and not bias[:, 1].any()
    m = build(2, siren_cfg(2, 6), exp_mask(2), "double", "zero").double()
    x = torch.randn(2, 5, 4, C, dtype=F64)
    c1, c2 = torch.randn(2, COND, dtype=F64), torch.randn(2, COND, dtype=F64)
    kernel = m.mixer.global_conv.kernel
    k0, _ = kernel([5, 4])
    for c in (c1, c2):  # gamma = 1, beta = 0 exactly: the same kernel for every sample
        assert torch.equal(kernel([5, 4], conditioning=c)[0], k0.expand(2, *k0.shape[1:]))
    y0 = m(x)
    for c in (c1, c2):  # the same kernel, convolved per sample (batched FFT: rounding only)
        assert (m(x, conditioning=c) - y0).abs().max() < 1e-12
    with torch.no_grad():
        kernel.film_generator.mlp[2].weight.normal_(0, 0.3)
    y1, y2 = m(x, conditioning=c1), m(x, conditioning=c2)
    assert (y1 - y2).abs().max() > 1e-4
    assert torch.equal(m(x), y0)  # no condition: the unmodulated kernel
    small = KernelFiLMGenerator(COND, HID, 2, init_type="small_random", init_std=1e-4)
    gamma, beta = small(torch.randn(5, COND))[0]
    assert (gamma - 1).abs().max() < 1e-2 and beta.abs().max() < 1e-2 and (gamma != 1).any()


def test_film_after_pos_embed_modulates_the_embedding():
    film = functools.partial(KernelFiLMGenerator, COND, HID, 3)
    k = randomize(
        SIRENKernelND(C, 1, HID, 3, HID, 5.0, 6, True, film_cfg=film, film_after_pos_embed=True)
    ).double()
    cond = torch.randn(2, COND, dtype=F64)
    out, _ = k([4], conditioning=cond)
    ref, _ = ref_siren(k, [4], [6], cond)
    assert (out - ref).abs().max() < 1e-10 * max(1.0, ref.abs().max().item())


# nvSubquadratic state-dict keys (QKVSequenceMixer(Hyena(CKConvND(SIRENKernelND + FiLM, Gaussian mask)),
# Conv2d short conv, RMSNormChannelFirst norms, L2Norm QK-norm, no projection biases)) and their shapes.
THEIR_KEYS_2D = {
    "mixer.global_conv.shortcut": (C,),
    "mixer.global_conv.kernel.positional_embedding.linear.weight": (HID, 2),
    "mixer.global_conv.kernel.positional_embedding.linear.bias": (HID,),
    "mixer.global_conv.kernel.hidden_linears.0.weight": (HID, HID),
    "mixer.global_conv.kernel.hidden_linears.0.bias": (HID,),
    "mixer.global_conv.kernel.hidden_linears.1.weight": (HID, HID),
    "mixer.global_conv.kernel.hidden_linears.1.bias": (HID,),
    "mixer.global_conv.kernel.out_linear.weight": (C, HID),
    "mixer.global_conv.kernel.out_linear.bias": (C,),
    "mixer.global_conv.kernel.film_generator.mlp.0.weight": (64, COND),
    "mixer.global_conv.kernel.film_generator.mlp.0.bias": (64,),
    "mixer.global_conv.kernel.film_generator.mlp.2.weight": (2 * 2 * HID, 64),
    "mixer.global_conv.kernel.film_generator.mlp.2.bias": (2 * 2 * HID,),
    "mixer.global_conv.mask.std_param": (2, C),
    "mixer.short_conv.weight": (3 * C, 1, 3, 3),
    "mixer.pixelhyena_norm.weight": (C,),
    "mixer.output_norm.weight": (C,),
    "qkv_proj.weight": (3 * C, C),
    "out_proj.weight": (C, C),
}
# RFF kernel, exponential mask, CausalConv1D short conv, LayerNorm pixel norm, linear gates, 1-D causal.
THEIR_KEYS_1D = {
    "mixer.global_conv.shortcut": (C,),
    "mixer.global_conv.kernel.positional_embedding.linear.weight": (HID // 2, 1),
    "mixer.global_conv.kernel.positional_embedding.linear.bias": (HID // 2,),
    "mixer.global_conv.kernel.kernel_network.0.weight": (HID, HID),
    "mixer.global_conv.kernel.kernel_network.0.bias": (HID,),
    "mixer.global_conv.kernel.kernel_network.2.weight": (HID, HID),
    "mixer.global_conv.kernel.kernel_network.2.bias": (HID,),
    "mixer.global_conv.kernel.out_linear.weight": (C, HID),
    "mixer.global_conv.kernel.out_linear.bias": (C,),
    "mixer.global_conv.mask.weight": (1, C),
    "mixer.short_conv.weight": (3 * C, 1, 3),
    "mixer.pixelhyena_norm.weight": (C,),
    "mixer.pixelhyena_norm.bias": (C,),
    "qkv_proj.weight": (3 * C, C),
    "out_proj.weight": (C, C),
}


def _their_layout_2d():
    conv = CKConvND(2, C, siren_cfg(2, 6), gauss_mask(2), grid_type="double", fft_padding="zero")
    mixer = HyenaND(
        conv,
        short_conv(2, False),
        nn.SiLU(),
        lambda: nn.RMSNorm(C, eps=1e-6),
        L2Norm,
        lambda: nn.RMSNorm(C, eps=1e-6),
        nn.Sigmoid(),
    )
    return QKVSequenceMixer(C, mixer)


def _their_layout_1d():
    conv = CKConvND(1, C, rff_cfg(1, 8), exp_mask(1), grid_type="double", fft_padding="zero", is_causal=True)
    mixer = HyenaND(conv, short_conv(1, True), nn.Identity(), lambda: nn.LayerNorm(C), L2Norm)
    return QKVSequenceMixer(C, mixer)


@pytest.mark.parametrize(
    "keys,factory", [(THEIR_KEYS_2D, _their_layout_2d), (THEIR_KEYS_1D, _their_layout_1d)]
)
def test_state_dict_with_their_key_names_loads_strictly(keys, factory):
    state = {k: torch.randn(shape) for k, shape in keys.items()}
    if "mixer.global_conv.mask.std_param" in state:
        state["mixer.global_conv.mask.std_param"] = torch.full(keys["mixer.global_conv.mask.std_param"], 0.3)
    m = factory()
    assert set(m.state_dict()) == set(keys)
    m.load_state_dict(state, strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    two_d = keys is THEIR_KEYS_2D
    x = torch.randn(2, *((5, 6) if two_d else (7,)), C, dtype=F64)
    cond = torch.randn(2, COND, dtype=F64) if two_d else None
    m = m.double()
    ref = ref_mixer(m, x, cond, (6, 6) if two_d else (8,))
    assert (m(x, conditioning=cond) - ref).abs().max() < 1e-10 * max(1.0, ref.abs().max().item())


def test_causal_operator_ignores_the_future():
    m = randomize(make_case(1, "siren", "exp", "double", "zero", True, "rms", "silu", 8)).double()
    x = torch.randn(2, 9, C, dtype=F64)
    x2 = x.clone()
    x2[:, 5:] += torch.randn(2, 4, C, dtype=F64)
    y, y2 = m(x), m(x2)
    assert torch.allclose(y[:, :5], y2[:, :5], atol=1e-12)
    assert (y[:, 5:] - y2[:, 5:]).abs().max() > 1e-3


def test_circular_ckconv_is_shift_equivariant():
    conv = randomize(CKConvND(2, C, siren_cfg(2, 6), grid_type="single", fft_padding="circular")).double()
    x = torch.randn(2, 5, 6, C, dtype=F64)
    cond = torch.randn(2, COND, dtype=F64)
    shifted = conv(torch.roll(x, (2, -1), dims=(1, 2)), conditioning=cond)
    assert torch.allclose(shifted, torch.roll(conv(x, conditioning=cond), (2, -1), dims=(1, 2)), atol=1e-12)


def test_default_mixer_has_their_layout_and_matches_the_reference():
    m = hyena_mixer(C, 2, 6, num_blocks=4, cond_dim=COND)
    h = m.mixer
    assert isinstance(h.gate_nonlinear, nn.SiLU) and isinstance(h.gate_nonlinear_2, nn.Sigmoid)
    assert isinstance(h.q_norm, L2Norm) and isinstance(h.k_norm, nn.Identity) and h.short_conv.bias is None
    assert h.pixelhyena_norm.eps == 1e-6 and h.global_conv.mask is None and m.qkv_proj.bias is None
    assert set(m.state_dict()) == set(THEIR_KEYS_2D) - {"mixer.global_conv.mask.std_param"}
    kernel = h.global_conv.kernel
    assert (kernel.positional_embedding.linear.out_features, len(kernel.hidden_linears)) == (32, 2)
    assert kernel.positional_embedding.omega_0 == 10.0
    m = randomize(m).double()
    x, cond = torch.randn(2, 5, 3, C, dtype=F64), torch.randn(2, COND, dtype=F64)
    ref = ref_mixer(m, x, cond, (6, 6))
    assert (m(x, conditioning=cond) - ref).abs().max() < 1e-10 * max(1.0, ref.abs().max().item())
    causal = hyena_mixer(C, 1, 8, num_blocks=2, is_causal=True)
    assert isinstance(causal.mixer.short_conv, CausalConv1D) and causal.mixer.short_conv.is_causal
    circular = hyena_mixer(C, 3, 5, num_blocks=2, fft_padding="circular")
    assert circular.mixer.global_conv.kernel.L_cache == (3, 3, 3)


def test_mixer_in_adaln_zero_block_receives_the_condition_and_is_identity_at_init():
    block = AdaLNZeroResidualBlock(
        sequence_mixer=lambda: hyena_mixer(C, 2, 6, num_blocks=2, cond_dim=C),
        sequence_mixer_norm=lambda: nn.LayerNorm(C, elementwise_affine=False),
        mlp=lambda: Mlp(C, 4 * C),
        mlp_norm=lambda: nn.LayerNorm(C, elementwise_affine=False),
        condition_norm=nn.Identity,
        dropout=nn.Identity,
        hidden_dim=C,
    )
    seen = {}
    block.sequence_mixer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    x, cond = torch.randn(2, 4, 5, C), torch.randn(2, C)
    assert torch.equal(block(x, cond), x)
    assert torch.equal(seen["conditioning"], cond)


def test_projection_initialisers():
    torch.manual_seed(0)
    m = QKVSequenceMixer(
        256,
        lambda: HyenaND(
            CKConvND(1, 256, functools.partial(SIRENKernelND, 256, 1, HID, 2, HID, 10.0, 4, True)),
            None,
            nn.SiLU(),
            None,
            None,
        ),
        qkv_bias=True,
        out_proj_bias=True,
        init_method_in=small_init,
        init_method_out=functools.partial(wang_init, num_layers=4),
    )
    assert abs(m.qkv_proj.weight.std().item() / math.sqrt(2 / (5 * 256)) - 1) < 0.05
    assert abs(m.out_proj.weight.std().item() / (2 / 4 / 16) - 1) < 0.05
    assert not m.qkv_proj.bias.any() and not m.out_proj.bias.any()


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="needs grid_type='single'"):
        CKConvND(2, C, siren_cfg(2, 6), grid_type="double", fft_padding="circular")
    with pytest.raises(ValueError, match="grid_type must be None with a per-axis fft_padding"):
        CKConvND(2, C, siren_cfg(2, 6), grid_type="single", fft_padding=["zero", "circular"])
    with pytest.raises(ValueError, match="fft_padding must be 'zero', 'circular' or a list of 2"):
        CKConvND(2, C, siren_cfg(2, 6), fft_padding=["zero"])
    with pytest.raises(ValueError, match="is_causal=True needs data_dim=1"):
        CKConvND(2, C, siren_cfg(2, 6), is_causal=True)
    with pytest.raises(ValueError, match="that sets L_cache"):
        CKConvND(1, C, functools.partial(SIRENKernelND, C, 1, HID, 3, HID, 10.0, use_bias=True))
    with pytest.raises(ValueError, match="a built module"):
        CKConvND(
            1, C, SIRENKernelND(C, 1, HID, 3, HID, 10.0, 8, True), grid_type="single", fft_padding="circular"
        )
    with pytest.raises(ValueError, match="out_dim must equal hidden_dim=5"):
        CKConvND(1, 5, siren_cfg(1, 6))
    with pytest.raises(ValueError, match="L_cache must be an int >= 2"):
        SIRENKernelND(C, 2, HID, 3, HID, 10.0, (8,), True)
    with pytest.raises(ValueError, match="num_film_layers=2"):
        SIRENKernelND(C, 1, HID, 3, HID, 10.0, 8, True, film_cfg=KernelFiLMGenerator(COND, HID, 3))
    with pytest.raises(ValueError, match="embedding_dim must be even"):
        RandomFourierKernelND(C, 1, HID, 3, 7, 1.0, 8, True, nn.SiLU)
    conv = CKConvND(2, C, siren_cfg(2, 6))
    with pytest.raises(ValueError, match=r"x must be \(B, \*spatial, 4\) with 2 token axes"):
        conv(torch.randn(2, 5, C))
    with pytest.raises(ValueError, match=r"conditioning must be \(B, 3\)"):
        conv(torch.randn(2, 5, 5, C), conditioning=torch.randn(2, 7))
    m = build(2, siren_cfg(2, 6), None, "double", "zero")
    with pytest.raises(ValueError, match=r"x must be \(B, \*spatial, 4\)"):
        m(torch.randn(2, 5, 5, 3))


def test_any_size_and_half_precision():
    m = hyena_mixer(8, 2, 4, num_blocks=2, cond_dim=COND)
    with torch.no_grad():
        m.mixer.global_conv.kernel.film_generator.mlp[2].weight.normal_(0, 0.1)
    cond = torch.randn(2, COND)
    for size in ((1, 1), (4, 4), (9, 3)):  # (9, 3) exceeds L_cache = 4 on the first axis
        assert m(torch.randn(2, *size, 8), conditioning=cond).shape == (2, *size, 8)
    x = torch.randn(2, 6, 5, 8)
    y32 = m(x, conditioning=cond)
    y16 = m.to(torch.bfloat16)(x.bfloat16(), conditioning=cond.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert ((y16.float() - y32).norm() / y32.norm()).item() < 5e-2
