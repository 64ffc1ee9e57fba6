"""Flux: double-stream then single-stream AdaLN transformer with 3-axis RoPE (Black Forest Labs, FLUX.1).

Matches diffusers' ``FluxTransformer2DModel`` (``transformer_flux.py``) output for output, built from our
layers, and black-forest-labs/flux ``src/flux/model.py`` / ``modules/layers.py`` (``Flux``,
``DoubleStreamBlock``, ``SingleStreamBlock``, ``LastLayer``), whose layout ours follows. The condition
``c = t_embedder(1000 t) [+ guidance_embedder(1000 guidance)] + y_embedder(pooled)`` drives every AdaLN
(diffusers ``CombinedTimestep[Guidance]TextProjEmbeddings``, BFL ``time_in``, ``guidance_in``, ``vector_in``).

Per double-stream block, on image tokens and text tokens, each stream with its own weights::

    (shift, scale, gate) x (attention, MLP) = AdaLNZero(c)             # LayerNorm eps 1e-6, no affine
    q, k, v = qkv(LN(x) * (1 + scale) + shift); q, k = RMSNorm(q), RMSNorm(k)    # per head, weighted
    o = softmax(rope(q) rope(k)^T / sqrt(d)) v  over [text; image] jointly
    x += gate * proj(o);  x += gate * mlp(LN(x) * (1 + scale) + shift)

Per single-stream block, on h = [text; image] with one set of weights (parallel attention and MLP)::

    (shift, scale, gate) = AdaLNZero(c, branches=1)                    # diffusers AdaLayerNormZeroSingle
    q, k, v, m = linear1(LN(h) * (1 + scale) + shift)
    h += gate * linear2([attention(q, k, v); gelu_tanh(m)])

then ``AdaLNContinuous`` + Linear on the image tokens. Latents ``x (B, C, H, W)`` are packed into 2x2
patches inside (``pack_latents``: FluxPipeline ``_pack_latents``, channels ordered (c, dy, dx)) and the
output unpacked (``_unpack_latents``); RoPE positions are built inside too (``flux_position_ids``: text
(0, 0, 0), image (0, row, col), as FluxPipeline ``_prepare_latent_image_ids`` and ``encode_prompt``).

Where we differ from diffusers (deliberately): fused ``qkv`` / ``linear1`` projections (BFL's layout;
diffusers splits them into ``to_q/to_k/to_v`` [+ ``proj_mlp``]); half-precision modulation, timestep
scaling and RoPE rotation run in fp32 (dtype policy); ``context_mask`` (optional, not in FluxPipeline)
masks padded text keys, as diffusers does when given ``joint_attention_kwargs={"attention_mask": ...}``.
Kept from diffusers: its fp16 clipping to +-65504 after each single block and of the text stream after
each double block (``FluxTransformerBlock``, ``FluxSingleTransformerBlock``).

Layouts: ``from_diffusers`` / ``Flux.to_diffusers_state_dict`` (diffusers), ``convert_flux_state_dict`` /
``Flux.to_flux_state_dict`` (BFL's original checkpoints, e.g. ``flux1-dev.safetensors``: key names of
black-forest-labs/flux ``modules/layers.py`` -- ``img_in``, ``txt_in``, ``time_in.in_layer``,
``vector_in``, ``guidance_in``, ``double_blocks.N.{img,txt}_mod.lin``, ``{img,txt}_attn.qkv``,
``{img,txt}_attn.norm.{query,key}_norm.scale``, ``{img,txt}_attn.proj``, ``{img,txt}_mlp.{0,2}``,
``single_blocks.N.{linear1,linear2,norm.*,modulation.lin}``, ``final_layer.{adaLN_modulation.1,linear}``;
the names diffusers' ``single_file_utils.py`` ``convert_flux_transformer_checkpoint_to_diffusers`` reads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaln.checks import check_int, compute_dtype
from adaln.models._inputs import check_features, check_latents, check_per_sample, check_placement, check_token_mask
from adaln.models._layout import block_count, build_empty, check_layout, check_state_dict
from adaln.models.conditioning import VectorEmbedder
from adaln.nn.adaln import (
    AdaLNContinuous,
    AdaLNZero,
    adaln_continuous_from_diffusers,
    adaln_continuous_to_diffusers,
)
from adaln.nn.attention import StreamAttention
from adaln.nn.embeddings import TimestepEmbedder
from adaln.nn.mlp import Mlp
from adaln.nn.rope import RopeFrequencies, RotaryEmbedding, apply_rope

__all__ = [
    "DoubleStreamBlock",
    "Flux",
    "SingleStreamBlock",
    "StreamAttention",
    "convert_flux_state_dict",
    "default_axes_dim",
    "flux_kwargs_from_diffusers",
    "flux_kwargs_from_flux_state_dict",
    "flux_position_ids",
    "from_diffusers",
    "pack_latents",
    "rope_attention",
    "unpack_latents",
]

FLUX_EPS = 1e-6  # every LayerNorm and q/k RMSNorm of Flux (BFL layers.py, diffusers transformer_flux.py)
FREQUENCY_DIM = 256  # Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0); BFL timestep_embedding(t, 256)
TIMESTEP_SCALE = 1000.0  # diffusers: timestep * 1000 and guidance * 1000 inside; BFL time_factor=1000
FP16_MAX = 65504.0  # largest finite float16: diffusers clips Flux activations to it
ROPE_THETA = 10000.0  # diffusers FluxPosEmbed(theta=10000); BFL FluxParams.theta=10_000


#################################################################################
#                  Latent packing and RoPE positions (FluxPipeline)             #
#################################################################################


def pack_latents(x: Tensor, patch_size: int = 2) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C * p * p) tokens, row-major, channels ordered (c, dy, dx).

    FluxPipeline ``_pack_latents`` for p = 2 (``view(B, C, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5)``).
    """
    b, c, hh, ww = x.shape
    p = patch_size
    x = x.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (hh // p) * (ww // p), c * p * p)


def unpack_latents(tokens: Tensor, h: int, w: int, patch_size: int = 2) -> Tensor:
    """(B, h * w, C * p * p) -> (B, C, h * p, w * p); the inverse of ``pack_latents`` (``_unpack_latents``)."""
    b, _, d = tokens.shape
    p = patch_size
    x = tokens.reshape(b, h, w, d // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // (p * p), h * p, w * p)


def flux_position_ids(text_len: int, h: int, w: int, *, device: torch.device | None = None) -> Tensor:
    """RoPE ids (text_len + h * w, 3) over (t, row, col): text tokens (0, 0, 0), image token n at
    (0, n // w, n % w); FluxPipeline ``encode_prompt`` (``text_ids`` zeros) and ``_prepare_latent_image_ids``."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    return torch.cat([image.new_zeros(text_len, 3), image])


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """Flux's (t, h, w) split of a head, (16, 56, 56) for head_dim 128, scaled: h = w = 7/16 of it
    rounded down to even, t the rest."""
    hw = head_dim * 7 // 16 // 2 * 2
    return head_dim - 2 * hw, hw, hw


#################################################################################
#                        Double-stream and single-stream blocks                 #
#################################################################################


def _clip_fp16(x: Tensor) -> Tensor:
    """diffusers' Flux blocks: float16 activations clipped to the finite range (inf -> +-65504)."""
    return x.clip(-FP16_MAX, FP16_MAX) if x.dtype == torch.float16 else x


def rope_attention(q: Tensor, k: Tensor, v: Tensor, freqs: RopeFrequencies, keep: Tensor | None) -> Tensor:
    """RoPE on q and k, then SDPA (scale head_dim ** -0.5). q, k, v (B, heads, N, d); keep None or
    (B, 1, 1, N) bool over the keys -> (B, N, heads * d)."""
    out = F.scaled_dot_product_attention(apply_rope(q, freqs), apply_rope(k, freqs), v, attn_mask=keep)
    return out.transpose(1, 2).flatten(2)


class DoubleStreamBlock(nn.Module):
    """Flux double-stream block (BFL ``DoubleStreamBlock``, diffusers ``FluxTransformerBlock``).

    forward(img (B, N, dim), txt (B, L, dim), c (B, dim), freqs (cos, sin) over the L + N tokens, keep
    None or (B, 1, 1, L + N) bool) -> (img, txt). Each stream: ``*_mod`` AdaLNZero (attention, MLP),
    ``*_attn`` StreamAttention, ``*_mlp`` tanh-GELU Mlp of width ``mlp_ratio * dim``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.img_mod = AdaLNZero(dim, dim, branches=2, eps=FLUX_EPS)
        self.img_attn = StreamAttention(dim, num_heads, qk_norm="rms")  # RMSNorm eps 1e-6 = FLUX_EPS
        self.img_mlp = Mlp(dim, hidden, act="gelu_tanh")
        self.txt_mod = AdaLNZero(dim, dim, branches=2, eps=FLUX_EPS)
        self.txt_attn = StreamAttention(dim, num_heads, qk_norm="rms")
        self.txt_mlp = Mlp(dim, hidden, act="gelu_tanh")

    def forward(
        self, img: Tensor, txt: Tensor, c: Tensor, freqs: RopeFrequencies, keep: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        img_mods, txt_mods = self.img_mod(c), self.txt_mod(c)
        (shift, scale, _), (t_shift, t_scale, _) = img_mods[0], txt_mods[0]
        qi, ki, vi = self.img_attn.heads(self.img_mod.modulate(img, shift, scale))
        qt, kt, vt = self.txt_attn.heads(self.txt_mod.modulate(txt, t_shift, t_scale))
        qkv = (torch.cat([qt, qi], dim=2), torch.cat([kt, ki], dim=2), torch.cat([vt, vi], dim=2))
        out = rope_attention(*qkv, freqs, keep)  # (B, L + N, dim), text first
        txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1] :]
        img = _post_attention(img, img_out, self.img_mod, self.img_attn, self.img_mlp, img_mods)
        txt = _post_attention(txt, txt_out, self.txt_mod, self.txt_attn, self.txt_mlp, txt_mods)
        return img, _clip_fp16(txt)


def _post_attention(x: Tensor, out: Tensor, ada: AdaLNZero, attn: StreamAttention, mlp: Mlp, mods: list) -> Tensor:
    """One stream's gated residuals: attention output, then the modulated MLP."""
    x = ada.residual(x, attn.proj(out), mods[0][2])
    shift, scale, gate = mods[1]
    return ada.residual(x, mlp(ada.modulate(x, shift, scale)), gate)


class SingleStreamBlock(nn.Module):
    """Flux single-stream block (BFL ``SingleStreamBlock``, diffusers ``FluxSingleTransformerBlock``).

    ``linear1`` gives ``[q; k; v; mlp_in]`` (widths dim, dim, dim, ``mlp_ratio * dim``), ``linear2`` maps
    ``[attention; gelu_tanh(mlp_in)]`` back to dim; ``modulation`` is AdaLNZero(branches=1).
    forward(h (B, L + N, dim), c (B, dim), freqs, keep) -> h.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.mlp_hidden = int(dim * mlp_ratio)
        self.modulation = AdaLNZero(dim, dim, branches=1, eps=FLUX_EPS)
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=FLUX_EPS)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=FLUX_EPS)
        self.act = nn.GELU(approximate="tanh")
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)

    def forward(self, h: Tensor, c: Tensor, freqs: RopeFrequencies, keep: Tensor | None = None) -> Tensor:
        ((shift, scale, gate),) = self.modulation(c)
        b, n = h.shape[:2]
        qkv, mlp = self.linear1(self.modulation.modulate(h, shift, scale)).split([3 * self.dim, self.mlp_hidden], -1)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = rope_attention(self.q_norm(q), self.k_norm(k), v, freqs, keep)
        h = self.modulation.residual(h, self.linear2(torch.cat([out, self.act(mlp)], dim=-1)), gate)
        return _clip_fp16(h)


#################################################################################
#                                    The model                                  #
#################################################################################


class Flux(nn.Module):
    """FLUX.1 transformer (diffusers ``FluxTransformer2DModel``; size defaults are FLUX.1's).

    forward(x (B, C, H, W), t (B,) or scalar: diffusers' ``timestep`` (FluxPipeline: sigma in [0, 1]),
    context (B, L, context_dim), pooled (B, pooled_dim), context_mask None or (B, L) bool (True = keep),
    guidance (B,) or scalar: the distilled guidance scale, required exactly when ``guidance_embeds``
    (FLUX.1-dev) -> (B, out_channels, H, W), the flow velocity ``noise - data`` (``velocity_sign = +1``).
    H and W must be multiples of ``patch_size`` (and equal ``sample_size`` when it is set).

    ``patch_size`` is the latent packing (FluxPipeline packs 2x2; diffusers' own ``patch_size`` config is
    then 1 and its ``in_channels`` is ours times 4). ``axes_dim``: RoPE widths over (t, h, w), summing to
    the head width (None: Flux's (16, 56, 56) split scaled to it, ``default_axes_dim``).

    Init (trainable from scratch, as DiT's ``initialize_weights``): Linears xavier-uniform with zero bias,
    timestep, guidance and pooled MLPs normal(0.02), q/k RMSNorm weights 1, every AdaLN projection zero
    (each block starts as the identity on both streams) and the output Linear zero.
    """

    velocity_sign = 1.0  # FlowMatchEulerDiscreteScheduler.step: x += (sigma_next - sigma) * output

    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        patch_size: int = 2,
        in_channels: int = 16,
        out_channels: int | None = None,
        hidden_size: int = 3072,
        depth: int = 19,
        depth_single_blocks: int = 38,
        num_heads: int = 24,
        context_dim: int = 4096,
        pooled_dim: int = 768,
        *,
        guidance_embeds: bool = False,
        axes_dim: Sequence[int] | None = None,
        theta: float = ROPE_THETA,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        sizes = dict(patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size, num_heads=num_heads,
                     context_dim=context_dim, pooled_dim=pooled_dim)  # fmt: skip
        for name, v in sizes.items():
            check_int(v, name)
        check_int(depth, "depth", minimum=0)
        check_int(depth_single_blocks, "depth_single_blocks", minimum=0)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        head_dim = hidden_size // num_heads
        axes = default_axes_dim(head_dim) if axes_dim is None else tuple(axes_dim)
        if sum(axes) != head_dim or len(axes) != 3:
            raise ValueError(f"axes_dim must be 3 widths (t, h, w) summing to the head width {head_dim}, got {axes}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
        self.input_size = None if sample_size is None else _pair(sample_size, patch_size)
        self.patch_size, self.in_channels = patch_size, in_channels
        self.out_channels = in_channels if out_channels is None else check_int(out_channels, "out_channels")
        self.hidden_size, self.depth, self.depth_single_blocks = hidden_size, depth, depth_single_blocks
        self.num_heads, self.context_dim, self.pooled_dim = num_heads, context_dim, pooled_dim
        self.guidance_embeds, self.mlp_ratio = bool(guidance_embeds), float(mlp_ratio)

        self.rope = RotaryEmbedding(axes, theta)
        self.x_embedder = nn.Linear(in_channels * patch_size**2, hidden_size)  # = a stride-p conv on (c, dy, dx)
        self.t_embedder = TimestepEmbedder(hidden_size, FREQUENCY_DIM, freq_shift=0)
        self.guidance_embedder = TimestepEmbedder(hidden_size, FREQUENCY_DIM) if guidance_embeds else None
        self.y_embedder = VectorEmbedder(pooled_dim, hidden_size, dropout_prob=0.0)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth_single_blocks)
        )
        self.final_norm = AdaLNContinuous(hidden_size, hidden_size, eps=FLUX_EPS)
        self.final_linear = nn.Linear(hidden_size, patch_size**2 * self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's ``initialize_weights`` carried to both streams (later steps overwrite earlier ones)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        embedders = [self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.y_embedder.linear_1, self.y_embedder.linear_2]
        if self.guidance_embedder is not None:
            embedders += [self.guidance_embedder.mlp[0], self.guidance_embedder.mlp[2]]
        for linear in embedders:
            nn.init.normal_(linear.weight, std=0.02)
        # adaLN-Zero on both streams, the single blocks and the final norm: every block starts as the identity.
        for module in self.modules():
            if isinstance(module, (AdaLNZero, AdaLNContinuous)):
                nn.init.zeros_(module.proj[1].weight)
                nn.init.zeros_(module.proj[1].bias)
        # Zero output layer: the network predicts 0 at init.
        nn.init.zeros_(self.final_linear.weight)
        nn.init.zeros_(self.final_linear.bias)

    def flow_timestep(self, sigma: Tensor) -> Tensor:
        """The ``timestep`` FluxPipeline passes at noise level sigma: sigma itself (it passes ``t / 1000``
        with the scheduler's ``t = 1000 * sigma``; the transformer multiplies by 1000 again)."""
        return sigma

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        context: Tensor | None = None,
        pooled: Tensor | None = None,
        context_mask: Tensor | None = None,
        guidance: Tensor | float | None = None,
    ) -> Tensor:
        t, guidance = self._check_inputs(x, t, context, pooled, context_mask, guidance)
        b, p = x.shape[0], self.patch_size
        h, w, text_len = x.shape[2] // p, x.shape[3] // p, context.shape[1]
        ct = compute_dtype(x.dtype)  # 1000 * t in fp32 for half inputs (diffusers: in the model's dtype)
        c = self.t_embedder(t.to(ct) * TIMESTEP_SCALE)  # (B, D)
        if self.guidance_embedder is not None:
            c = c + self.guidance_embedder(guidance.to(ct) * TIMESTEP_SCALE)
        c = c + self.y_embedder(pooled)
        img = self.x_embedder(pack_latents(x, p))  # (B, N, D)
        txt = self.context_embedder(context)  # (B, L, D)
        freqs = self.rope(flux_position_ids(text_len, h, w, device=x.device), dtype=ct)
        keep = None
        if context_mask is not None:
            keep = torch.cat([context_mask, context_mask.new_ones(b, h * w)], dim=1)[:, None, None]
        for block in self.double_blocks:
            img, txt = block(img, txt, c, freqs, keep)
        tokens = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            tokens = block(tokens, c, freqs, keep)
        out = self.final_linear(self.final_norm(tokens[:, text_len:], c))
        return unpack_latents(out, h, w, p)  # (B, out_channels, H, W)

    def _check_inputs(
        self, x: object, t: object, context: object, pooled: object, context_mask: object, guidance: object
    ) -> tuple[Tensor, Tensor | None]:
        """Every argument against the calling convention; returns t and guidance as (B,)."""
        c = self.in_channels
        b, _, _ = check_latents(x, c, self.patch_size)
        if self.input_size is not None and tuple(x.shape[2:]) != self.input_size:
            sh, sw = self.input_size
            raise ValueError(f"x must have shape (B, {c}, {sh}, {sw}), got {tuple(x.shape)}")
        t = check_per_sample(t, "t", b, x.device)
        if self.guidance_embeds and guidance is None:
            raise ValueError(f"guidance is required: this Flux has guidance_embeds (FLUX.1-dev); expected ({b},)")
        if not self.guidance_embeds and guidance is not None:
            raise ValueError("guidance must be None: this Flux has no guidance embedding (guidance_embeds=False)")
        guidance = None if guidance is None else check_per_sample(guidance, "guidance", b, x.device)
        context = check_features(context, "context", b, self.context_dim, tokens=True, min_length=0)
        pooled = check_features(pooled, "pooled", b, self.pooled_dim, tokens=False)
        context_mask = check_token_mask(context_mask, context)
        check_placement(self.x_embedder.weight, x, t=t, context=context, pooled=pooled, context_mask=context_mask,
                        guidance=guidance)  # fmt: skip
        return t, guidance

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, patch_size={self.patch_size}, in_channels={self.in_channels}, "
            f"out_channels={self.out_channels}, hidden_size={self.hidden_size}, depth={self.depth}, "
            f"depth_single_blocks={self.depth_single_blocks}, num_heads={self.num_heads}, "
            f"context_dim={self.context_dim}, pooled_dim={self.pooled_dim}, guidance_embeds={self.guidance_embeds}"
        )

    # ---- checkpoint layouts ------------------------------------------------------------------------

    def diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments of diffusers' ``FluxTransformer2DModel`` of this size (``to_diffusers_state_dict``).

        diffusers receives packed tokens: its ``in_channels`` / ``out_channels`` are ours times
        ``patch_size ** 2`` and its ``patch_size`` is 1. Its MLP ratio (4) and RoPE base (10000) are fixed.
        """
        if self.mlp_ratio != 4.0 or self.rope.theta != ROPE_THETA:
            raise ValueError(
                f"diffusers' FluxTransformer2DModel has mlp_ratio 4 and RoPE theta {ROPE_THETA:g} only; this Flux "
                f"has mlp_ratio {self.mlp_ratio} and theta {self.rope.theta}"
            )
        p2 = self.patch_size**2
        return dict(
            patch_size=1,
            in_channels=self.in_channels * p2,
            out_channels=self.out_channels * p2,
            num_layers=self.depth,
            num_single_layers=self.depth_single_blocks,
            attention_head_dim=self.hidden_size // self.num_heads,
            num_attention_heads=self.num_heads,
            joint_attention_dim=self.context_dim,
            pooled_projection_dim=self.pooled_dim,
            guidance_embeds=self.guidance_embeds,
            axes_dims_rope=self.rope.axes_dim,
        )

    def to_diffusers_state_dict(self) -> dict[str, Tensor]:
        """This model's weights in diffusers' ``FluxTransformer2DModel`` layout (``diffusers_config()``)."""
        return _export(self.state_dict(), _diffusers_table(self._structure()), "Flux")

    def load_diffusers_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a ``FluxTransformer2DModel`` state dict; every key and shape is checked before loading."""
        check_layout(state_dict, self.to_diffusers_state_dict(), "diffusers FluxTransformer2DModel", target="this Flux")
        self.load_state_dict(_import(state_dict, _diffusers_table(self._structure())))

    def to_flux_state_dict(self) -> dict[str, Tensor]:
        """This model's weights in BFL's original layout (black-forest-labs/flux ``model.py`` ``Flux``)."""
        return _export(self.state_dict(), _flux_table(self._structure()), "Flux")

    def load_flux_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load an original BFL state dict (a ``model.diffusion_model.`` prefix is accepted); every key
        and shape is checked before loading."""
        sd = _strip_prefix(state_dict)
        check_layout(sd, self.to_flux_state_dict(), "original Flux (black-forest-labs)", target="this Flux")
        self.load_state_dict(convert_flux_state_dict(state_dict))

    def _structure(self) -> tuple[int, int, bool]:
        return self.depth, self.depth_single_blocks, self.guidance_embeds


def _pair(size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size)
    if len(hw) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 or s % patch_size for s in hw):
        raise ValueError(f"sample_size must be an int or (H, W), multiples of patch_size {patch_size}: {size!r}")
    return hw


#################################################################################
#                        Converters: diffusers and BFL layouts                  #
#################################################################################

# FluxTransformer2DModel.__init__'s defaults (diffusers models/transformers/transformer_flux.py).
_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip
_PIPELINE_PATCH = 2  # FluxPipeline packs 2x2 latent patches (_pack_latents) before the transformer


def flux_kwargs_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """``Flux`` keyword arguments for a diffusers ``FluxTransformer2DModel`` config (missing keys: its defaults).

    The packing is FluxPipeline's 2x2, so ``in_channels`` (and ``out_channels``) must be multiples of 4
    and diffusers' ``patch_size`` 1; otherwise ``ValueError`` naming the key.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (a diffusers model's .config), got {type(config).__name__}")
    c = {**_DIFFUSERS_DEFAULTS, **config}
    p2 = _PIPELINE_PATCH**2
    if c["patch_size"] != 1:
        raise ValueError(f"config patch_size={c['patch_size']} is not supported: FluxPipeline packs 2x2 and uses 1")
    out = c["in_channels"] if c["out_channels"] is None else c["out_channels"]
    for key, v in (("in_channels", c["in_channels"]), ("out_channels", out)):
        if v % p2:
            raise ValueError(f"config {key}={v} must be a multiple of 4 (2x2-packed latent channels)")
    return dict(
        sample_size=None,
        patch_size=_PIPELINE_PATCH,
        in_channels=c["in_channels"] // p2,
        out_channels=out // p2,
        hidden_size=c["num_attention_heads"] * c["attention_head_dim"],
        depth=c["num_layers"],
        depth_single_blocks=c["num_single_layers"],
        num_heads=c["num_attention_heads"],
        context_dim=c["joint_attention_dim"],
        pooled_dim=c["pooled_projection_dim"],
        guidance_embeds=bool(c["guidance_embeds"]),
        axes_dim=tuple(c["axes_dims_rope"]),
    )


def from_diffusers(model: nn.Module) -> Flux:
    """Our Flux with a diffusers ``FluxTransformer2DModel``'s settings and weights: the same outputs.

    Config from ``model.config``; the state dict is checked key by key and shape by shape against it
    before anything loads. The result takes the model's dtype, device and train/eval mode. Call it
    ``ours(latents, timestep, context, pooled, guidance=...)`` with the unpacked latents; it packs them
    and builds ``img_ids`` / ``txt_ids`` itself. The class is recognised by name (diffusers not imported).
    """
    if "FluxTransformer2DModel" not in {cls.__name__ for cls in type(model).__mro__}:
        raise TypeError(f"from_diffusers expects a diffusers FluxTransformer2DModel, got {type(model).__name__}")
    weight = next(model.parameters())
    ours = build_empty(lambda: Flux(**flux_kwargs_from_diffusers(dict(model.config))), weight)
    ours.load_diffusers_state_dict(model.state_dict())
    return ours.train(model.training)


# A table row: (kind, our key prefix, their key prefixes, (our suffix, their suffix) pairs). Kinds:
#   "param"  one tensor per suffix, copied
#   "fused"  our fused Linear <-> several Linears (row blocks of the in-width each, the last takes the rest)
#   "cont"   AdaLNContinuous (shift, scale) <-> diffusers AdaLayerNormContinuous (scale, shift)
_LINEAR = (("weight", "weight"), ("bias", "bias"))
_NORM = (("weight", "weight"),)
_BFL_NORM = (("weight", "scale"),)  # BFL RMSNorm keeps its weight as ``scale``
_Row = tuple[str, str, tuple[str, ...], tuple[tuple[str, str], ...]]


def _embedder_rows(guidance: bool, names: Mapping[str, str]) -> list[_Row]:
    ours = ["x_embedder", "context_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.linear_1",
            "y_embedder.linear_2"]  # fmt: skip
    ours += ["guidance_embedder.mlp.0", "guidance_embedder.mlp.2"] if guidance else []
    return [("param", k, (names[k],), _LINEAR) for k in ours]


def _diffusers_table(s: tuple[int, int, bool]) -> list[_Row]:
    """Rows for diffusers' ``FluxTransformer2DModel``."""
    depth, single, guidance = s
    tte = "time_text_embed."
    rows = _embedder_rows(guidance, {
        "x_embedder": "x_embedder", "context_embedder": "context_embedder",
        "t_embedder.mlp.0": tte + "timestep_embedder.linear_1", "t_embedder.mlp.2": tte + "timestep_embedder.linear_2",
        "y_embedder.linear_1": tte + "text_embedder.linear_1", "y_embedder.linear_2": tte + "text_embedder.linear_2",
        "guidance_embedder.mlp.0": tte + "guidance_embedder.linear_1",
        "guidance_embedder.mlp.2": tte + "guidance_embedder.linear_2",
    })  # fmt: skip
    for i in range(depth):
        o, d = f"double_blocks.{i}.", f"transformer_blocks.{i}.attn."
        b = f"transformer_blocks.{i}."
        rows += [
            ("param", o + "img_mod.proj.1", (b + "norm1.linear",), _LINEAR),
            ("param", o + "txt_mod.proj.1", (b + "norm1_context.linear",), _LINEAR),
            ("fused", o + "img_attn.qkv", (d + "to_q", d + "to_k", d + "to_v"), _LINEAR),
            ("fused", o + "txt_attn.qkv", (d + "add_q_proj", d + "add_k_proj", d + "add_v_proj"), _LINEAR),
            ("param", o + "img_attn.q_norm", (d + "norm_q",), _NORM),
            ("param", o + "img_attn.k_norm", (d + "norm_k",), _NORM),
            ("param", o + "txt_attn.q_norm", (d + "norm_added_q",), _NORM),
            ("param", o + "txt_attn.k_norm", (d + "norm_added_k",), _NORM),
            ("param", o + "img_attn.proj", (d + "to_out.0",), _LINEAR),
            ("param", o + "txt_attn.proj", (d + "to_add_out",), _LINEAR),
            ("param", o + "img_mlp.fc1", (b + "ff.net.0.proj",), _LINEAR),
            ("param", o + "img_mlp.fc2", (b + "ff.net.2",), _LINEAR),
            ("param", o + "txt_mlp.fc1", (b + "ff_context.net.0.proj",), _LINEAR),
            ("param", o + "txt_mlp.fc2", (b + "ff_context.net.2",), _LINEAR),
        ]
    for i in range(single):
        o, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        rows += [
            ("param", o + "modulation.proj.1", (b + "norm.linear",), _LINEAR),
            ("fused", o + "linear1", (b + "attn.to_q", b + "attn.to_k", b + "attn.to_v", b + "proj_mlp"), _LINEAR),
            ("param", o + "q_norm", (b + "attn.norm_q",), _NORM),
            ("param", o + "k_norm", (b + "attn.norm_k",), _NORM),
            ("param", o + "linear2", (b + "proj_out",), _LINEAR),
        ]
    return rows + [
        ("cont", "final_norm.proj.1", ("norm_out.linear",), _LINEAR),
        ("param", "final_linear", ("proj_out",), _LINEAR),
    ]


def _flux_table(s: tuple[int, int, bool]) -> list[_Row]:
    """Rows for BFL's ``Flux`` (layers.py): a renaming; its ``LastLayer`` chunks (shift, scale) as ours."""
    depth, single, guidance = s
    rows = _embedder_rows(guidance, {
        "x_embedder": "img_in", "context_embedder": "txt_in", "t_embedder.mlp.0": "time_in.in_layer",
        "t_embedder.mlp.2": "time_in.out_layer", "y_embedder.linear_1": "vector_in.in_layer",
        "y_embedder.linear_2": "vector_in.out_layer", "guidance_embedder.mlp.0": "guidance_in.in_layer",
        "guidance_embedder.mlp.2": "guidance_in.out_layer",
    })  # fmt: skip
    for i in range(depth):
        p = f"double_blocks.{i}."
        for s_ in ("img", "txt"):
            rows += [
                ("param", p + f"{s_}_mod.proj.1", (p + f"{s_}_mod.lin",), _LINEAR),
                ("param", p + f"{s_}_attn.qkv", (p + f"{s_}_attn.qkv",), _LINEAR),
                ("param", p + f"{s_}_attn.q_norm", (p + f"{s_}_attn.norm.query_norm",), _BFL_NORM),
                ("param", p + f"{s_}_attn.k_norm", (p + f"{s_}_attn.norm.key_norm",), _BFL_NORM),
                ("param", p + f"{s_}_attn.proj", (p + f"{s_}_attn.proj",), _LINEAR),
                ("param", p + f"{s_}_mlp.fc1", (p + f"{s_}_mlp.0",), _LINEAR),
                ("param", p + f"{s_}_mlp.fc2", (p + f"{s_}_mlp.2",), _LINEAR),
            ]
    for i in range(single):
        p = f"single_blocks.{i}."
        rows += [
            ("param", p + "modulation.proj.1", (p + "modulation.lin",), _LINEAR),
            ("param", p + "linear1", (p + "linear1",), _LINEAR),
            ("param", p + "q_norm", (p + "norm.query_norm",), _BFL_NORM),
            ("param", p + "k_norm", (p + "norm.key_norm",), _BFL_NORM),
            ("param", p + "linear2", (p + "linear2",), _LINEAR),
        ]
    return rows + [
        ("param", "final_norm.proj.1", ("final_layer.adaLN_modulation.1",), _LINEAR),
        ("param", "final_linear", ("final_layer.linear",), _LINEAR),
    ]


def _fused_sizes(rows: int, in_width: int, parts: int) -> list[int]:
    """Row blocks of a fused Linear: ``parts - 1`` blocks of the in-width (q, k, v), the last the rest."""
    return [in_width] * (parts - 1) + [rows - in_width * (parts - 1)]


def _export(sd: Mapping[str, Tensor], table: list[_Row], source: str) -> dict[str, Tensor]:
    """Our state dict -> the table's layout. Every one of our keys must be used."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for kind, ours, theirs, suffixes in table:
        for our_suffix, their_suffix in suffixes:
            key = f"{ours}.{our_suffix}"
            if key not in sd:
                raise ValueError(f"{source} state dict lacks {key!r}")
            used.add(key)
            v = sd[key]
            if kind == "fused":
                sizes = _fused_sizes(v.shape[0], sd[f"{ours}.weight"].shape[1], len(theirs))
                out.update({f"{name}.{their_suffix}": part for name, part in zip(theirs, v.split(sizes, dim=0))})
            elif kind == "cont":
                (converted,) = adaln_continuous_to_diffusers({f"proj.1.{our_suffix}": v}).values()
                out[f"{theirs[0]}.{their_suffix}"] = converted
            else:
                out[f"{theirs[0]}.{their_suffix}"] = v
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"{source} state dict has keys no layout row covers: {unused}")
    return out


def _import(sd: Mapping[str, Tensor], table: list[_Row]) -> dict[str, Tensor]:
    """The table's layout -> our state dict (keys and shapes already checked by ``check_layout``)."""
    out: dict[str, Tensor] = {}
    for kind, ours, theirs, suffixes in table:
        for our_suffix, their_suffix in suffixes:
            parts = [sd[f"{name}.{their_suffix}"] for name in theirs]
            if kind == "fused":
                out[f"{ours}.{our_suffix}"] = torch.cat(parts, dim=0)
            elif kind == "cont":
                (converted,) = adaln_continuous_from_diffusers({f"linear.{their_suffix}": parts[0]}).values()
                out[f"{ours}.{our_suffix}"] = converted
            else:
                out[f"{ours}.{our_suffix}"] = parts[0]
    return out


_BFL_PREFIX = "model.diffusion_model."  # single-file checkpoints (and ComfyUI) nest the transformer under it


def _strip_prefix(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    check_state_dict(sd)
    return {k.removeprefix(_BFL_PREFIX): v for k, v in sd.items()}


def _bfl_structure(sd: Mapping[str, Tensor]) -> tuple[int, int, bool]:
    return block_count(sd, "double_blocks"), block_count(sd, "single_blocks"), "guidance_in.in_layer.weight" in sd


def flux_kwargs_from_flux_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """``Flux`` keyword arguments that fit an original BFL state dict (sizes read from its shapes).

    Block counts from ``double_blocks.N`` / ``single_blocks.N``, the guidance embedding from
    ``guidance_in``, the head width from the q-norm ``scale`` (so the head count), the MLP ratio from
    ``img_mlp.0`` or ``linear2``. ``axes_dim`` is not stored: Flux's split of the head (``default_axes_dim``;
    (16, 56, 56) for FLUX.1's heads of 128).
    """
    sd = _strip_prefix(state_dict)
    depth, single, guidance = _bfl_structure(sd)
    anchors = ["img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight"]
    norm = "double_blocks.0.img_attn.norm.query_norm.scale" if depth else "single_blocks.0.norm.query_norm.scale"
    missing = [k for k in (*anchors, norm) if not isinstance(sd.get(k), Tensor)]
    if missing:
        raise ValueError(f"cannot read Flux sizes from the state dict: missing {missing}")
    hidden, in_packed = sd["img_in.weight"].shape
    head_dim = sd[norm].shape[0]
    if depth:
        mlp_hidden = sd["double_blocks.0.img_mlp.0.weight"].shape[0]
    else:
        mlp_hidden = sd["single_blocks.0.linear2.weight"].shape[1] - hidden
    p2 = _PIPELINE_PATCH**2
    return dict(
        patch_size=_PIPELINE_PATCH,
        in_channels=in_packed // p2,
        out_channels=sd["final_layer.linear.weight"].shape[0] // p2,
        hidden_size=hidden,
        depth=depth,
        depth_single_blocks=single,
        num_heads=hidden // head_dim,
        context_dim=sd["txt_in.weight"].shape[1],
        pooled_dim=sd["vector_in.in_layer.weight"].shape[1],
        guidance_embeds=guidance,
        mlp_ratio=mlp_hidden / hidden,
    )


def convert_flux_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BFL's original Flux state dict (black-forest-labs/flux ``model.py`` keys) -> ours.

    The structure is read from the keys (block counts, ``guidance_in``); an optional
    ``model.diffusion_model.`` prefix is removed. A missing or unexpected key is a ``ValueError`` naming
    it. Load the result with ``Flux.load_state_dict`` (or use ``Flux.load_flux_state_dict``, which also
    checks the shapes; ``flux_kwargs_from_flux_state_dict`` sizes a model for it).
    """
    sd = _strip_prefix(state_dict)
    table = _flux_table(_bfl_structure(sd))
    expected = [f"{name}.{theirs}" for _, _, names, suffixes in table for name in names for _, theirs in suffixes]
    missing = [k for k in expected if k not in sd]
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"original Flux state dict: missing keys {missing}; unexpected keys {unexpected}")
    return _import(sd, table)
