"""nvSubquadratic's Hyena operator: a QKV-gated CKConv whose long kernels come from SIREN or
random-Fourier-feature kernel networks, with FiLM kernel conditioning.

Matches NVIDIA-BioNeMo/nvSubquadratic (class names and state-dict keys are theirs):

| here                                      | nvSubquadratic                                         |
|-------------------------------------------|--------------------------------------------------------|
| ``QKVSequenceMixer``                      | ``modules/sequence_mixer.py`` ``QKVSequenceMixer``     |
| ``HyenaND``                               | ``modules/hyena_nd.py`` ``Hyena`` (renamed here:       |
|                                           | ``adaln.nn.Hyena`` is the safari operator)             |
| ``CKConvND``                              | ``modules/ckconv_nd.py`` ``CKConvND``                  |
| ``SIRENKernelND``, ``RandomFourierKernelND``, | ``modules/kernels_nd.py`` (same names)             |
| their ``*PositionalEmbeddingND``          |                                                        |
| ``KernelFiLMGenerator``                   | ``modules/film.py`` ``KernelFiLMGenerator``            |
| ``ExponentialModulationND``, ``GaussianModulationND`` | ``modules/masks_nd.py``                    |
| ``CausalConv1D``                          | ``modules/causal_conv1d.py`` ``CausalConv1D``          |
| ``L2Norm``                                | ``utils/qk_norm.py`` ``L2Norm`` (over the channels)    |
| ``small_init``, ``wang_init``             | ``utils/init.py``                                      |
| ``adaln.nn.hyena.fft_long_conv``          | ``ops/fftconv.py``, ``ops/circular_fftconv.py``,       |
|                                           | ``ops/mixed_fftconv.py``                               |

Forward of ``QKVSequenceMixer(HyenaND(CKConvND(...)))`` on channels-last x (B, *S, C), condition (B, Cc)::

    q, k, v = chunk(qkv_proj(x), 3)                 # Linear(C, 3C)
    q, k, v = split(short_conv([q; k; v]))          # depthwise ConvNd on 3C channels, channels-first
    q = q_norm(q);  k = k_norm(k)                   # k only when gate_nonlinear is Identity
    z = pixelhyena_norm(q * gate_nonlinear(k))
    z = CKConvND(z, conditioning)                   # = k_theta * z + shortcut * z  (FFT long conv)
    y = output_norm(z * gate_nonlinear_2(v))
    return out_proj(y)                              # Linear(C, C)

CKConvND's kernel: per axis of size n the kernel network runs on ``L = n`` ("double" grid: 2n - 1 taps,
zero-padded "same" convolution) or ``L = (n + 1) // 2`` ("single" grid: 2L - 1 <= n taps, circular
convolution) grid points per side; tap j is offset m = j - (L - 1) at position ``m / (L_cache - 1)``
(``L_cache`` halved the same way on single-grid axes), so the kernel is a function of the offset.
Causal (1-D): the double-grid kernel keeps its offsets 0..n-1. Circular kernels are indexed as in
``ops/circular_fftconv.py``: tap j is offset j - (K - 1) // 2 modulo n.

State-dict keys, e.g. SIREN kernel with FiLM, RMS norms, no biases::

    qkv_proj.weight, out_proj.weight, mixer.short_conv.weight,
    mixer.pixelhyena_norm.weight, mixer.output_norm.weight, mixer.global_conv.shortcut,
    mixer.global_conv.kernel.positional_embedding.linear.{weight,bias},
    mixer.global_conv.kernel.hidden_linears.{i}.{weight,bias},
    mixer.global_conv.kernel.out_linear.{weight,bias},
    mixer.global_conv.kernel.film_generator.mlp.{0,2}.{weight,bias},
    mixer.global_conv.mask.weight (ExponentialModulationND) | mixer.global_conv.mask.std_param (Gaussian)
    RFF kernel: ...kernel.positional_embedding.linear.*, ...kernel.kernel_network.{0,2,..}.*,
                ...kernel.out_linear.*

Deliberate differences from nvSubquadratic:
  - configs: a kernel or mask "LazyConfig" is a ``functools.partial`` here; modules are passed as
    modules or zero-argument factories (as everywhere in ``adaln.nn``).
  - the kernel network and the positions run in float32 or wider (theirs: the positions and the first
    layer in float32, later layers in the weights' dtype); float64 modules stay float64 end to end.
  - positions are computed per call, no cache. Theirs grows a cache for inputs larger than ``L_cache``;
    after a *second* growth its grid step changes for every later call (it extends the grown cache
    from the grown size with the original step), so its outputs then depend on the sizes seen before.
    Here the step is always ``1 / (L_cache - 1)``: theirs before any growth or after one.
  - a condition given to a kernel without FiLM is ignored, as theirs (the residual block always passes
    its pooled condition); a condition whose batch differs from x's is a ValueError.
  - not ported: context parallelism (``cp_group``), chunked and ``subq_ops`` FFT backends (same
    arithmetic, other kernels), the multi-omega / learnable-omega / block-diagonal SIREN variants,
    ``BlockAlignedGaussianModulationND``, FLOP counting, ``KernelFiLMGenerator(no_weight_decay=...)``
    (its weight-decay groups; the biases are tagged ``_no_weight_decay`` as theirs).
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaln.checks import check_choice, check_tensor
from adaln.nn.blocks import ModuleSpec, build_module
from adaln.nn.hyena import fft_long_conv

InitMethod = Callable[[int], Callable[[Tensor], Tensor]]

# GaussianModulationND: the std at which a 1-D Gaussian falls to this value at position 1 tops the init ramp.
INIT_EXTENT_ATTENUATION = 0.1


def _no_weight_decay(*modules_or_params: nn.Module | nn.Parameter | None) -> None:
    """Tag parameters ``_no_weight_decay`` (nvSubquadratic excludes kernel networks, masks and norms)."""
    for item in modules_or_params:
        params = [item] if isinstance(item, nn.Parameter) else [] if item is None else item.parameters()
        for p in params:
            p._no_weight_decay = True


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """float32 or wider: positions and kernel networks never run in half precision."""
    p = next(module.parameters())
    return torch.promote_types(p.dtype, torch.float32)


def _linear(layer: nn.Linear, h: Tensor) -> Tensor:
    """``layer(h)`` in h's dtype."""
    bias = None if layer.bias is None else layer.bias.to(h.dtype)
    return F.linear(h, layer.weight.to(h.dtype), bias)


