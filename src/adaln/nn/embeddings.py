"""Condition and token embeddings: timesteps, class labels, AF3 noise levels, patches, positions.

Sources: facebookresearch/DiT ``models.py`` (``TimestepEmbedder``, ``LabelEmbedder``,
``get_2d_sincos_pos_embed``; ``PatchEmbed`` is timm's as DiT uses it), diffusers ``embeddings.py``
(``get_timestep_embedding``, the ``freq_shift=1`` spacing of its DiT) and google-deepmind/alphafold3
``src/alphafold3/model/network/noise_level_embeddings.py`` (``noise_embeddings``, Algorithm 21/22).
"""

from __future__ import annotations

import functools
import importlib.resources
import math

import numpy as np
import torch
from torch import Tensor, nn

from adaln.checks import check_choice, check_tensor, check_values

__all__ = [
    "FourierEmbedding",
    "LabelEmbedder",
    "LabelEmbedding",
    "PatchEmbed",
    "TimestepEmbedder",
    "get_2d_sincos_pos_embed",
    "timestep_embedding",
]

AF3_FOURIER_DIM = 256
PATCH_INITS = ("dit", "torch")


def _sizes(v: int | tuple[int, ...], n: int, name: str) -> tuple[int, ...]:
    """An int (every axis) or ``n`` positive ints as an n-tuple."""
    sizes = (v,) * n if isinstance(v, int) else tuple(v)
    if len(sizes) != n or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ValueError(f"{name} must be a positive int or {n} positive ints (one per axis), got {v!r}")
    return sizes


