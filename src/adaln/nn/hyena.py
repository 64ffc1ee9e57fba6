"""Hyena: gated implicit long convolutions over 1-D, 2-D and 3-D token grids, with FiLM kernel conditioning.

Matches the order-N Hyena operator of Poli et al. 2023 ("Hyena Hierarchy", Section 3, Definition 3.1)
with the filter parametrisation of HazyResearch/safari ``src/models/sequence/hyena.py``
(``PositionalEmbedding``, ``Sin``, ``ExponentialModulation``, ``HyenaFilter``, ``fftconv_ref``), extended
to N-D token grids as in NVIDIA nvSubquadratic (filters over relative offsets, centred "same" FFT
convolution), and FiLM kernel conditioning as in nvSubquadratic ``modules/film.py``
(``KernelFiLMGenerator``: FiLM after every sine layer of the filter MLP, identity at init). This is
*not* nvSubquadratic's own Hyena operator (a QKV-gated CKConv with SIREN / random-Fourier kernels):
that one is ``adaln.nn.ckconv.HyenaND``.

Forward (``x`` channels-last (B, *spatial, C), N = ``order``)::

    x_1, ..., x_N, v = split(short_conv(in_proj(x)))        # (N + 1) * C channels
    h_1, ..., h_N = HyenaFilter(grid size, FiLM(conditioning))  # implicit long filters
    for n in 1..N:  v = x_n * (h_n * v + D_n * v)             # * = long convolution over all token axes
    y = out_proj(v)

Deliberate differences from safari: N long filters for order N (the paper's recurrence; safari's code
applies N - 1 long filters with the gate before the convolution); filter positions are normalised by
the actual grid size instead of a fixed ``l_max`` (any size works, no cache); the positional features
and the decay rates are computed on the fly (safari registers them with learning rate ~0 / 0). With
``circular=True`` the n filter taps are the shortest signed offsets -((n-1)//2)..n//2, indexed as in
nvSubquadratic's circular FFT convolution (kernel index j is offset j - (n-1)//2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaln.checks import check_tensor

# safari PositionalEmbedding: per axis [t, cos(f w), -sin(f w)] with f = linspace(1e-4, bands - 1, bands).
EMB_BANDS = 4
# safari ExponentialModulation defaults: |decay rate| from log(target)/slow to log(target)/fast.
DECAY_TARGET, FAST_DECAY_PCT, SLOW_DECAY_PCT = 1e-2, 0.3, 1.5
# safari HyenaFilter default frequency of the sine activation (w=1) and inner layers (num_inner_mlps=2).
SIN_FREQ, NUM_INNER_LAYERS = 1.0, 2
# nvSubquadratic KernelFiLMGenerator bottleneck width.
FILM_HIDDEN = 64


def fft_long_conv(
    u: Tensor,
    k: Tensor,
    *,
    spatial_dims: int,
    causal: bool = False,
    circular: bool | Sequence[bool] = False,
) -> Tensor:
    """Depthwise long convolution ``y[t] = sum_s k[t - s] u[s]`` over every token axis, by FFT.

    u: (B, *S, C) channels-last. k: (1 or B, *K, C), one filter per channel (and per sample if B).
    Per axis of size S, kernel index j holds offset (as in nvSubquadratic ``ops/fftconv.py`` and
    ``ops/circular_fftconv.py``):
      - zero boundary (default): K <= 2*S - 1 taps, offset ``j - K // 2`` (centred; K = 2*S - 1 lets
        every output see every input). FFT size S + (K + 1) // 2: the kept window never aliases.
      - ``circular`` (True, or one bool per axis): K <= S taps, offset ``j - (K - 1) // 2`` taken
        modulo S (periodic boundary, FFT size S); taps K..S-1 are zero.
      - ``causal`` (1-D only): K = S, offset ``j`` (0..S-1), output t sees inputs s <= t (FFT size 2*S).
    Computed in float32 for half-precision inputs (float64 stays float64); returns u's dtype and shape.
    """
    _check_spatial_dims(spatial_dims)
    periodic = (bool(circular),) * spatial_dims if isinstance(circular, bool) else tuple(circular)
    if len(periodic) != spatial_dims or not all(isinstance(p, bool) for p in periodic):
        raise ValueError(
            f"circular must be a bool or {spatial_dims} bools (one per token axis), got {circular!r}"
        )
    if causal and (any(periodic) or spatial_dims != 1):
        raise ValueError("causal=True needs spatial_dims=1 and circular=False")
    check_tensor(u, "u")
    check_tensor(k, "k")
    if u.dim() != spatial_dims + 2:
        raise ValueError(f"u must be (B, *spatial, C) with {spatial_dims} token axes, got {tuple(u.shape)}")
    sizes, taps = tuple(u.shape[1:-1]), tuple(k.shape[1:-1])
    b, c = u.shape[0], u.shape[-1]
    limits = tuple(n if causal or p else 2 * n - 1 for n, p in zip(sizes, periodic))
    bad_taps = len(taps) != spatial_dims or any(
        not 1 <= kk <= m or (causal and kk != m) for kk, m in zip(taps, limits)
    )
    if k.dim() != u.dim() or k.shape[0] not in (1, b) or k.shape[-1] != c or bad_taps:
        want = "K = S" if causal else "K <= S on circular axes, K <= 2*S - 1 on zero-padded axes"
        raise ValueError(
            f"k must be (1 or {b}, *K, {c}) with {want} for u of shape {tuple(u.shape)}, got {tuple(k.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(u.dtype, k.dtype), torch.float32)
    axes = tuple(range(1, spatial_dims + 1))
    if causal:
        fft_shape = (2 * sizes[0],)
    else:
        fft_shape = tuple(n if p else n + (kk + 1) // 2 for n, kk, p in zip(sizes, taps, periodic))
    u_f = torch.fft.rfftn(u.to(dtype), s=fft_shape, dim=axes)
    k_f = torch.fft.rfftn(k.to(dtype), s=fft_shape, dim=axes)
    y = torch.fft.irfftn(u_f * k_f, s=fft_shape, dim=axes)
    if causal:
        return y[:, : sizes[0]].to(u.dtype)
    # Zero-padded axes: keep the window starting at the centre tap K // 2. Circular axes: move the
    # centre tap (K - 1) // 2 to offset 0 by a periodic shift.
    window = (slice(0, n) if p else slice(kk // 2, kk // 2 + n) for n, kk, p in zip(sizes, taps, periodic))
    y = y[(slice(None), *window)]
    shifts = [-((kk - 1) // 2) for kk, p in zip(taps, periodic) if p]
    if any(shifts):
        y = torch.roll(y, shifts=shifts, dims=[a for a, p in zip(axes, periodic) if p])
    return y.to(u.dtype)


def filter_positions(
    sizes: tuple[int, ...],
    *,
    mode: Literal["centred", "causal", "circular"],
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Positional features of the filter taps: (features (*K, d*(2*EMB_BANDS+1)), t (*K, d)).

    Per axis of size n the taps are the offsets ``fft_long_conv`` gives them: m = -(n-1)..n-1
    (``centred``), 0..n-1 (``causal``) or -((n-1)//2)..n//2 (``circular``: every offset modulo n once,
    the shortest signed one). safari's features ``[t, cos(f w), -sin(f w)]`` with t = m / (n - 1)
    (the same t for the same offset in every mode) and w = 2*pi*m / K (K taps: one period over the
    filter support).
    """
    feats, times = [], []
    bands = torch.linspace(1e-4, EMB_BANDS - 1, EMB_BANDS, dtype=dtype, device=device)
    for n in sizes:
        first = {"centred": -(n - 1), "causal": 0, "circular": -((n - 1) // 2)}[mode]
        last = n // 2 if mode == "circular" else n - 1
        m = torch.arange(first, last + 1, dtype=dtype, device=device)
        t = m / max(n - 1, 1)
        w = 2 * math.pi * m / m.numel()
        fw = w[:, None] * bands
        feats.append(torch.cat([t[:, None], torch.cos(fw), -torch.sin(fw)], dim=-1))
        times.append(t)
    grids = torch.meshgrid(*[torch.arange(len(t), device=device) for t in times], indexing="ij")
    features = torch.cat([f[g] for f, g in zip(feats, grids)], dim=-1)
    t = torch.stack([tt[g] for tt, g in zip(times, grids)], dim=-1)
    return features, t


def _linear(layer: nn.Linear, h: Tensor) -> Tensor:
    """``layer(h)`` in h's dtype (the filter network runs in fp32 even with half-precision weights)."""
    bias = None if layer.bias is None else layer.bias.to(h.dtype)
    return F.linear(h, layer.weight.to(h.dtype), bias)


class Sin(nn.Module):
    """``sin(freq * x)`` with a learned per-feature frequency (safari ``Sin``)."""

    def __init__(self, dim: int, freq: float = SIN_FREQ) -> None:
        super().__init__()
        self.freq = nn.Parameter(torch.full((dim,), freq))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.freq.to(x.dtype) * x)


class KernelFiLM(nn.Module):
    """Condition (B, cond_dim) -> per filter layer (gamma, beta), each (B, hidden); nvSubquadratic
    ``KernelFiLMGenerator``.

    ``Linear(cond_dim, 64) -> GELU -> Linear(64, layers * 2 * hidden)``, chunked per layer as
    (delta, beta) with gamma = 1 + delta. Output weights and biases start at zero, so gamma = 1 and
    beta = 0 exactly: the conditioned filter equals the unconditioned one at init. Deliberate layout
    difference: nvSubquadratic keeps gamma itself in the output (its bias starts at 1); the map is the
    same. ``adaln.nn.ckconv.KernelFiLMGenerator`` has nvSubquadratic's layout.
    """

    def __init__(self, cond_dim: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.hidden, self.layers = hidden, layers
        self.fc1 = nn.Linear(cond_dim, FILM_HIDDEN)
        self.fc2 = nn.Linear(FILM_HIDDEN, layers * 2 * hidden)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, cond: Tensor) -> list[tuple[Tensor, Tensor]]:
        out = _linear(self.fc2, F.gelu(_linear(self.fc1, cond)))
        pairs = out.view(cond.shape[0], self.layers, 2, self.hidden).unbind(1)
        return [(1 + p[:, 0], p[:, 1]) for p in pairs]

    def identity(self, batch: int, dtype: torch.dtype, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        """gamma = 1, beta = 0 for every layer and sample: the FiLM of a missing condition."""
        ones = torch.ones(batch, self.hidden, dtype=dtype, device=device)
        return [(ones, torch.zeros_like(ones)) for _ in range(self.layers)]


class HyenaFilter(nn.Module):
    """Implicit long filters ``h(t) = FFN(PositionalEmbedding(t)) * window(t)`` (safari ``HyenaFilter``).

    FFN: Linear(emb, hidden) -> Sin -> [Linear(hidden, hidden) -> Sin] x 2 -> Linear(hidden, channels, no
    bias); one ``Sin`` (one set of frequencies) shared by all layers, as in safari. With ``cond_dim``,
    FiLM ``h = gamma * h + beta`` follows every Sin and the filter becomes per-sample. Window
    (safari ``ExponentialModulation``): ``exp(-|delta_c| * sum_axes |t|)`` with fixed rates ``delta_c``
    spread over channels. ``bias`` is Hyena's skip term D (one per channel), stored here as in safari.
    """

    def __init__(
        self, channels: int, spatial_dims: int, hidden: int = 64, cond_dim: int | None = None
    ) -> None:
        super().__init__()
        self.channels, self.spatial_dims = channels, spatial_dims
        emb_dim = spatial_dims * (2 * EMB_BANDS + 1)
        self.layers = nn.ModuleList(
            [nn.Linear(emb_dim, hidden)] + [nn.Linear(hidden, hidden) for _ in range(NUM_INNER_LAYERS)]
        )
        self.act = Sin(hidden)
        self.out = nn.Linear(hidden, channels, bias=False)
        self.bias = nn.Parameter(torch.randn(channels))
        self.film = KernelFiLM(cond_dim, hidden, len(self.layers)) if cond_dim is not None else None

    def decay_rates(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """|delta_c| spaced linearly from slow to fast decay (safari ExponentialModulation), (channels,)."""
        target = math.log(DECAY_TARGET)
        slow, fast = target / SLOW_DECAY_PCT, target / FAST_DECAY_PCT
        return torch.linspace(slow, fast, self.channels, dtype=dtype, device=device).abs()

    def forward(
        self,
        sizes: tuple[int, ...],
        *,
        mode: Literal["centred", "causal", "circular"],
        film: list[tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        """Filters for a grid of ``sizes``: (1, *K, channels), or (B, *K, channels) with FiLM params.

        K = 2*n - 1 per axis when ``centred``, else n (taps as in ``filter_positions``). ``film``: one
        (gamma, beta) pair of (B, hidden) per layer (from ``self.film``). Computed in float32 or wider.
        """
        dtype = torch.promote_types(self.out.weight.dtype, torch.float32)
        device = self.out.weight.device
        z, t = filter_positions(sizes, mode=mode, dtype=dtype, device=device)
        h = z.unsqueeze(0)
        for i, layer in enumerate(self.layers):
            h = self.act(_linear(layer, h))
            if film is not None:
                shape = (film[i][0].shape[0], *([1] * len(sizes)), h.shape[-1])  # broadcast over the taps
                gamma, beta = (p.to(dtype).view(shape) for p in film[i])
                h = gamma * h + beta
        window = torch.exp(-t.abs().sum(-1, keepdim=True) * self.decay_rates(dtype, device))
        return _linear(self.out, h) * window

    def film_params(self, conditioning: Tensor | None, batch: int) -> list[tuple[Tensor, Tensor]] | None:
        """FiLM (gamma, beta) per layer for ``conditioning`` (B, cond_dim); identity when it is None.

        The identity is per sample too, so a missing condition follows the same arithmetic as a
        conditioned call and both agree bit for bit at init. None when FiLM is disabled.
        """
        if self.film is None:
            return None
        dtype = torch.promote_types(self.out.weight.dtype, torch.float32)
        if conditioning is None:
            return self.film.identity(batch, dtype, self.out.weight.device)
        return self.film(conditioning.to(dtype))


class ShortConv(nn.Module):
    """Depthwise ConvNd over every token axis, channels-last in and out (safari ``short_filter``).

    Zero "same" padding by default, left padding when ``causal`` (1-D), periodic when ``circular``.
    """

    def __init__(
        self, channels: int, kernel_size: int, spatial_dims: int, *, causal: bool, circular: bool
    ) -> None:
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]
        self.causal_pad = kernel_size - 1 if causal else 0
        self.conv = conv(
            channels,
            channels,
            kernel_size,
            groups=channels,
            padding=0 if causal else kernel_size // 2,
            padding_mode="circular" if circular else "zeros",
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x.movedim(-1, 1)
        if self.causal_pad:
            x = F.pad(x, (self.causal_pad, 0))
        return self.conv(x).movedim(1, -1)


class Hyena(nn.Module):
    """Hyena operator of order N on x (B, *spatial, dim); returns x's shape (see the module docstring).

    | argument       | meaning                                                                      |
    |----------------|------------------------------------------------------------------------------|
    | dim            | channels C                                                                   |
    | spatial_dims   | number of token axes: 1 (B, L, C), 2 (B, H, W, C), 3 (B, D, H, W, C)         |
    | order          | N >= 1: N gates and N long filters (in_proj to (N + 1) * C)                  |
    | filter_hidden  | width of the implicit filter MLP (safari ``filter_order``, default 64)       |
    | short_kernel   | size of the depthwise short convolution (odd unless causal; safari 3)        |
    | causal         | 1-D only: output t sees inputs <= t (short conv and long filters)            |
    | cond_dim       | enables FiLM kernel conditioning from ``conditioning`` (B, cond_dim)         |
    | circular       | periodic boundary on every token axis instead of zero padding                |

    ``forward(x, conditioning=None)``. With ``cond_dim`` set, ``conditioning=None`` means identity FiLM
    (gamma = 1, beta = 0: the unconditioned filter, which the conditioned one equals at init).
    ``conditioning`` given without ``cond_dim`` is a ValueError (it would otherwise be silently ignored).
    A conditioning expanded over the batch (stride 0, e.g. a learned constant) yields one shared filter.
    """

    def __init__(
        self,
        dim: int,
        *,
        spatial_dims: int = 1,
        order: int = 2,
        filter_hidden: int = 64,
        short_kernel: int = 3,
        causal: bool = False,
        cond_dim: int | None = None,
        circular: bool = False,
    ) -> None:
        super().__init__()
        _check_spatial_dims(spatial_dims)
        if causal and spatial_dims != 1:
            raise ValueError(f"causal=True is only defined for spatial_dims=1, got {spatial_dims}")
        if causal and circular:
            raise ValueError("causal=True and circular=True are mutually exclusive")
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if short_kernel < 1 or (not causal and short_kernel % 2 == 0):
            raise ValueError(
                f"short_kernel must be a positive odd integer (any size >= 1 when causal), got {short_kernel}"
            )
        self.dim, self.spatial_dims, self.order = dim, spatial_dims, order
        self.causal, self.circular, self.cond_dim = causal, circular, cond_dim
        width = (order + 1) * dim
        self.in_proj = nn.Linear(dim, width)
        self.short_conv = ShortConv(width, short_kernel, spatial_dims, causal=causal, circular=circular)
        self.filter = HyenaFilter(order * dim, spatial_dims, filter_hidden, cond_dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, conditioning: Tensor | None = None) -> Tensor:
        self._check_inputs(x, conditioning)
        *gates, v = self.short_conv(self.in_proj(x)).split(self.dim, dim=-1)
        sizes = tuple(x.shape[1:-1])
        if conditioning is not None and conditioning.stride(0) == 0:
            conditioning = conditioning[:1]  # expanded over the batch (a constant): one shared filter
        film = self.filter.film_params(conditioning, x.shape[0])
        mode = "causal" if self.causal else "circular" if self.circular else "centred"
        k = self.filter(sizes, mode=mode, film=film)
        filters, skips = k.split(self.dim, dim=-1), self.filter.bias.split(self.dim)
        for x_n, k_n, d_n in zip(gates, filters, skips):
            conv = fft_long_conv(
                v, k_n, spatial_dims=self.spatial_dims, causal=self.causal, circular=self.circular
            )
            v = x_n * (conv + d_n.to(v.dtype) * v)
        return self.out_proj(v)

    def _check_inputs(self, x: Tensor, conditioning: Tensor | None) -> None:
        check_tensor(x, "x")
        if x.dim() != self.spatial_dims + 2 or x.shape[-1] != self.dim:
            raise ValueError(
                f"x must be (B, *spatial, {self.dim}) with {self.spatial_dims} token axes (channels-last), "
                f"got {tuple(x.shape)}"
            )
        if conditioning is None:
            return
        if self.cond_dim is None:
            raise ValueError(
                "conditioning was given but this Hyena has no cond_dim (FiLM disabled); set cond_dim to the "
                "condition width (C inside AdaLNZeroResidualBlock, which passes its pooled condition)"
            )
        check_tensor(conditioning, "conditioning")
        if tuple(conditioning.shape) != (x.shape[0], self.cond_dim):
            raise ValueError(
                f"conditioning must be (B, cond_dim) = {(x.shape[0], self.cond_dim)}, "
                f"got {tuple(conditioning.shape)}"
            )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, spatial_dims={self.spatial_dims}, order={self.order}, causal={self.causal}, "
            f"circular={self.circular}, cond_dim={self.cond_dim}"
        )


def _check_spatial_dims(spatial_dims: int) -> None:
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
