"""PixArt-alpha: a text-to-image DiT with adaLN-single, cross-attention to the caption and learned sigma.

Matches diffusers ``PixArtTransformer2DModel`` (``models/transformers/pixart_transformer_2d.py``) output for
output: its ``BasicTransformerBlock(norm_type="ada_norm_single")``, ``AdaLayerNormSingle`` with
``PixArtAlphaCombinedTimestepSizeEmbeddings`` and ``PixArtAlphaTextProjection`` (``normalization.py``,
``embeddings.py``). Module and parameter names are PixArt-alpha's own (``diffusion/model/nets/PixArt.py``,
``PixArtMS.py``, ``PixArt_blocks.py``: ``x_embedder``, ``t_embedder``, ``csize_embedder``, ``ar_embedder``,
``y_embedder.y_proj``, ``blocks.N.attn`` / ``cross_attn`` / ``mlp``, ``final_layer``); ours differ in two
places only, ``adaln_single.t_block`` (PixArt ``t_block``) and ``blocks.N.modulation.scale_shift_table``
(PixArt ``blocks.N.scale_shift_table``). Converters: ``from_diffusers`` / ``PixArt.to_diffusers_state_dict``
and ``convert_pixart_state_dict`` / ``PixArt.to_pixart_state_dict``.

Where we deliberately differ from both sources:

- a sample whose ``context_mask`` keeps no token gets no cross-attention update (the branch adds 0), so an
  all-False mask is a true null caption. diffusers turns the mask into a -10000 bias, which for such a
  row shifts every logit alike and attends to all the (padding) tokens; PixArt's xformers call gets an
  empty sequence. Every mask that keeps at least one token gives diffusers' outputs;
- ``forward`` checks its inputs and raises ``ValueError``/``TypeError`` naming the argument.

Timesteps are what diffusers' PixArt pipeline feeds the transformer: DDPM steps in [0, 1000) for the
released PixArt-alpha weights (a VP epsilon predictor, ``pixart_vp_denoiser``). For flow matching trained
here, ``flow_timestep(sigma) = 1000 sigma`` and the output is the velocity ``noise - data``
(``velocity_sign = +1``). That is our convention for flow-trained PixArt models, taken from the PixArt
family's flow-trained successor Sana (diffusers ``pipeline_sana.py`` with ``DPMSolverMultistepScheduler(
use_flow_sigmas=True, prediction_type="flow_prediction")``: timesteps ``1000 sigma``, ``x0 = x - sigma
output``, i.e. output = noise - data) and from SD3; PixArt-alpha and PixArt-Sigma themselves are DDPM models.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from adaln.checks import check_int, compute_dtype
from adaln.diffusion import VPEpsDenoiser
from adaln.functional import gate_residual, norm_modulate
from adaln.models._inputs import (
    check_features,
    check_latents,
    check_per_sample,
    check_placement,
    check_token_mask,
    check_unused,
)
from adaln.models._layout import build_empty, check_layout, check_state_dict, rename_key
from adaln.nn.adaln import AdaLNSingle, AdaLNSingleTable
from adaln.nn.attention import Attention, CrossAttention
from adaln.nn.embeddings import PatchEmbed, TimestepEmbedder
from adaln.nn.mlp import Mlp

__all__ = [
    "CaptionEmbedder",
    "PixArt",
    "PixArtBlock",
    "PixArt_XL_2",
    "T2IFinalLayer",
    "convert_from_diffusers",
    "convert_pixart_state_dict",
    "convert_to_diffusers",
    "from_diffusers",
    "pixart_kwargs_from_diffusers",
    "pixart_pos_embed",
    "pixart_vp_denoiser",
]

PIXART_EPS = 1e-6  # every LayerNorm of PixArt-alpha (diffusers: the config's norm_eps, 1e-6 in PixArt's)
FLOW_TIMESTEP_SCALE = 1000.0  # flow_timestep(sigma) = 1000 sigma (SD3 / Sana-style flow timesteps)


#################################################################################
#                      Positions: PixArt's scaled 2-D sin-cos                   #
#################################################################################


def pixart_pos_embed(
    embed_dim: int,
    grid_size: tuple[int, int],
    *,
    base_size: int,
    interpolation_scale: float,
    device: torch.device | str | None = None,
) -> Tensor:
    """PixArt's 2-D sin-cos positions for an (h, w) token grid: (1, h * w, embed_dim) float32.

    PixArt ``get_2d_sincos_pos_embed(lewei_scale=, base_size=)`` / diffusers ``get_2d_sincos_pos_embed``:
    positions ``arange(n) / (n / base_size) / interpolation_scale`` in float32 (so any grid spans the
    training grid's range), then MAE sin-cos in float64; the first half of the channels encodes the
    column (w) coordinate, the second the row (h), tokens row-major (``adaln.nn.get_2d_sincos_pos_embed``
    is the unscaled case).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 (sin and cos per axis), got {embed_dim}")
    h, w = grid_size
    rows, cols = (
        torch.arange(n, dtype=torch.float32, device=device) / (n / base_size) / interpolation_scale for n in (h, w)
    )
    rows, cols = torch.meshgrid(rows, cols, indexing="ij")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)

    def sincos(pos: Tensor) -> Tensor:
        out = torch.outer(pos.reshape(-1).double(), omega)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([sincos(cols), sincos(rows)], dim=1).float()[None]