#################################################################################
#               Embedding layers for timesteps and class labels                 #
#################################################################################


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000, *, freq_shift: int = 0) -> Tensor:
    """DiT / GLIDE sinusoidal embedding ``[cos(t * f), sin(t * f)]``, ``f_i = max_period^(-i / (half - freq_shift))``.

    ``freq_shift=0`` is fb DiT's ``TimestepEmbedder.timestep_embedding`` (i / half); ``freq_shift=1`` is
    diffusers' ``get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=1)`` as its DiT uses it
    (i / (half - 1): the lowest frequency is exactly 1 / max_period). i = 0..half-1, cos first, then sin;
    an odd ``dim`` gets one zero column (as both). t: (B,) int or float timesteps (fractional allowed)
    -> (B, dim) float32, float64 for float64 t (both sources compute in float32 for every t).
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    half = dim // 2
    _check_freq_shift(freq_shift, dim)
    ct = torch.float64 if t.dtype == torch.float64 else torch.float32
    # Same operation order as both sources ((-ln P * i) / denominator), so float32 results agree bit for bit.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=ct, device=t.device) / (half - freq_shift))
    args = t.to(ct)[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def _check_freq_shift(freq_shift: int, dim: int) -> None:
    if freq_shift not in (0, 1) or dim // 2 - freq_shift < 1:
        raise ValueError(
            f"freq_shift must be 0 (fb DiT) or 1 (diffusers' DiT) and below dim // 2 = {dim // 2}, got {freq_shift!r}"
        )


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal features then a 2-layer SiLU MLP (DiT ``TimestepEmbedder``).

    ``self.mlp`` keys ``mlp.0``, ``mlp.2`` match fb DiT (diffusers: ``timestep_embedder.linear_1/2``);
    init as DiT's ``initialize_weights``: weights normal std 0.02, biases 0. ``freq_shift`` picks the
    sinusoid's frequency spacing (``timestep_embedding``: 0 fb DiT, 1 diffusers' DiT).
    t: (B,) -> (B, hidden_size) in the MLP's dtype.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, *, freq_shift: int = 0) -> None:
        super().__init__()
        self.hidden_size, self.frequency_embedding_size = hidden_size, frequency_embedding_size
        self.freq_shift = freq_shift
        _check_freq_shift(freq_shift, frequency_embedding_size)
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        for i in (0, 2):
            nn.init.normal_(self.mlp[i].weight, std=0.02)
            nn.init.zeros_(self.mlp[i].bias)

    def forward(self, t: Tensor) -> Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))

    def extra_repr(self) -> str:
        return f"frequency_embedding_size={self.frequency_embedding_size}, freq_shift={self.freq_shift}"


class LabelEmbedding(nn.Module):
    """Class labels -> vectors, with label dropout for classifier-free guidance (DiT ``LabelEmbedder``).

    The table has one extra row, the null class ``num_classes``, when ``dropout_prob > 0`` (DiT's
    ``use_cfg_embedding``). Init normal std 0.02 (DiT). labels: (B,) int -> (B, dim).
    """

    def __init__(self, num_classes: int, dim: int, dropout_prob: float) -> None:
        super().__init__()
        if not 0.0 <= dropout_prob <= 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1], got {dropout_prob}")
        self.num_classes, self.dim, self.dropout_prob = num_classes, dim, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    @property
    def null_class(self) -> int:
        """Index of the unconditional (dropped) label."""
        return self.num_classes

    def token_drop(
        self, labels: Tensor, force_drop_ids: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Replace labels by the null class: where ``force_drop_ids == 1``, else with prob dropout_prob."""
        if force_drop_ids is None:
            device = generator.device if generator is not None else labels.device
            u = torch.rand(labels.shape[0], generator=generator, device=device).to(labels.device)
            drop = u < self.dropout_prob
        else:
            if not isinstance(force_drop_ids, Tensor) or force_drop_ids.shape != labels.shape:
                raise ValueError(f"force_drop_ids must be a tensor of shape {tuple(labels.shape)} (labels')")
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)

    def forward(
        self,
        labels: Tensor,
        train: bool | None = None,
        force_drop_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``train`` None means ``self.training``; ``generator`` drives the label dropout."""
        self._check_labels(labels)
        train = self.training if train is None else train
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if self.dropout_prob == 0:
                raise ValueError("force_drop_ids needs a null-class row: build with dropout_prob > 0")
            labels = self.token_drop(labels, force_drop_ids, generator)
        return self.embedding_table(labels)

    def _check_labels(self, labels: object) -> None:
        if not isinstance(labels, Tensor) or labels.dtype not in (torch.int32, torch.int64):
            kind = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
            raise TypeError(f"labels must be an int32/int64 tensor of shape (B,), got {kind}")
        if labels.dim() != 1:
            raise ValueError(f"labels must have shape (B,), got {tuple(labels.shape)}")
        high = self.embedding_table.num_embeddings - 1
        # Data-dependent check: a host sync, skipped while tracing for torch.compile (no graph break).
        if check_values() and labels.numel() and (labels.min() < 0 or labels.max() > high):
            raise ValueError(
                f"labels must lie in [0, {high}] (num_classes={self.num_classes}"
                f"{', null class included' if high == self.num_classes else ''}), "
                f"got min {int(labels.min())}, max {int(labels.max())}"
            )


LabelEmbedder = LabelEmbedding


#################################################################################
#                    AlphaFold3 Fourier noise-level embedding                   #
#################################################################################


@functools.cache
def _af3_fourier_constants() -> tuple[np.ndarray, np.ndarray]:
    """AF3's fixed ``(weight, bias)``, 256 float64 each, shipped with the package."""
    resource = importlib.resources.files("adaln.nn").joinpath("af3_fourier_constants.npz")
    with resource.open("rb") as f, np.load(f) as data:
        return data["weight"].copy(), data["bias"].copy()


class FourierEmbedding(nn.Module):
    """AF3 noise-level embedding ``cos(2 * pi * (c_noise * weight + bias))`` with the official constants.

    Matches ``noise_level_embeddings.py`` ``noise_embeddings``, except that the caller passes
    ``c_noise`` itself: AF3 uses ``c_noise = 1/4 * log(sigma / sigma_data)``. The constants (256 each,
    originally drawn from ``jax.random.PRNGKey(42)``) are float64 non-persistent buffers; AF3 computes
    in float32, as we do for float32 inputs (casting the module to half precision rounds them).
    c_noise: any shape (...) -> (..., 256), fp32 maths for half inputs, returned in c_noise's dtype.
    """

    def __init__(self, dim: int = AF3_FOURIER_DIM) -> None:
        super().__init__()
        if dim != AF3_FOURIER_DIM:
            raise ValueError(f"dim must be {AF3_FOURIER_DIM}: the official AF3 constants have 256 entries")
        self.dim = dim
        weight, bias = _af3_fourier_constants()
        self.register_buffer("weight", torch.tensor(weight), persistent=False)
        self.register_buffer("bias", torch.tensor(bias), persistent=False)

    def forward(self, c_noise: Tensor) -> Tensor:
        check_tensor(c_noise, "c_noise", min_dim=0)
        ct = torch.promote_types(c_noise.dtype, torch.float32)
        phase = c_noise.to(ct)[..., None] * self.weight.to(ct) + self.bias.to(ct)
        return torch.cos(2 * math.pi * phase).to(c_noise.dtype)


#################################################################################
#                   Patch embedding and 2-D sin-cos positions                   #
#################################################################################


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a stride-``patch_size`` ConvNd; by default timm's ``PatchEmbed`` as DiT uses it.

    Two layouts of one module:

    - ``channels_last=False`` (DiT, timm, diffusers): x (B, C, *spatial) -> (B, N, D) tokens in row-major
      patch order (for images (B, C, H, W) -> (B, H/p * W/p, D));
    - ``channels_last=True`` (the project convention, ``ClassificationResNet``): x (B, *spatial, C) ->
      (B, *spatial / p, D), a channels-last token grid.

    ``input_size`` fixes the spatial size (int for every axis, or one int per axis); ``None`` accepts any
    size divisible by ``patch_size`` (``img_size``, ``grid_size`` and ``num_patches`` are then None).
    ``self.proj`` is the conv, so the key is ``x_embedder.proj.weight`` as in fb DiT. ``init="dit"``
    is fb DiT's ``initialize_weights`` (xavier-uniform on the kernel viewed as (D, -1), like an nn.Linear
    on the flattened patch; bias 0); ``init="torch"`` keeps ConvNd's default init.
    """

    def __init__(
        self,
        input_size: int | tuple[int, ...] | None,
        patch_size: int,
        in_channels: int,
        embed_dim: int,
        *,
        spatial_dims: int = 2,
        channels_last: bool = False,
        init: str = "dit",
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be an int >= 1, got {patch_size!r}")
        self.init = check_choice(init, "init", PATCH_INITS)
        p = patch_size
        self.img_size = None if input_size is None else _sizes(input_size, spatial_dims, "input_size")
        if self.img_size is not None and any(s % p for s in self.img_size):
            raise ValueError(f"input_size {self.img_size} must be divisible by patch_size {p}")
        self.grid_size = None if self.img_size is None else tuple(s // p for s in self.img_size)
        self.num_patches = None if self.grid_size is None else math.prod(self.grid_size)
        self.patch_size = (p,) * spatial_dims
        self.in_channels, self.embed_dim = in_channels, embed_dim
        self.spatial_dims, self.channels_last = spatial_dims, channels_last
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]
        self.proj = conv(in_channels, embed_dim, kernel_size=p, stride=p)
        if init == "dit":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """This module's named init (``init``): ``"dit"`` as fb DiT, ``"torch"`` ConvNd's default."""
        if self.init == "torch":
            self.proj.reset_parameters()
            return
        nn.init.xavier_uniform_(self.proj.weight.view(self.embed_dim, -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        if self.channels_last:
            return self.proj(x.movedim(-1, 1)).movedim(1, -1)
        return self.proj(x).flatten(2).transpose(1, 2)

    def _check(self, x: Tensor) -> None:
        n, c = self.spatial_dims, self.in_channels
        if self.channels_last:
            check_tensor(x, "x")
            spatial = tuple(x.shape[1:-1])
            if x.dim() != n + 2 or x.shape[-1] != c:
                raise ValueError(
                    f"x must be (B, *spatial, {c}) with {n} token axes (channels-last), got {tuple(x.shape)}"
                )
        else:
            check_tensor(x, "x", min_dim=n + 2)
            spatial = tuple(x.shape[2:])
            if self.img_size is not None:
                expected = (c, *self.img_size)
                if x.dim() != n + 2 or tuple(x.shape[1:]) != expected:
                    raise ValueError(
                        f"x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
                    )
            elif x.dim() != n + 2 or x.shape[1] != c:
                raise ValueError(f"x must be (B, {c}, *spatial) with {n} spatial axes, got {tuple(x.shape)}")
        if self.img_size is not None and spatial != self.img_size:
            raise ValueError(f"x must have spatial size {self.img_size}, got {spatial} (shape {tuple(x.shape)})")
        if any(s % self.patch_size[0] for s in spatial):
            raise ValueError(
                f"every spatial size of x {spatial} must be divisible by patch_size {self.patch_size[0]}"
            )


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE 1-D sin-cos: ``[sin(pos * w), cos(pos * w)]``, ``w_k = 10000^(-k / (embed_dim / 2))``."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int]) -> np.ndarray:
    """fb DiT's fixed 2-D sin-cos positions (MAE form), float64 ``(h * w, embed_dim)``, row-major tokens.

    The first half of the channels encodes the column (w) coordinate, the second half the row (h):
    DiT builds ``meshgrid(grid_w, grid_h)`` and its ``emb_h`` reads ``grid[0]``, the w coordinate. For
    square grids this is DiT's table exactly; (h, w) grids extend it in the same token order as PatchEmbed.
    """
    h, w = _sizes(grid_size, 2, "grid_size")
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 (sin and cos per axis), got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    return np.concatenate([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], axis=1)