def _per_axis(value: int | Sequence[int], data_dim: int, name: str, minimum: int) -> tuple[int, ...]:
    if isinstance(value, bool) or not isinstance(value, (int, Sequence)):
        raise TypeError(f"{name} must be an int or {data_dim} ints, got {value!r}")
    values = (int(value),) * data_dim if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != data_dim or any(v < minimum for v in values):
        raise ValueError(f"{name} must be an int >= {minimum} or {data_dim} such ints, got {value!r}")
    return values


def kernel_grid(
    seq_lens: Sequence[int], L_cache: Sequence[int], *, dtype: torch.dtype, device: torch.device | None = None
) -> Tensor:
    """Kernel positions (1, *(2n - 1), D): per axis offsets -(n-1)..n-1 times ``1 / (L_cache - 1)``.

    Same values as nvSubquadratic's ``grid_cache`` (``linspace(-lim, lim, 2 * L - 1)`` sliced at its
    centre, with ``lim > 1`` when n exceeds ``L_cache``), computed per call.
    """
    axes = []
    for n, L in zip(seq_lens, L_cache):
        big = max(n, L)
        lim = 1.0 + (1.0 / (L - 1)) * (big - L)  # keeps the step 1 / (L - 1) beyond the cache
        axes.append(torch.linspace(-lim, lim, 2 * big - 1, dtype=dtype, device=device)[big - n : big + n - 1])
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).unsqueeze(0)


# ---------------------------------------------------------------------------------------------------
# Initialisers (nvSubquadratic utils/init.py): curried ``fn(dim) -> fn(tensor)``.
# ---------------------------------------------------------------------------------------------------


def small_init(dim: int) -> Callable[[Tensor], Tensor]:
    """N(0, 2 / (5 dim)) ("Transformers without Tears"), nvSubquadratic ``small_init``."""
    return functools.partial(nn.init.normal_, mean=0.0, std=math.sqrt(2 / (5 * dim)))


def wang_init(dim: int, num_layers: int) -> Callable[[Tensor], Tensor]:
    """N(0, (2 / (num_layers sqrt(dim)))^2), nvSubquadratic ``wang_init`` (curry num_layers with partial)."""
    return functools.partial(nn.init.normal_, mean=0.0, std=2 / num_layers / math.sqrt(dim))


def _init_siren(layer: nn.Linear, *, first: bool, omega_0: float) -> None:
    """SIREN uniform init with omega_0 folded into the weights (nvSubquadratic ``_init_siren_weights``).

    First layer U(+-2 pi omega_0 / fan_in); later layers U(+-sqrt(6 / fan_in)): their bound
    sqrt(6 / fan_in) / (2 pi omega_0) times the folded 2 pi omega_0, so ``hidden_omega_0`` cancels out
    (computed in their order, so the draws are theirs bit for bit). Bias zero.
    """
    with torch.no_grad():
        fan_in = layer.in_features
        bound = 1.0 / fan_in if first else math.sqrt(6.0 / fan_in) / (2.0 * math.pi * omega_0)
        bound *= 2.0 * math.pi * omega_0
        layer.weight.uniform_(-bound, bound)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


# ---------------------------------------------------------------------------------------------------
# FiLM conditioning of the kernel network (nvSubquadratic modules/film.py).
# ---------------------------------------------------------------------------------------------------


class KernelFiLMGenerator(nn.Module):
    """Condition (B, cond_dim) -> per kernel-network layer (gamma, beta), each (B, kernel_hidden_dim).

    ``mlp = Linear(cond_dim, film_hidden_dim) -> GELU -> Linear(film_hidden_dim, layers * 2 * hidden)``;
    the output is chunked per layer, each chunk halved into (gamma, beta). Init (nvSubquadratic
    ``_init_weights``): ``"identity"`` zeroes the output weights, ``"small_random"`` draws them from
    N(0, init_std); both set the output bias to gamma = 1, beta = 0, so FiLM is the identity at init
    (exactly so for ``"identity"``).
    """

    def __init__(
        self,
        cond_dim: int,
        kernel_hidden_dim: int,
        num_film_layers: int,
        film_hidden_dim: int = 64,
        init_type: Literal["identity", "small_random"] = "identity",
        init_std: float = 1e-4,
    ) -> None:
        super().__init__()
        if num_film_layers < 1:
            raise ValueError(f"num_film_layers must be >= 1, got {num_film_layers}")
        check_choice(init_type, "init_type", ("identity", "small_random"))
        self.cond_dim = cond_dim
        self.kernel_hidden_dim = kernel_hidden_dim
        self.num_film_layers = num_film_layers
        self.mlp = nn.Sequential(
            nn.Linear(cond_dim, film_hidden_dim),
            nn.GELU(),
            nn.Linear(film_hidden_dim, num_film_layers * 2 * kernel_hidden_dim),
        )
        out = self.mlp[-1]
        with torch.no_grad():
            if init_type == "identity":
                nn.init.zeros_(out.weight)
            else:
                nn.init.normal_(out.weight, mean=0.0, std=init_std)
            out.bias.view(num_film_layers, 2, kernel_hidden_dim).copy_(
                torch.tensor([1.0, 0.0]).view(1, 2, 1).expand(num_film_layers, 2, kernel_hidden_dim)
            )
        _no_weight_decay(self.mlp[0].bias, out.bias)

    def forward(self, conditioning: Tensor) -> list[tuple[Tensor, Tensor]]:
        check_tensor(conditioning, "conditioning")
        if conditioning.dim() != 2 or conditioning.shape[1] != self.cond_dim:
            raise ValueError(f"conditioning must be (B, {self.cond_dim}), got {tuple(conditioning.shape)}")
        conditioning = conditioning.to(_compute_dtype(self))  # the kernel network runs in fp32 or wider
        h = F.gelu(_linear(self.mlp[0], conditioning))
        chunks = _linear(self.mlp[2], h).chunk(self.num_film_layers, dim=-1)
        return [tuple(c.chunk(2, dim=-1)) for c in chunks]