#################################################################################
#                           PixArt block and final layer                        #
#################################################################################


class PixArtBlock(nn.Module):
    """PixArt-alpha ``PixArtBlock``: adaLN-single self-attention, plain cross-attention, adaLN-single MLP.

    ``x = x + gate_msa * attn(modulate(LN(x), shift_msa, scale_msa))``;
    ``x = x + cross_attn(x, context, mask)`` (no norm, no gate);
    ``x = x + gate_mlp * mlp(modulate(LN(x), shift_mlp, scale_mlp))``,
    the six parameters being the block's ``scale_shift_table`` + the network-wide ``t_mod``
    (``AdaLNSingleTable``, DiT chunk order). LayerNorms without affine, eps ``norm_eps``; tanh-GELU MLP.
    x (B, N, D), context (B, M, context_dim), t_mod (B, 6 D), keep (B, M) bool with at least one True per
    row, has_caption (B, 1, 1) 1/0 -> (B, N, D).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        context_dim: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = PIXART_EPS,
    ) -> None:
        super().__init__()
        self.hidden_size, self.norm_eps = hidden_size, norm_eps
        self.attn = Attention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.cross_attn = CrossAttention(hidden_size, context_dim, num_heads, qkv_bias=qkv_bias)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act="gelu_tanh")
        self.modulation = AdaLNSingleTable(hidden_size)

    def forward(self, x: Tensor, context: Tensor, t_mod: Tensor, keep: Tensor, has_caption: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(t_mod)
        h = norm_modulate(x, shift_msa, scale_msa, eps=self.norm_eps)
        x = gate_residual(x, self.attn(h), gate_msa)
        x = x + self.cross_attn(x, context, keep) * has_caption
        h = norm_modulate(x, shift_mlp, scale_mlp, eps=self.norm_eps)
        return gate_residual(x, self.mlp(h), gate_mlp)


class CaptionEmbedder(nn.Module):
    """PixArt-alpha ``CaptionEmbedder`` without its caption dropout: ``y_proj`` = Linear, tanh-GELU, Linear.

    diffusers ``PixArtAlphaTextProjection(act_fn="gelu_tanh")`` (``linear_1``, ``linear_2``). Caption
    dropout for guidance is the caller's (an all-False ``context_mask`` is the null caption).
    caption (B, L, context_dim) -> (B, L, hidden_size).
    """

    def __init__(self, context_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.y_proj = Mlp(context_dim, hidden_size, hidden_size, act="gelu_tanh")

    def forward(self, caption: Tensor) -> Tensor:
        return self.y_proj(caption)


class T2IFinalLayer(nn.Module):
    """PixArt-alpha ``T2IFinalLayer``: ``linear(modulate(LN(x), shift, scale))``.

    ``(shift, scale) = scale_shift_table + t_emb`` (the embedded timestep, size conditions included, added
    to both rows; no projection). LN without affine, eps 1e-6 (diffusers ``norm_out``). Table init
    ``randn(2, D) / sqrt(D)`` (PixArt). x (B, N, D), t_emb (B, D) -> (B, N, p * p * out_channels).
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: Tensor, t_emb: Tensor) -> Tensor:
        ct = torch.promote_types(compute_dtype(t_emb.dtype), self.scale_shift_table.dtype)
        shift, scale = (self.scale_shift_table.to(ct)[None] + t_emb.to(ct)[:, None]).unbind(1)
        return self.linear(norm_modulate(x, shift, scale, eps=PIXART_EPS))


