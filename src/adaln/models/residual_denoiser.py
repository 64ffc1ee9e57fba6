"""A DiT-shaped image denoiser built from nvSubquadratic ``AdaLNZeroResidualBlock``s (Hyena or attention).

Same interface as ``adaln.models.dit.DiT`` with ``learn_sigma=False`` (so ``dit_edm_denoiser`` wraps it),
with the transformer blocks swapped for ``AdaLNZeroResidualBlock`` on a channels-last token grid::

    x = PatchEmbed(image)                          # (B, h, w, D), h = H / p, w = W / p
    x = x + pos_embed                              # attention only: fixed 2-D sin-cos (DiT)
    c = TimestepEmbedder(t) + LabelEmbedding(y)    # (B, D), labels dropped to the null class in training
    x = block(x, c) for each of ``depth`` blocks   # AdaLNZeroResidualBlock(mixer, LN, Mlp, LN, Id, Id, D)
    out = unpatchify(FinalLayer(x, c))             # (B, C, H, W)

Positions: attention is permutation-equivariant over tokens, so it gets DiT's fixed sin-cos table.
Hyena gets none: its long filters are functions of the relative offset (a convolution, translation-
equivariant like a U-Net's) and its zero boundary tells edge tokens apart.

Where we differ from DiT: the block is the generic AdaLN-Zero residual block (its modulation key is
``condition_proj.1``, the mixer's ``sequence_mixer``); with ``mixer="attention"`` it computes exactly
DiT's block. ``networks.ResidualNetwork`` does not fit as a whole (its head is an unconditioned
``final_norm -> out_proj``, DiT's is the adaLN ``FinalLayer``), so the blocks come from
``networks.build_blocks`` and the embeddings, head, init and input checks from ``adaln.models.dit.DiTBase``
(fb DiT's ``initialize_weights`` for every layer but Hyena's).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from adaln.models.dit import FB_EPS, DiTBase
from adaln.networks import build_blocks
from adaln.networks.classification import MIXERS
from adaln.nn.attention import Attention
from adaln.nn.blocks import AdaLNZeroResidualBlock
from adaln.nn.embeddings import LabelEmbedding
from adaln.nn.hyena import Hyena
from adaln.nn.mlp import Mlp


class ResidualDenoiser(DiTBase):
    """Class-conditional image denoiser: patches -> AdaLN-Zero residual blocks -> DiT final layer.

    forward(x (B, C, H, W), t (B,) timestep (may be fractional), y (B,) class ids in [0, num_classes],
    ``num_classes`` being the null class) -> (B, C, H, W). ``mixer``: ``"hyena"`` (``Hyena(D,
    spatial_dims=2, cond_dim=D)``, its filters FiLM-conditioned on c) or ``"attention"``
    (``Attention(D, num_heads)``). ``input_size`` may be an int or (H, W).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        patch_size: int,
        in_channels: int,
        hidden_size: int,
        depth: int,
        *,
        mixer: str = "hyena",
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        self.mixer = mixer
        self._build_stem(input_size, patch_size, in_channels, hidden_size, learn_sigma=False)
        self.depth, self.num_heads, self.mlp_ratio = depth, num_heads, mlp_ratio
        self.class_dropout_prob, self.num_classes = class_dropout_prob, num_classes

        self.y_embedder = LabelEmbedding(num_classes, hidden_size, class_dropout_prob)
        if mixer == "attention":
            # Fixed 2-D sin-cos table as a (1, h, w, D) grid (DiT's), for the channels-last token grid.
            self._register_pos_embed("grid")
            sequence_mixer = partial(Attention, hidden_size, num_heads)
        else:
            self._register_pos_embed(None)
            sequence_mixer = partial(Hyena, hidden_size, spatial_dims=2, cond_dim=hidden_size)
        norm = partial(nn.LayerNorm, hidden_size, elementwise_affine=False, eps=FB_EPS)  # DiT's norms
        block = partial(
            AdaLNZeroResidualBlock,
            sequence_mixer=sequence_mixer,
            sequence_mixer_norm=norm,
            mlp=partial(Mlp, hidden_size, int(hidden_size * mlp_ratio)),
            mlp_norm=norm,
            condition_norm=nn.Identity,
            dropout=nn.Identity,
            hidden_dim=hidden_size,
        )
        self.blocks = build_blocks(block, depth)
        self._build_head()
        self.initialize_weights()

    def _keeps_own_init(self) -> tuple[nn.Module, ...]:
        # Hyena keeps its own init (safari's filter init); every other layer gets DiT's.
        return tuple(block.sequence_mixer for block in self.blocks) if self.mixer == "hyena" else ()

    def forward(self, x: Tensor, t: Tensor, y: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """x (B, C, H, W), t (B,), y (B,) int -> (B, C, H, W).

        In training mode labels are replaced by the null class with probability ``class_dropout_prob``
        (drawn with ``generator`` when given).
        """
        self._check_y(y, self._check_x_t(x, t))
        x = self.x_embedder(x).unflatten(1, self.grid_size)  # (B, h, w, D), row-major patches
        if self.pos_embed is not None:
            x = x + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, generator=generator)  # (B, D)
        for block in self.blocks:
            x = block(x, c)  # (B, h, w, D)
        return self.unpatchify(self.final_layer(x, c))  # (B, h, w, p*p*C) -> (B, C, H, W)

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, patch_size={self.patch_size}, in_channels={self.in_channels}, "
            f"hidden_size={self.hidden_size}, depth={self.depth}, mixer={self.mixer!r}, "
            f"num_classes={self.num_classes}"
        )