def _film(h: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """``gamma * h + beta``, (B, hidden) parameters broadcast over the kernel taps of h (1, *K, hidden)."""
    shape = (gamma.shape[0],) + (1,) * (h.dim() - 2) + (gamma.shape[-1],)
    return gamma.to(h.dtype).view(shape) * h + beta.to(h.dtype).view(shape)


# ---------------------------------------------------------------------------------------------------
# Kernel networks (nvSubquadratic modules/kernels_nd.py).
# ---------------------------------------------------------------------------------------------------


class SIRENPositionalEmbeddingND(nn.Module):
    """``sin(linear(p))`` at the kernel positions p; ``linear`` SIREN first-layer init with omega_0."""

    def __init__(
        self,
        data_dim: int,
        embedding_dim: int,
        L_cache: int | Sequence[int],
        omega_0: float,
        use_bias: bool = True,
    ) -> None:
        super().__init__()
        self.data_dim, self.embedding_dim, self.omega_0 = data_dim, embedding_dim, float(omega_0)
        self.L_cache = _per_axis(L_cache, data_dim, "L_cache", 2)
        self.linear = nn.Linear(data_dim, embedding_dim, bias=use_bias)
        _init_siren(self.linear, first=True, omega_0=self.omega_0)
        _no_weight_decay(self)

    def forward(self, seq_lens: Sequence[int]) -> tuple[Tensor, Tensor]:
        """(embedding (1, *(2n-1), embedding_dim), grid (1, *(2n-1), data_dim)); n per axis in seq_lens."""
        grid = kernel_grid(
            seq_lens, self.L_cache, dtype=_compute_dtype(self), device=self.linear.weight.device
        )
        return torch.sin(_linear(self.linear, grid)), grid


class RandomFourierPositionalEmbeddingND(nn.Module):
    """``[cos(linear(p)), sin(linear(p))]``; ``linear`` (embedding_dim / 2 rows) ~ N(0, (2 pi omega_0)^2).

    Their docstring calls the projection frozen, their code leaves it trainable (only tagged
    ``_no_weight_decay``); we follow the code.
    """

    def __init__(
        self,
        data_dim: int,
        embedding_dim: int,
        L_cache: int | Sequence[int],
        omega_0: float,
        use_bias: bool = True,
    ) -> None:
        super().__init__()
        if embedding_dim % 2:
            raise ValueError(f"embedding_dim must be even (cos and sin halves), got {embedding_dim}")
        self.data_dim, self.embedding_dim, self.omega_0 = data_dim, embedding_dim, float(omega_0)
        self.L_cache = _per_axis(L_cache, data_dim, "L_cache", 2)
        self.linear = nn.Linear(data_dim, embedding_dim // 2, bias=use_bias)
        with torch.no_grad():
            self.linear.weight.normal_(0.0, 2 * math.pi * self.omega_0)
            if self.linear.bias is not None:
                nn.init.zeros_(self.linear.bias)
        _no_weight_decay(self)

    def forward(self, seq_lens: Sequence[int]) -> tuple[Tensor, Tensor]:
        grid = kernel_grid(
            seq_lens, self.L_cache, dtype=_compute_dtype(self), device=self.linear.weight.device
        )
        out = _linear(self.linear, grid)
        return torch.cat([torch.cos(out), torch.sin(out)], dim=-1), grid


class SIRENKernelND(nn.Module):
    """Implicit kernel ``k(p) = out_linear(sin(W_{L-1} ... sin(W_1 sin(W_0 p + b_0) + b_1) ...))``.

    ``num_layers - 1`` hidden sine layers (``hidden_linears``) after the positional embedding, each
    followed by FiLM ``h = gamma * h + beta`` when ``film_cfg`` gives a ``KernelFiLMGenerator`` and a
    condition is passed (``film_after_pos_embed``: one more FiLM on the embedding, which then needs
    ``embedding_dim == mlp_hidden_dim``). Init: SIREN with ``hidden_omega_0`` for hidden and output
    layers, output weights times ``sqrt(1 / prod(L_cache))`` (CKConv's init).

    ``forward(seq_lens, conditioning=None) -> (kernel (1 or B, *(2n-1), out_dim), grid)``.
    """

    def __init__(
        self,
        out_dim: int,
        data_dim: int,
        mlp_hidden_dim: int,
        num_layers: int,
        embedding_dim: int,
        omega_0: float,
        L_cache: int | Sequence[int],
        use_bias: bool,
        hidden_omega_0: float = 1.0,
        film_cfg: ModuleSpec | None = None,
        film_after_pos_embed: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 2:
            raise ValueError(
                f"num_layers must be >= 2 (embedding layer + at least one hidden layer), got {num_layers}"
            )
        if film_after_pos_embed and embedding_dim != mlp_hidden_dim:
            raise ValueError(
                "film_after_pos_embed needs embedding_dim == mlp_hidden_dim, "
                f"got {embedding_dim} != {mlp_hidden_dim}"
            )
        self.out_dim, self.data_dim, self.mlp_hidden_dim = out_dim, data_dim, mlp_hidden_dim
        self.film_after_pos_embed = film_after_pos_embed
        self.L_cache = _per_axis(L_cache, data_dim, "L_cache", 2)
        self.positional_embedding = SIRENPositionalEmbeddingND(
            data_dim, embedding_dim, L_cache, omega_0, use_bias
        )
        widths = [embedding_dim] + [mlp_hidden_dim] * (num_layers - 1)
        self.hidden_linears = nn.ModuleList(
            [nn.Linear(w_in, mlp_hidden_dim, bias=use_bias) for w_in in widths[:-1]]
        )
        self.out_linear = nn.Linear(mlp_hidden_dim, out_dim, bias=use_bias)
        for layer in [*self.hidden_linears, self.out_linear]:
            _init_siren(layer, first=False, omega_0=float(hidden_omega_0))
        with torch.no_grad():
            self.out_linear.weight.mul_(math.sqrt(1.0 / math.prod(self.L_cache)))
        _no_weight_decay(self.hidden_linears, self.out_linear.bias)
        self.film_generator = None if film_cfg is None else build_module(film_cfg, "film_cfg")
        if self.film_generator is not None:
            expected = len(self.hidden_linears) + int(film_after_pos_embed)
            if self.film_generator.num_film_layers != expected:
                raise ValueError(
                    f"film_cfg must build a KernelFiLMGenerator with num_film_layers={expected} "
                    f"(num_layers - 1 + film_after_pos_embed), got {self.film_generator.num_film_layers}"
                )
            if self.film_generator.kernel_hidden_dim != mlp_hidden_dim:
                raise ValueError(
                    f"film_cfg must build a KernelFiLMGenerator with kernel_hidden_dim={mlp_hidden_dim}, "
                    f"got {self.film_generator.kernel_hidden_dim}"
                )

    def forward(self, seq_lens: Sequence[int], conditioning: Tensor | None = None) -> tuple[Tensor, Tensor]:
        film = None
        if conditioning is not None and self.film_generator is not None:
            film = self.film_generator(conditioning)
        h, grid = self.positional_embedding(seq_lens)
        if film is not None and self.film_after_pos_embed:
            h, film = _film(h, *film[0]), film[1:]
        for i, layer in enumerate(self.hidden_linears):
            h = torch.sin(_linear(layer, h))
            if film is not None:
                h = _film(h, *film[i])
        return _linear(self.out_linear, h), grid


class RandomFourierKernelND(nn.Module):
    """Implicit kernel ``k(p) = out_linear(MLP([cos(W p + b), sin(W p + b)]))`` (no FiLM).

    ``kernel_network``: ``num_layers - 1`` (Linear, activation) pairs, activation built from
    ``nonlinear_cfg`` (e.g. ``nn.SiLU``); PyTorch default init unless ``init_method`` (curried
    ``fn(dim) -> fn(weight)``, called with ``mlp_hidden_dim`` for hidden and ``out_dim`` for the output
    layer); output weights then times ``sqrt(1 / prod(L_cache))``. ``conditioning`` is ignored, as theirs.
    """

    def __init__(
        self,
        out_dim: int,
        data_dim: int,
        mlp_hidden_dim: int,
        num_layers: int,
        embedding_dim: int,
        omega_0: float,
        L_cache: int | Sequence[int],
        use_bias: bool,
        nonlinear_cfg: ModuleSpec,
        init_method: InitMethod | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"num_layers must be >= 2, got {num_layers}")
        self.out_dim, self.data_dim = out_dim, data_dim
        self.L_cache = _per_axis(L_cache, data_dim, "L_cache", 2)
        self.positional_embedding = RandomFourierPositionalEmbeddingND(
            data_dim, embedding_dim, L_cache, omega_0, use_bias
        )
        layers: list[nn.Module] = []
        for w_in in [embedding_dim] + [mlp_hidden_dim] * (num_layers - 2):
            act = copy.deepcopy(nonlinear_cfg) if isinstance(nonlinear_cfg, nn.Module) else nonlinear_cfg
            layers += [nn.Linear(w_in, mlp_hidden_dim, bias=use_bias), build_module(act, "nonlinear_cfg")]
        self.kernel_network = nn.Sequential(*layers)
        self.out_linear = nn.Linear(mlp_hidden_dim, out_dim, bias=use_bias)
        with torch.no_grad():
            if init_method is not None:
                for layer in self.kernel_network:
                    if isinstance(layer, nn.Linear):
                        init_method(mlp_hidden_dim)(layer.weight)
                init_method(out_dim)(self.out_linear.weight)
            self.out_linear.weight.mul_(math.sqrt(1.0 / math.prod(self.L_cache)))

    def forward(self, seq_lens: Sequence[int], conditioning: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h, grid = self.positional_embedding(seq_lens)
        for layer in self.kernel_network:
            h = _linear(layer, h) if isinstance(layer, nn.Linear) else layer(h)
        return _linear(self.out_linear, h), grid


# ---------------------------------------------------------------------------------------------------
# Kernel windows (nvSubquadratic modules/masks_nd.py): ``forward(grid, kernel) -> kernel * mask(grid)``.
# ---------------------------------------------------------------------------------------------------


class ExponentialModulationND(nn.Module):
    """``k * prod_d exp(-|p_d| |w_dc|)``; ``weight`` (D, C) = linspace(slow, fast, C) / D on every axis."""

    def __init__(
        self, data_dim: int, num_channels: int, fast_decay_pct: float = 13.81, slow_decay_pct: float = 2.3
    ) -> None:
        super().__init__()
        rates = torch.linspace(slow_decay_pct, fast_decay_pct, num_channels) / data_dim
        self.weight = nn.Parameter(rates.expand(data_dim, num_channels).clone())
        _no_weight_decay(self)

    def forward(self, grid: Tensor, x: Tensor) -> Tensor:
        decay = torch.exp(-grid.abs().unsqueeze(-1) * self.weight.to(grid.dtype).abs()).prod(dim=-2)
        return x * decay.to(x.dtype)


def _std_from_attenuation(attenuation: float, position: float) -> float:
    """1-D Gaussian std with ``exp(-position^2 / (2 std^2)) = attenuation``."""
    if not (0.0 < attenuation < 1.0 and position > 0.0):
        raise ValueError(f"attenuation must be in (0, 1) and position > 0, got {attenuation}, {position}")
    return position * math.sqrt(-1.0 / (2.0 * math.log(attenuation)))


class GaussianModulationND(nn.Module):
    """``k * exp(-1/2 sum_d (p_d / std_dc)^2)`` with learned std clamped to [min_std, max_std].

    min_std: value ``min_attenuation_at_step`` one grid step (2 / (grid_size - 1)) from the centre;
    max_std: value ``max_attenuation_at_limit`` at position 1. Init: per axis a log-spaced ramp over the
    channels from ``min_std * e`` to ``std(0.1 at 1) * e`` (e = ``init_extent``), both ends clamped.
    ``std_param`` is the std (``"direct"``, clamped in place before each use as theirs does in a
    forward pre-hook), its log (``"log"``) or softplus preimage (``"softplus"``).
    """

    def __init__(
        self,
        data_dim: int,
        num_channels: int,
        grid_size: int,
        min_attenuation_at_step: float = 0.1,
        max_attenuation_at_limit: float = 0.95,
        init_extent: float | Sequence[float] = 1.0,
        parametrization: Literal["direct", "log", "softplus"] = "direct",
    ) -> None:
        super().__init__()
        self.parametrization = check_choice(parametrization, "parametrization", ("direct", "log", "softplus"))
        if grid_size < 2:
            raise ValueError(f"grid_size must be >= 2, got {grid_size}")
        extents = (
            (float(init_extent),) * data_dim if isinstance(init_extent, (int, float)) else tuple(init_extent)
        )
        if len(extents) != data_dim or not all(math.isfinite(e) and e > 0 for e in extents):
            raise ValueError(
                f"init_extent must be a positive float or {data_dim} of them, got {init_extent!r}"
            )
        self.min_std = _std_from_attenuation(min_attenuation_at_step, 2.0 / (grid_size - 1))
        self.max_std = _std_from_attenuation(max_attenuation_at_limit, 1.0)
        high_unit = _std_from_attenuation(INIT_EXTENT_ATTENUATION, 1.0)
        ramps = []
        for e in extents:
            low = min(max(self.min_std * e, self.min_std), self.max_std)
            high = min(max(high_unit * e, self.min_std), self.max_std)
            ramps.append(torch.logspace(math.log10(low), math.log10(high), num_channels))
        std = torch.stack(ramps)
        param = {"direct": std, "log": std.log(), "softplus": std.expm1().log()}[parametrization]
        self.std_param = nn.Parameter(param)
        _no_weight_decay(self)

    def std(self) -> Tensor:
        if self.parametrization == "direct":
            with torch.no_grad():
                self.std_param.clamp_(self.min_std, self.max_std)
            return self.std_param
        raw = self.std_param.exp() if self.parametrization == "log" else F.softplus(self.std_param)
        return raw.clamp(self.min_std, self.max_std)

    def forward(self, grid: Tensor, x: Tensor) -> Tensor:
        inv_var = self.std().to(grid.dtype).square().reciprocal()
        gauss = torch.exp(-0.5 * torch.einsum("b...d,dc->b...c", grid.square(), inv_var))
        return x * gauss.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# CKConvND (nvSubquadratic modules/ckconv_nd.py).
# ---------------------------------------------------------------------------------------------------


def _resolve_periodic(fft_padding: str | Sequence[str], data_dim: int) -> tuple[bool, ...]:
    """Per-axis periodic flags from ``fft_padding``: "zero" / "circular" for all axes, or one per axis."""
    modes = (fft_padding,) * data_dim if isinstance(fft_padding, str) else tuple(fft_padding)
    if len(modes) != data_dim or not all(
        isinstance(m, str) and m.strip().lower() in ("zero", "circular") for m in modes
    ):
        raise ValueError(
            f"fft_padding must be 'zero', 'circular' or a list of {data_dim} of them (one per axis), "
            f"got {fft_padding!r}"
        )
    return tuple(m.strip().lower() == "circular" for m in modes)


class CKConvND(nn.Module):
    """Continuous-kernel depthwise convolution ``y = k_theta * x + shortcut * x`` over 1-3 token axes.

    | argument    | meaning                                                                          |
    |-------------|----------------------------------------------------------------------------------|
    | data_dim    | token axes D: x is (B, *S, hidden_dim) with len(S) = D                           |
    | hidden_dim  | channels C (one kernel per channel; ``shortcut`` (C,) ~ U(+-1/sqrt(C)))          |
    | kernel      | ``functools.partial`` of ``SIRENKernelND`` / ``RandomFourierKernelND`` (out_dim=C);  |
    |             | its ``L_cache`` is halved ((L+1)//2) on single-grid axes before it is built;      |
    |             | or a built kernel module (double grid only)                                      |
    | mask        | None / ``nn.Identity``, or a partial of ``ExponentialModulationND`` or            |
    |             | ``GaussianModulationND``; ``grid_size`` := 2 * max(L_cache) - 1 (after halving)   |
    | grid_type   | "double" (n grid points per side, 2n-1 taps) or "single" ((n+1)//2 points);      |
    |             | None with a per-axis ``fft_padding`` (single on circular axes, double on zero)   |
    | fft_padding | "zero" ("same" linear convolution), "circular" (needs "single"), or one per axis |
    | is_causal   | 1-D, "zero" only: output t sees inputs <= t (the kernel's offsets 0..n-1)        |

    ``forward(x, conditioning=None)``: x (B, *S, C); ``conditioning`` (B, cond_dim) drives the kernel's
    FiLM (ignored by kernels without FiLM, as in nvSubquadratic). Returns x's shape and dtype.
    """

    def __init__(
        self,
        data_dim: int,
        hidden_dim: int,
        kernel: Callable[..., nn.Module] | nn.Module,
        mask: Callable[..., nn.Module] | nn.Module | None = None,
        grid_type: Literal["double", "single"] | None = "double",
        fft_padding: str | Sequence[str] = "zero",
        is_causal: bool = False,
    ) -> None:
        super().__init__()
        if data_dim not in (1, 2, 3):
            raise ValueError(f"data_dim must be 1, 2 or 3, got {data_dim}")
        periodic = _resolve_periodic(fft_padding, data_dim)
        if isinstance(fft_padding, str):
            check_choice(grid_type, "grid_type", ("double", "single"))
            if any(periodic) and grid_type != "single":
                raise ValueError("fft_padding='circular' needs grid_type='single' (kernel size = input size)")
            single = (grid_type == "single",) * data_dim
        else:
            if grid_type is not None:
                raise ValueError(f"grid_type must be None with a per-axis fft_padding, got {grid_type!r}")
            single = periodic
        if is_causal and (data_dim != 1 or any(periodic) or not isinstance(fft_padding, str)):
            raise ValueError("is_causal=True needs data_dim=1 and fft_padding='zero'")
        self.data_dim, self.hidden_dim, self.is_causal = data_dim, hidden_dim, is_causal
        self.fft_padding, self.grid_type = fft_padding, grid_type
        self.periodic, self.single_grid = periodic, single
        self.kernel, kernel_L_cache = self._build_kernel(kernel)
        self.mask = self._build_mask(mask, kernel_L_cache)
        self.shortcut = nn.Parameter(torch.empty(hidden_dim).uniform_(-(hidden_dim**-0.5), hidden_dim**-0.5))

    def _build_kernel(
        self, kernel: Callable[..., nn.Module] | nn.Module
    ) -> tuple[nn.Module, tuple[int, ...] | None]:
        """The kernel network and its L_cache per axis (halved on single-grid axes; None when unknown)."""
        if isinstance(kernel, nn.Module):
            if any(self.single_grid):
                raise ValueError(
                    "kernel must be a functools.partial that sets L_cache on single-grid axes (CKConvND "
                    "halves L_cache there before building it), got a built module"
                )
            return kernel, getattr(kernel, "L_cache", None)
        if not isinstance(kernel, functools.partial):
            raise TypeError(
                f"kernel must be a functools.partial of a kernel class or a module, got {kernel!r}"
            )
        bound = inspect.signature(kernel.func).bind_partial(*kernel.args, **kernel.keywords)
        if "L_cache" not in bound.arguments:
            raise ValueError("kernel must be a functools.partial of a kernel class that sets L_cache")
        L_cache = _per_axis(bound.arguments["L_cache"], self.data_dim, "L_cache", 2)
        L_cache = tuple((L + 1) // 2 if s else L for L, s in zip(L_cache, self.single_grid))
        bound.arguments["L_cache"] = L_cache
        built = kernel.func(*bound.args, **bound.kwargs)
        if getattr(built, "out_dim", self.hidden_dim) != self.hidden_dim:
            raise ValueError(f"kernel out_dim must equal hidden_dim={self.hidden_dim}, got {built.out_dim}")
        return built, L_cache

    def _build_mask(
        self, mask: Callable[..., nn.Module] | nn.Module | None, L_cache: tuple[int, ...] | None
    ) -> nn.Module | None:
        """The kernel window; ``grid_size`` = 2 * max(L_cache) - 1 when its class takes one (as theirs)."""
        if mask is None or isinstance(mask, nn.Identity):
            return None
        if isinstance(mask, nn.Module):
            return mask
        target = getattr(mask, "func", mask)
        if L_cache is not None and "grid_size" in inspect.signature(target).parameters:
            return mask(grid_size=2 * max(L_cache) - 1)
        return mask()

    def forward(self, x: Tensor, conditioning: Tensor | None = None) -> Tensor:
        check_tensor(x, "x")
        if x.dim() != self.data_dim + 2 or x.shape[-1] != self.hidden_dim:
            raise ValueError(
                f"x must be (B, *spatial, {self.hidden_dim}) with {self.data_dim} token axes, "
                f"got {tuple(x.shape)}"
            )
        grid_lens = [(n + 1) // 2 if s else n for n, s in zip(x.shape[1:-1], self.single_grid)]
        if conditioning is not None and conditioning.shape[0] != x.shape[0]:
            raise ValueError(
                f"conditioning must be (B, cond_dim) with B = {x.shape[0]}, got {tuple(conditioning.shape)}"
            )
        k, grid = self.kernel(grid_lens, conditioning=conditioning)
        if self.mask is not None:
            k = self.mask(grid, k)
        if self.is_causal:
            k = k[:, k.shape[1] // 2 :]  # offsets 0..n-1
        y = fft_long_conv(x, k, spatial_dims=self.data_dim, causal=self.is_causal, circular=self.periodic)
        return y + self.shortcut.to(y.dtype) * x

    def extra_repr(self) -> str:
        return (
            f"data_dim={self.data_dim}, hidden_dim={self.hidden_dim}, fft_padding={self.fft_padding!r}, "
            f"grid_type={self.grid_type!r}, is_causal={self.is_causal}"
        )


# ---------------------------------------------------------------------------------------------------
# The gated operator and its QKV wrapper (nvSubquadratic modules/hyena_nd.py, modules/sequence_mixer.py).
# ---------------------------------------------------------------------------------------------------


class CausalConv1D(nn.Conv1d):
    """Conv1d padded (K-1)*dilation on the left (``is_causal``) or (K-1)*dilation//2 on both sides."""

    def __init__(self, *args: object, is_causal: bool = True, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.is_causal = is_causal

    def forward(self, input: Tensor) -> Tensor:
        reach = (self.kernel_size[0] - 1) * self.dilation[0]
        pad = (reach, 0) if self.is_causal else (reach // 2, reach // 2)
        return F.conv1d(F.pad(input, pad), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class L2Norm(nn.Module):
    """``x / max(||x||_2, eps)`` over the channel axis (nvSubquadratic ``L2Norm``, eps 1e-12)."""

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, p=2.0, dim=-1, eps=self.eps)


def _apply_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """A norm on channels-last x; ``nn.GroupNorm`` and norms flagged ``channels_first`` see (B, C, *S)
    (so GroupNorm(1, C) normalises each sample over channels and tokens, as in nvSubquadratic)."""
    if isinstance(norm, nn.GroupNorm) or getattr(norm, "channels_first", False):
        return norm(x.movedim(-1, 1)).movedim(1, -1)
    return norm(x)


class HyenaND(nn.Module):
    """nvSubquadratic's Hyena: ``output_norm(GlobalConv(norm(q * gate(k))) * gate_2(v))`` on q, k, v.

    | argument          | meaning                                                                   |
    |-------------------|---------------------------------------------------------------------------|
    | global_conv       | ``CKConvND`` (or any module ``(z (B, *S, C), conditioning=None) -> z``)    |
    | short_conv        | depthwise conv on the channels-first concat [q; k; v] (3C channels):      |
    |                   | ``nn.Conv{1,2,3}d(3C, 3C, K, groups=3C, padding=K//2)``, ``CausalConv1D``, |
    |                   | or None / ``nn.Identity`` (skipped)                                        |
    | gate_nonlinear    | sigma of the first gate z = q * sigma(k) (e.g. ``nn.SiLU()``, ``nn.Identity()``) |
    | pixelhyena_norm   | norm of z before the long convolution (None: none)                         |
    | qk_norm           | norm of q, and of k when ``gate_nonlinear`` is Identity (a separate copy;  |
    |                   | ``k_norm`` is Identity otherwise); None: no ``q_norm`` / ``k_norm``         |
    | output_norm       | norm after the second gate (None: none)                                    |
    | gate_nonlinear_2  | sigma_2 of the second gate (None: ``gate_nonlinear``)                      |

    Norms act on channels-last tensors (``nn.LayerNorm``, ``nn.RMSNorm`` for their RMSNorm and
    RMSNormChannelFirst: same formula, key ``weight``; ``L2Norm``), ``nn.GroupNorm`` channels-first.
    Each argument is a module or a zero-argument factory. ``forward(query, key, value, conditioning=None)``,
    each (B, *S, C); ``conditioning`` goes to ``global_conv``.
    """

    def __init__(
        self,
        global_conv: ModuleSpec,
        short_conv: ModuleSpec | None,
        gate_nonlinear: ModuleSpec,
        pixelhyena_norm: ModuleSpec | None,
        qk_norm: ModuleSpec | None,
        output_norm: ModuleSpec | None = None,
        gate_nonlinear_2: ModuleSpec | None = None,
    ) -> None:
        super().__init__()
        self.global_conv = build_module(global_conv, "global_conv")
        self.short_conv = None if short_conv is None else build_module(short_conv, "short_conv")
        if isinstance(self.short_conv, nn.Identity):
            self.short_conv = None
        self.gate_nonlinear = build_module(gate_nonlinear, "gate_nonlinear")
        self.gate_nonlinear_2 = (
            self.gate_nonlinear
            if gate_nonlinear_2 is None
            else build_module(gate_nonlinear_2, "gate_nonlinear_2")
        )
        self.pixelhyena_norm = (
            None if pixelhyena_norm is None else build_module(pixelhyena_norm, "pixelhyena_norm")
        )
        self.output_norm = None if output_norm is None else build_module(output_norm, "output_norm")
        _no_weight_decay(self.pixelhyena_norm, self.output_norm)
        self.q_norm = self.k_norm = None
        if qk_norm is not None:
            self.q_norm = build_module(qk_norm, "qk_norm")
            linear_gate = isinstance(self.gate_nonlinear, nn.Identity)
            if not linear_gate:
                self.k_norm = nn.Identity()  # a nonlinear gate already bounds sigma(k)
            elif isinstance(qk_norm, nn.Module):
                self.k_norm = copy.deepcopy(self.q_norm)
            else:
                self.k_norm = build_module(qk_norm, "qk_norm")
        self.hidden_dim = getattr(self.global_conv, "hidden_dim", None)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, conditioning: Tensor | None = None
    ) -> Tensor:
        for name, t in (("query", query), ("key", key), ("value", value)):
            check_tensor(t, name, min_dim=3)
            if t.shape != query.shape or (self.hidden_dim is not None and t.shape[-1] != self.hidden_dim):
                raise ValueError(
                    f"{name} must be (B, *spatial, {self.hidden_dim}) like query {tuple(query.shape)}, "
                    f"got {tuple(t.shape)}"
                )
        if self.short_conv is not None:
            qkv = self.short_conv(torch.cat([query, key, value], dim=-1).movedim(-1, 1)).movedim(1, -1)
            if qkv.shape[:-1] != query.shape[:-1] or qkv.shape[-1] != 3 * query.shape[-1]:
                raise ValueError(
                    f"short_conv must keep (B, 3C, *spatial), got {tuple(qkv.movedim(-1, 1).shape)}"
                )
            query, key, value = qkv.split(query.shape[-1], dim=-1)
        if self.q_norm is not None:
            query = _apply_norm(self.q_norm, query)
            key = _apply_norm(self.k_norm, key)
        z = query * self.gate_nonlinear(key)
        if self.pixelhyena_norm is not None:
            z = _apply_norm(self.pixelhyena_norm, z)
        y = self.global_conv(z, conditioning=conditioning) * self.gate_nonlinear_2(value)
        if self.output_norm is not None:
            y = _apply_norm(self.output_norm, y)
        return y


class QKVSequenceMixer(nn.Module):
    """``out_proj(mixer(*chunk(qkv_proj(x), 3), conditioning))``: the sequence mixer of a residual block.

    ``qkv_proj = Linear(C, 3C, bias=qkv_bias)``, ``out_proj = Linear(C, C, bias=out_proj_bias)``;
    ``init_method_in`` / ``init_method_out`` (curried ``fn(C) -> fn(weight)``, e.g. ``small_init``,
    ``functools.partial(wang_init, num_layers=N)``) replace PyTorch's default weight init and zero the
    biases. ``forward(x, conditioning=None)``: x (B, *S, C), conditioning (B, Cc) for the kernel FiLM
    (``AdaLNZeroResidualBlock`` passes its pooled condition).
    """

    def __init__(
        self,
        hidden_dim: int,
        mixer: ModuleSpec,
        qkv_bias: bool = False,
        out_proj_bias: bool = False,
        init_method_in: InitMethod | None = None,
        init_method_out: InitMethod | None = None,
    ) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.mixer = build_module(mixer, "mixer")
        self.qkv_proj = nn.Linear(hidden_dim, 3 * hidden_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim, bias=out_proj_bias)
        for layer, init in ((self.qkv_proj, init_method_in), (self.out_proj, init_method_out)):
            if init is not None:
                with torch.no_grad():
                    init(hidden_dim)(layer.weight)
                    if layer.bias is not None:
                        nn.init.zeros_(layer.bias)

    @property
    def in_features(self) -> int:
        return self.hidden_dim

    @property
    def out_features(self) -> int:
        return self.hidden_dim

    def forward(self, x: Tensor, conditioning: Tensor | None = None) -> Tensor:
        check_tensor(x, "x", min_dim=3)
        if x.shape[-1] != self.hidden_dim:
            raise ValueError(f"x must be (B, *spatial, {self.hidden_dim}), got {tuple(x.shape)}")
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        return self.out_proj(self.mixer(q, k, v, conditioning=conditioning))


# nvSubquadratic examples/spatial_recall_v2/mixer_defaults.py (``get_hyena_mixer_cfg``): SIREN kernel sizes.
KERNEL_MLP_HIDDEN_DIM, KERNEL_NUM_LAYERS, KERNEL_EMBEDDING_DIM = 32, 3, 32
KERNEL_OMEGA_0, KERNEL_HIDDEN_OMEGA_0 = 10.0, 1.0


def hyena_mixer(
    hidden_dim: int,
    data_dim: int,
    L_cache: int | Sequence[int],
    *,
    num_blocks: int,
    fft_padding: Literal["zero", "circular"] = "zero",
    is_causal: bool = False,
    cond_dim: int | None = None,
    short_kernel: int = 3,
) -> QKVSequenceMixer:
    """nvSubquadratic's default Hyena sequence mixer (``get_hyena_mixer_cfg`` of its v2 examples).

    SIREN kernel (32 wide, 3 layers, 32-dim embedding, omega_0 10, hidden omega_0 1, biases), no mask,
    SiLU / Sigmoid gates, RMSNorm (eps 1e-6) before the long convolution and after the second gate,
    L2 QK-norm, bias-free depthwise short convolution (``CausalConv1D`` in 1-D), ``small_init`` in and
    ``wang_init(num_layers=num_blocks)`` out. Extensions of ours: ``fft_padding="circular"`` (their
    "single" grid), and ``cond_dim`` adds a ``KernelFiLMGenerator`` (identity init) on every hidden layer.
    """
    film = None
    if cond_dim is not None:
        film = functools.partial(KernelFiLMGenerator, cond_dim, KERNEL_MLP_HIDDEN_DIM, KERNEL_NUM_LAYERS - 1)
    kernel = functools.partial(
        SIRENKernelND,
        out_dim=hidden_dim,
        data_dim=data_dim,
        mlp_hidden_dim=KERNEL_MLP_HIDDEN_DIM,
        num_layers=KERNEL_NUM_LAYERS,
        embedding_dim=KERNEL_EMBEDDING_DIM,
        omega_0=KERNEL_OMEGA_0,
        L_cache=L_cache,
        use_bias=True,
        hidden_omega_0=KERNEL_HIDDEN_OMEGA_0,
        film_cfg=film,
    )
    check_choice(fft_padding, "fft_padding", ("zero", "circular"))
    grid_type = "single" if fft_padding == "circular" else "double"
    conv = CKConvND(data_dim, hidden_dim, kernel, None, grid_type, fft_padding, is_causal)
    width = 3 * hidden_dim
    if data_dim == 1:
        short = CausalConv1D(width, width, short_kernel, groups=width, bias=False, is_causal=is_causal)
    else:
        conv_nd = (nn.Conv2d, nn.Conv3d)[data_dim - 2]
        short = conv_nd(width, width, short_kernel, groups=width, padding=short_kernel // 2, bias=False)
    mixer = HyenaND(
        conv,
        short,
        nn.SiLU(),
        lambda: nn.RMSNorm(hidden_dim, eps=1e-6),
        L2Norm,
        output_norm=lambda: nn.RMSNorm(hidden_dim, eps=1e-6),
        gate_nonlinear_2=nn.Sigmoid(),
    )
    return QKVSequenceMixer(
        hidden_dim,
        mixer,
        init_method_in=small_init,
        init_method_out=functools.partial(wang_init, num_layers=num_blocks),
    )