#################################################################################
#                                  PixArt model                                 #
#################################################################################


class PixArt(nn.Module):
    """PixArt-alpha (Chen et al. 2023): diffusers ``PixArtTransformer2DModel``, PixArt's own module names.

    Patches + scaled sin-cos positions -> ``depth`` ``PixArtBlock``s -> ``T2IFinalLayer`` -> unpatchify.
    ``t_emb = t_embedder(t)`` (+ ``[csize_embedder(h), csize_embedder(w), ar_embedder(h / w)]`` with
    ``size_conditioning``, PixArtMS); ``t_mod = adaln_single(t_emb)`` (B, 6 D) is shared by every block.
    The caption goes through ``y_embedder.y_proj`` (Linear, tanh-GELU, Linear to D) unless
    ``caption_projection=False`` (then cross-attention reads ``context_dim``-wide tokens directly).

    forward(x (B, C, H, W), t (B,) or a scalar, context=(B, L, context_dim), context_mask=(B, L) bool or
    None, resolution=(B, 2) (h, w), aspect_ratio=(B,) or (B, 1) with size conditioning) -> (B, C_out, H, W),
    C_out = 2 C with ``learn_sigma`` (eps, then the variance interpolation). H and W need only be multiples
    of ``patch_size``: other grids than ``sample_size`` get positions scaled to it, as PixArtMS and
    diffusers compute them. ``pooled`` and ``guidance`` are not PixArt inputs and must be None.

    ``sample_size`` is the latent height = width the positions are based on (diffusers' ``sample_size``;
    PixArt ``input_size``); ``interpolation_scale`` None is diffusers' ``max(sample_size // 64, 1)``
    (PixArt ``lewei_scale``: 1 at 256/512 px, 2 at 1024 px). Init (``initialize_weights``) as PixArt.
    """

    velocity_sign = 1.0  # flow training here: the output is noise - data (see the module docstring)

    def __init__(
        self,
        sample_size: int = 64,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        context_dim: int = 4096,
        *,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = True,
        caption_projection: bool = True,
        size_conditioning: bool = False,
        interpolation_scale: float | None = None,
        qkv_bias: bool = True,
        norm_eps: float = PIXART_EPS,
    ) -> None:
        super().__init__()
        for name, value in (("sample_size", sample_size), ("patch_size", patch_size), ("depth", depth)):
            check_int(value, name)
        if sample_size % patch_size:
            raise ValueError(f"sample_size ({sample_size}) must be divisible by patch_size ({patch_size})")
        if hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 (2-D sin-cos positions), got {hidden_size}")
        if size_conditioning and hidden_size % 3:
            raise ValueError(
                f"hidden_size must be divisible by 3 with size_conditioning (h, w and aspect-ratio embeddings "
                f"of hidden_size // 3 each are added to the timestep embedding), got {hidden_size}"
            )
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {norm_eps!r}")
        self.sample_size, self.patch_size, self.in_channels = sample_size, patch_size, in_channels
        self.hidden_size, self.depth, self.num_heads, self.mlp_ratio = hidden_size, depth, num_heads, mlp_ratio
        self.context_dim, self.caption_projection = context_dim, caption_projection
        self.learn_sigma, self.size_conditioning, self.qkv_bias = learn_sigma, size_conditioning, qkv_bias
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.base_size = sample_size // patch_size
        default_scale = max(sample_size // 64, 1)  # diffusers PixArtTransformer2DModel
        self.interpolation_scale = default_scale if interpolation_scale is None else interpolation_scale
        self.norm_eps = norm_eps

        self.x_embedder = PatchEmbed(None, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)  # freq_shift 0: diffusers Timesteps(256, True, 0)
        if size_conditioning:
            self.csize_embedder = TimestepEmbedder(hidden_size // 3)  # PixArtMS SizeEmbedder, h and w
            self.ar_embedder = TimestepEmbedder(hidden_size // 3)  # aspect ratio h / w
        self.adaln_single = AdaLNSingle(hidden_size)
        if caption_projection:
            self.y_embedder = CaptionEmbedder(context_dim, hidden_size)
        block_context = hidden_size if caption_projection else context_dim
        self.blocks = nn.ModuleList(
            PixArtBlock(hidden_size, num_heads, block_context, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                        norm_eps=norm_eps)
            for _ in range(depth)
        )  # fmt: skip
        self.final_layer = T2IFinalLayer(hidden_size, patch_size, self.out_channels)
        grid = (self.base_size, self.base_size)
        pos = pixart_pos_embed(
            hidden_size, grid, base_size=self.base_size, interpolation_scale=self.interpolation_scale
        )
        self.register_buffer("pos_embed", pos, persistent=False)  # fixed; recomputed for other grids
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """PixArt-alpha ``PixArt.initialize_weights`` / ``PixArtMS.initialize``, in its order.

        Every Linear xavier-uniform with zero bias; the patch conv like a Linear on the flattened patch;
        timestep, size, ``t_block`` and caption MLP weights normal std 0.02. Zero: each block's cross-attention
        output projection (a block starts without caption input) and the output Linear (the network
        predicts 0 at init). adaLN-single itself is not zeroed: the per-block tables (``randn / sqrt(D)``)
        carry the initial modulation, as in PixArt.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.x_embedder.reset_parameters()
        normal = [self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.adaln_single.t_block[1]]
        if self.size_conditioning:
            normal += [self.csize_embedder.mlp[0], self.csize_embedder.mlp[2]]
            normal += [self.ar_embedder.mlp[0], self.ar_embedder.mlp[2]]
        if self.caption_projection:
            normal += [self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2]
        for linear in normal:
            nn.init.normal_(linear.weight, std=0.02)
        for linear in [block.cross_attn.proj for block in self.blocks] + [self.final_layer.linear]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def flow_timestep(self, sigma: Tensor) -> Tensor:
        """The ``t`` for flow noise level ``sigma`` (x = (1 - sigma) data + sigma noise): ``1000 sigma``."""
        return FLOW_TIMESTEP_SCALE * sigma

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        context: Tensor | None = None,
        pooled: Tensor | None = None,
        context_mask: Tensor | None = None,
        guidance: Tensor | None = None,
        *,
        resolution: Tensor | None = None,
        aspect_ratio: Tensor | None = None,
    ) -> Tensor:
        """x (B, C, H, W), t (B,) DDPM timesteps (flow: ``flow_timestep``) -> (B, out_channels, H, W)."""
        check_unused("PixArt-alpha", pooled=pooled, guidance=guidance)
        b, h, w = check_latents(x, self.in_channels, self.patch_size)
        t = check_per_sample(t, "t", b, x.device)
        context = check_features(context, "context", b, self.context_dim, tokens=True)
        keep = check_token_mask(context_mask, context)
        self._check_sizes(resolution, aspect_ratio, b)
        check_placement(self.x_embedder.proj.weight, x, t=t, context=context, context_mask=keep,
                        resolution=resolution, aspect_ratio=aspect_ratio)  # fmt: skip
        if keep is None:
            keep = torch.ones(context.shape[:2], dtype=torch.bool, device=x.device)

        tokens = self.x_embedder(x)  # (B, N, D)
        pos = self.pos_embed if (h, w) == (self.base_size, self.base_size) else pixart_pos_embed(
            self.hidden_size, (h, w), base_size=self.base_size, interpolation_scale=self.interpolation_scale,
            device=x.device,
        )  # fmt: skip
        tokens = (tokens + pos).to(tokens.dtype)
        t_emb = self.t_embedder(t)  # (B, D)
        if self.size_conditioning:
            csize = self.csize_embedder(resolution.reshape(-1)).reshape(b, -1)  # (B, 2 D/3): h then w
            ar = self.ar_embedder(aspect_ratio.reshape(-1))  # (B, D/3)
            t_emb = t_emb + torch.cat([csize, ar], dim=1)
        t_mod = self.adaln_single(t_emb)  # (B, 6 D)
        if self.caption_projection:
            context = self.y_embedder(context)  # (B, L, D)
        # A caption with no kept token: attend to all of it (a valid softmax), then drop the update.
        has_caption = keep.any(dim=1)
        keep = keep | ~has_caption[:, None]
        gate = has_caption.to(tokens.dtype)[:, None, None]
        for block in self.blocks:
            tokens = block(tokens, context, t_mod, keep, gate)
        return self.unpatchify(self.final_layer(tokens, t_emb), h, w)

    def unpatchify(self, x: Tensor, h: int, w: int) -> Tensor:
        """(B, h * w, p * p * C_out) tokens -> (B, C_out, h * p, w * p); token n is patch (n // w, n % w)."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def extra_repr(self) -> str:
        return (
            f"sample_size={self.sample_size}, patch_size={self.patch_size}, in_channels={self.in_channels}, "
            f"hidden_size={self.hidden_size}, depth={self.depth}, num_heads={self.num_heads}, "
            f"context_dim={self.context_dim}, learn_sigma={self.learn_sigma}, "
            f"caption_projection={self.caption_projection}, size_conditioning={self.size_conditioning}, "
            f"interpolation_scale={self.interpolation_scale}"
        )

    # ---- input checks: every error names the argument and what was expected ----------------------

    def _check_sizes(self, resolution: object, aspect_ratio: object, b: int) -> None:
        """With size conditioning: resolution (B, 2) (h, w) and aspect_ratio (B,) or (B, 1); else neither."""
        given = {"resolution": resolution, "aspect_ratio": aspect_ratio}
        if not self.size_conditioning:
            check_unused("this PixArt-alpha (size_conditioning=False)", **given)
            return
        shapes = {"resolution": ((b, 2),), "aspect_ratio": ((b,), (b, 1))}
        for name, value in given.items():
            wanted = " or ".join(str(s) for s in shapes[name])
            if value is None:
                raise ValueError(f"{name} is required by this PixArt (size_conditioning=True): shape {wanted}")
            if not isinstance(value, Tensor) or value.dtype == torch.bool or value.is_complex():
                raise TypeError(f"{name} must be a real torch.Tensor of shape {wanted}, got {type(value).__name__}")
            if tuple(value.shape) not in shapes[name]:
                raise ValueError(f"{name} must have shape {wanted}, got {tuple(value.shape)}")

    # ---- checkpoint layouts ------------------------------------------------------------------------

    def diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments of diffusers' ``PixArtTransformer2DModel`` of this size and settings."""
        if self.mlp_ratio != 4.0:
            raise ValueError(f"diffusers' PixArt has mlp_ratio 4 only; this PixArt has {self.mlp_ratio}")
        return dict(
            num_attention_heads=self.num_heads,
            attention_head_dim=self.hidden_size // self.num_heads,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            num_layers=self.depth,
            cross_attention_dim=self.hidden_size if self.caption_projection else self.context_dim,
            attention_bias=self.qkv_bias,
            sample_size=self.sample_size,
            patch_size=self.patch_size,
            norm_eps=self.norm_eps,
            interpolation_scale=self.interpolation_scale,
            use_additional_conditions=self.size_conditioning,
            caption_channels=self.context_dim if self.caption_projection else None,
        )

    def to_diffusers_state_dict(self) -> dict[str, Tensor]:
        """This model's weights in diffusers' layout (``PixArtTransformer2DModel(**diffusers_config())``)."""
        return convert_to_diffusers(self.state_dict())

    def to_pixart_state_dict(self) -> dict[str, Tensor]:
        """This model's weights with PixArt-alpha's own key names (``PixArt`` / ``PixArtMS`` modules)."""
        return {rename_key(k, _OURS_TO_PIXART): v for k, v in self.state_dict().items()}

    def load_pixart_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a PixArt-alpha checkpoint's state dict (``convert_pixart_state_dict``), checked first."""
        converted = convert_pixart_state_dict(state_dict)
        pixart_names = partial(rename_key, rules=_OURS_TO_PIXART)
        check_layout(converted, self.state_dict(), "PixArt-alpha", target="this PixArt", rename=pixart_names)
        self.load_state_dict(converted)


def PixArt_XL_2(**kwargs: Any) -> PixArt:
    """PixArt-XL/2 (PixArt ``PixArt_XL_2``): 28 blocks of width 1152, 16 heads, patch 2, T5-XXL captions."""
    return PixArt(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)


#################################################################################
#                 PixArt-alpha checkpoint layout (PixArt.py, PixArtMS.py)        #
#################################################################################

# Every key is PixArt's except these two; PixArt checkpoints also hold two tensors that are not weights.
_OURS_TO_PIXART = ((r"^adaln_single\.t_block\.", "t_block."), (r"^(blocks\.\d+\.)modulation\.", r"\1"))
_PIXART_TO_OURS = (
    (r"^t_block\.", "adaln_single.t_block."),
    (r"^(blocks\.\d+\.)scale_shift_table$", r"\1modulation.scale_shift_table"),
)
_PIXART_NOT_WEIGHTS = ("pos_embed", "y_embedder.y_embedding")


def convert_pixart_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """PixArt-alpha checkpoint state dict (PixArt-alpha/PixArt-alpha ``diffusion/model/nets/PixArt.py``
    ``PixArt``, ``PixArtMS.py`` ``PixArtMS``, e.g. PixArt-XL-2-1024-MS.pth) -> ours.

    ``t_block.1.*`` -> ``adaln_single.t_block.1.*``, ``blocks.N.scale_shift_table`` ->
    ``blocks.N.modulation.scale_shift_table``; every other weight keeps its name (``x_embedder.proj``,
    ``t_embedder.mlp.0/2``, ``csize_embedder`` / ``ar_embedder.mlp.0/2``, ``y_embedder.y_proj.fc1/2``,
    ``blocks.N.attn.qkv/proj``, ``blocks.N.cross_attn.q_linear/kv_linear/proj``, ``blocks.N.mlp.fc1/2``,
    ``final_layer.linear``, ``final_layer.scale_shift_table``). Dropped: ``pos_embed`` (the fixed sin-cos
    table, recomputed here) and ``y_embedder.y_embedding`` (the (120, 4096) null caption PixArt substitutes
    for dropped captions; its inference scripts pass it as the unconditional caption, so keep it from the
    original dict if you sample that way). ``ar_embedder`` maps to the aspect-ratio embedder: diffusers'
    ``scripts/convert_pixart_alpha_to_diffusers.py`` copies ``csize_embedder`` there instead.
    """
    check_state_dict(state_dict)
    return {rename_key(k, _PIXART_TO_OURS): v for k, v in state_dict.items() if k not in _PIXART_NOT_WEIGHTS}


#################################################################################
#                diffusers PixArtTransformer2DModel layout                      #
#################################################################################

# (ours, diffusers) module names; a tuple splits our fused projection along dim 0 in that order.
_GLOBAL_MODULES: dict[str, str | tuple[str, ...]] = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
    "adaln_single.t_block.1": "adaln_single.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "final_layer.linear": "proj_out",
}
_BLOCK_MODULES: dict[str, str | tuple[str, ...]] = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
    "cross_attn.proj": "attn2.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
# Plain tensors (no .weight / .bias): both tables chunk (shift, scale[, gate]) in the same order.
_GLOBAL_TENSORS = {"final_layer.scale_shift_table": "scale_shift_table"}
_BLOCK_TENSORS = {"modulation.scale_shift_table": "scale_shift_table"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_DIFFUSERS_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


def _diffusers_names(key: str) -> tuple[str, ...] | None:
    """The diffusers key(s) of one of our keys (several for a fused projection), None if unknown."""
    if m := _BLOCK.match(key):
        prefix, rest, modules, tensors = f"transformer_blocks.{m.group(1)}.", m.group(2), _BLOCK_MODULES, _BLOCK_TENSORS
    else:
        prefix, rest, modules, tensors = "", key, _GLOBAL_MODULES, _GLOBAL_TENSORS
    if rest in tensors:
        return (prefix + tensors[rest],)
    module, _, param = rest.rpartition(".")
    if module not in modules or param not in ("weight", "bias"):
        return None
    names = modules[module]
    return tuple(f"{prefix}{n}.{param}" for n in ((names,) if isinstance(names, str) else names))


def _our_name(key: str) -> tuple[str, int, int] | None:
    """(our key, part index, number of parts) of a diffusers key, None if unknown."""
    if m := _DIFFUSERS_BLOCK.match(key):
        prefix, rest, modules, tensors = f"blocks.{m.group(1)}.", m.group(2), _BLOCK_MODULES, _BLOCK_TENSORS
    else:
        prefix, rest, modules, tensors = "", key, _GLOBAL_MODULES, _GLOBAL_TENSORS
    for ours, theirs in tensors.items():
        if rest == theirs:
            return prefix + ours, 0, 1
    module, _, param = rest.rpartition(".")
    if param not in ("weight", "bias"):
        return None
    for ours, theirs in modules.items():
        names = (theirs,) if isinstance(theirs, str) else theirs
        if module in names:
            return f"{prefix}{ours}.{param}", names.index(module), len(names)
    return None


def convert_to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our PixArt state dict -> diffusers ``PixArtTransformer2DModel``'s: renames, and the fused ``qkv`` /
    ``kv_linear`` split into ``to_q``/``to_k``/``to_v`` (tensors are views, not copies)."""
    check_state_dict(state_dict)
    unknown = [k for k in state_dict if _diffusers_names(k) is None]
    if unknown:
        raise ValueError(f"cannot convert to diffusers: keys not in a PixArt state dict: {unknown}")
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        names = _diffusers_names(key)
        out.update(zip(names, value.chunk(len(names), dim=0)))
    return out


def convert_from_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``PixArtTransformer2DModel`` state dict -> ours (``to_q``/``to_k``/``to_v`` fused in that
    order into ``attn.qkv``, ``to_k``/``to_v`` into ``cross_attn.kv_linear``). Raises ``ValueError`` naming
    unknown keys and incomplete fused projections."""
    check_state_dict(state_dict)
    unknown = [k for k in state_dict if _our_name(k) is None]
    if unknown:
        raise ValueError(f"cannot convert from diffusers: keys not in a PixArtTransformer2DModel: {unknown}")
    parts: dict[str, list[Tensor | None]] = {}
    for key, value in state_dict.items():
        ours, index, count = _our_name(key)
        parts.setdefault(ours, [None] * count)[index] = value
    incomplete = [_diffusers_names(k) for k, p in parts.items() if any(v is None for v in p)]
    if incomplete:
        raise ValueError(f"cannot convert from diffusers: fused projections need all of {incomplete}")
    return {k: p[0] if len(p) == 1 else torch.cat(p, dim=0) for k, p in parts.items()}


# PixArtTransformer2DModel.__init__'s defaults (diffusers models/transformers/pixart_transformer_2d.py).
_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, dropout=0.0,
    cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2, activation_fn="gelu-approximate",
    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None,
    use_additional_conditions=None, caption_channels=None, attention_type="default",
)  # fmt: skip


def pixart_kwargs_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """``PixArt`` keyword arguments giving a diffusers ``PixArtTransformer2DModel`` config's network.

    Missing keys take diffusers' class defaults; ``use_additional_conditions=None`` means
    ``sample_size == 128`` (diffusers' rule). Configs our PixArt cannot express (another norm, activation or
    attention type, affine norms, dropout, no cross-attention, an ``out_channels`` other than C or 2 C, a
    caption projection whose width is not the cross-attention width) raise ``ValueError`` naming the key.
    Unused keys (``norm_num_groups``, ``num_embeds_ada_norm``, ``upcast_attention``, which diffusers'
    SDPA processor ignores) are not read.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (a diffusers model's .config), got {type(config).__name__}")
    c = {**_DIFFUSERS_DEFAULTS, **config}
    fixed = dict(norm_type="ada_norm_single", activation_fn="gelu-approximate", attention_type="default",
                 norm_elementwise_affine=False, dropout=0.0)  # fmt: skip
    for key, value in fixed.items():
        if c[key] != value:
            raise ValueError(f"config {key}={c[key]!r} is not PixArt-alpha's (our PixArt has {key}={value!r})")
    heads, hidden = c["num_attention_heads"], c["num_attention_heads"] * c["attention_head_dim"]
    if c["cross_attention_dim"] is None:
        raise ValueError("config cross_attention_dim=None (no cross-attention) is not supported: PixArt needs one")
    if c["caption_channels"] is not None and c["cross_attention_dim"] != hidden:
        raise ValueError(
            f"config cross_attention_dim={c['cross_attention_dim']} must equal the width num_attention_heads * "
            f"attention_head_dim = {hidden} when caption_channels is set (the projected caption has that width)"
        )
    in_ch = c["in_channels"]
    out_ch = in_ch if c["out_channels"] is None else c["out_channels"]
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"config out_channels={out_ch} must be in_channels ({in_ch}) or twice it (learned sigma)")
    size_conditioning = c["use_additional_conditions"]
    if size_conditioning is None:
        size_conditioning = c["sample_size"] == 128
    caption = c["caption_channels"] is not None
    return dict(
        sample_size=c["sample_size"],
        patch_size=c["patch_size"],
        in_channels=in_ch,
        hidden_size=hidden,
        depth=c["num_layers"],
        num_heads=heads,
        context_dim=c["caption_channels"] if caption else c["cross_attention_dim"],
        learn_sigma=out_ch == 2 * in_ch,
        caption_projection=caption,
        size_conditioning=bool(size_conditioning),
        interpolation_scale=c["interpolation_scale"],
        qkv_bias=bool(c["attention_bias"]),
        norm_eps=float(c["norm_eps"]),
    )


def from_diffusers(model: nn.Module) -> PixArt:
    """Our PixArt with a diffusers ``PixArtTransformer2DModel``'s settings and weights: the same outputs.

    Settings from ``model.config`` (``pixart_kwargs_from_diffusers``); every key and shape of the model's
    state dict is checked against that config before anything loads. The result has the model's dtype,
    device and train/eval mode. Call it ``ours(x, t, context=encoder_hidden_states,
    context_mask=encoder_attention_mask.bool(), resolution=..., aspect_ratio=...)``.
    """
    config = dict(model.config)
    weight = next(model.parameters())
    ours = build_empty(lambda: PixArt(**pixart_kwargs_from_diffusers(config)), weight)
    theirs = model.state_dict()
    expected = ours.to_diffusers_state_dict()
    check_layout(theirs, expected, "diffusers PixArtTransformer2DModel", target="this PixArt")
    ours.load_state_dict(convert_from_diffusers(theirs))
    return ours.train(model.training)


#################################################################################
#                               Diffusion denoisers                             #
#################################################################################


def pixart_vp_denoiser(model: PixArt, **kwargs: Any) -> VPEpsDenoiser:
    """EDM denoiser ``D(x, sigma, context=..., context_mask=...)`` around a DDPM eps-predicting PixArt.

    The released PixArt-alpha weights are VP epsilon predictors on DDPM's linear betas 1e-4 ... 0.02 over
    1000 steps (PixArt's IDDPM ``linear`` schedule; the diffusers pipeline's scheduler config), which is
    ``adaln.diffusion.VPEpsDenoiser``'s default schedule; with ``learn_sigma`` the first C channels are eps.
    Keyword arguments go to ``VPEpsDenoiser``; size conditions ride along as ``resolution=`` /
    ``aspect_ratio=`` condition keywords.
    """
    return VPEpsDenoiser(model, learned_sigma_channels=model.learn_sigma, **kwargs)
