"""Classifier over 1-D, 2-D or 3-D grids: patch embedding -> AdaLN-Zero residual blocks -> pooled head.

Matches nvSubquadratic ``networks/classification_resnet.py`` (``ClassificationResNet``: blocks, mean over
the token axes, output norm, output projection) with a strided-convolution patch embedding as input
projection (``adaln.nn.PatchEmbed`` with ``channels_last=True``) and the block built from
``AdaLNZeroResidualBlock`` around a Hyena or attention mixer.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from adaln.checks import check_tensor
from adaln.networks.residual import ResidualNetwork
from adaln.nn.attention import Attention
from adaln.nn.blocks import AdaLNZeroResidualBlock
from adaln.nn.embeddings import PatchEmbed
from adaln.nn.hyena import Hyena
from adaln.nn.mlp import DropPath, Mlp

MIXERS = ("hyena", "attention")


class ClassificationResNet(ResidualNetwork):
    """Logits (B, num_classes) from x (B, *spatial, in_channels), channels-last (the project convention).

    ``patch_embed -> depth x AdaLNZeroResidualBlock(mixer, Mlp) -> mean over token axes -> LayerNorm ->
    Linear(hidden_dim, num_classes)``. Blocks: LayerNorm pre-norms without affine (eps 1e-5, the
    nvSubquadratic default), ``Mlp(C, mlp_ratio * C)``, identity condition norm, ``DropPath(drop_path)``.
    ``mixer="hyena"``: ``Hyena(C, spatial_dims, order, filter_hidden, cond_dim=C)`` (FiLM kernel
    conditioning from the block's pooled condition); ``"attention"``: ``Attention(C, num_heads)``.

    ``forward(x, condition=None)``: with ``condition_dim`` set, condition (B, condition_dim) or
    (B, *spatial_cond, condition_dim) is required and projected by ``condition_in_proj``. Without it,
    every sample uses one learned constant condition vector (``null_condition``, initialised N(0, 1)
    like an embedding row: a zero vector would give the zero-initialised AdaLN projections no gradient,
    SiLU(0) = 0), and passing a condition is a ValueError.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden_dim: int,
        depth: int,
        *,
        spatial_dims: int,
        patch_size: int,
        mixer: str = "hyena",
        condition_dim: int | None = None,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        order: int = 2,
        filter_hidden: int = 64,
        checkpoint_activations: bool = False,
    ) -> None:
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        if mixer == "hyena":
            sequence_mixer = partial(
                Hyena, hidden_dim, spatial_dims=spatial_dims, order=order, filter_hidden=filter_hidden,
                cond_dim=hidden_dim,
            )
        else:
            sequence_mixer = partial(Attention, hidden_dim, num_heads)
        norm = partial(nn.LayerNorm, hidden_dim, eps=1e-5, elementwise_affine=False)
        block = partial(
            AdaLNZeroResidualBlock,
            sequence_mixer=sequence_mixer,
            sequence_mixer_norm=norm,
            mlp=partial(Mlp, hidden_dim, int(hidden_dim * mlp_ratio)),
            mlp_norm=norm,
            condition_norm=nn.Identity,
            dropout=partial(DropPath, drop_path),
            hidden_dim=hidden_dim,
        )
        # Any grid divisible by patch_size, channels-last; ConvNd's default init (DiT's xavier is for DiT).
        patch_embed = PatchEmbed(
            None, patch_size, in_channels, hidden_dim, spatial_dims=spatial_dims, channels_last=True, init="torch"
        )
        super().__init__(
            in_channels, hidden_dim, num_classes, depth, block, condition_dim, checkpoint_activations,
            in_proj=patch_embed,
        )
        self.mixer, self.spatial_dims, self.patch_size = mixer, spatial_dims, patch_size
        self.null_condition = nn.Parameter(torch.randn(hidden_dim)) if condition_dim is None else None

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        batch = check_tensor(x, "x").shape[0]
        if self.null_condition is not None:
            if condition is not None:
                raise ValueError("condition was given but this network has no condition_dim (unconditioned)")
            cond = self.null_condition.to(x.dtype).expand(batch, self.hidden_dim)
        else:
            cond = self.embed_condition(condition, batch)
        x = self.run_blocks(self.in_proj(x), cond)
        x = x.mean(dim=tuple(range(1, x.dim() - 1)))
        return self.out_proj(self.final_norm(x))
