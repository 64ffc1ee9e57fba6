"""MMDiT: the dual-stream transformer of Stable Diffusion 3 / 3.5 (Esser et al. 2024), and its converters.

Matches diffusers' ``SD3Transformer2DModel`` (``transformer_sd3.py``) output for output, built from our
layers. The image tokens ``x`` and the text tokens ``context`` each have their own AdaLN, projections
and MLP; they meet in one joint attention over the concatenated sequences. The condition ``c`` =
timestep embedding + pooled-text embedding (diffusers ``CombinedTimestepTextProjEmbeddings``) drives
every AdaLN. Per joint block (diffusers ``JointTransformerBlock``, Stability's ``JointBlock``)::

    (shift, scale, gate) per branch = AdaLNZero(c)                    # one per stream
    qkv_x = qkv(LN(x) * (1 + scale) + shift), qkv_ctx likewise
    o_x, o_ctx = softmax(q k^T / sqrt(d)) v  over [x; context] jointly
    x += gate * proj(o_x)
    x += gate2 * attn2(LN(x_in) * (1 + scale2) + shift2)              # SD3.5 dual-attention blocks
    x += gate_mlp * mlp(LN(x) * (1 + scale_mlp) + shift_mlp); context likewise

The last block is ``context_pre_only``: its context stream only feeds keys and values to the image
stream (``AdaLNContinuous``, no output projection, no MLP). Then ``AdaLNContinuous`` + Linear and
unpatchify. SD3.5 adds per-head RMSNorm on q and k (``qk_norm="rms"``) and, in ``dual_attention_layers``,
a second self-attention on the image stream whose modulation is the 9-chunk ``SD35AdaLayerNormZeroX``:
our ``AdaLNZero(branches=3)`` in forward order (attention, attention 2, MLP); diffusers and Stability
chunk it (attention, MLP, attention 2) and the converters reorder it.

Where we differ from diffusers (deliberately): the fused ``qkv`` projection of Stability's file (diffusers
splits it into ``to_q/to_k/to_v``); in the last block the context's queries are not computed (their
outputs are discarded in SD3 too), so its context ``q_norm`` gets no gradient (zero in diffusers);
half-precision modulation runs in fp32 (dtype policy). diffusers' SD3 blocks do not clip fp16
activations (its Flux blocks do; ``JointTransformerBlock`` and ``JointAttnProcessor2_0`` have no clip),
so ours do not either. Key order in the joint attention is diffusers' [x; context] (Stability's file
concatenates [context; x]: the same attention up to float summation order).

Layouts: ``from_diffusers`` / ``MMDiT.to_diffusers_state_dict`` (diffusers), ``convert_sd3_state_dict`` /
``MMDiT.to_sd3_state_dict`` (Stability's original checkpoints: key names of ``mmditx.py`` in
Stability-AI/sd3.5 -- ``joint_blocks.N.{x_block,context_block}.{adaLN_modulation.1, attn.qkv, attn.proj,
attn.ln_q, attn.ln_k, attn2.*, mlp.fc1, mlp.fc2}``, ``x_embedder``, ``t_embedder``, ``y_embedder``,
``context_embedder``, ``pos_embed``, ``final_layer``; the same names diffusers' ``single_file_utils.py``
``convert_sd3_transformer_checkpoint_to_diffusers`` reads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaln.checks import check_int
from adaln.models._inputs import (
    check_features,
    check_latents,
    check_per_sample,
    check_placement,
    check_unused,
)
from adaln.models._layout import block_count, build_empty, check_layout
from adaln.models.conditioning import VectorEmbedder
from adaln.nn.adaln import (
    AdaLNContinuous,
    AdaLNZero,
    adaln_continuous_from_diffusers,
    adaln_continuous_to_diffusers,
)
from adaln.nn.attention import QK_NORMS, Attention, StreamAttention
from adaln.nn.embeddings import PatchEmbed, TimestepEmbedder
from adaln.nn.mlp import Mlp

__all__ = [
    "JointBlock",
    "MMDiT",
    "StreamAttention",
    "StreamBlock",
    "convert_sd3_state_dict",
    "from_diffusers",
    "joint_attention",
    "mmdit_kwargs_from_diffusers",
    "mmdit_kwargs_from_sd3_state_dict",
    "sd3_pos_embed",
]

SD3_EPS = 1e-6  # every LayerNorm and qk-norm of SD3 (diffusers JointTransformerBlock, Stability mmditx.py)
SD3_TIMESTEP_SCALE = 1000.0  # FlowMatchEulerDiscreteScheduler: timesteps = sigmas * num_train_timesteps
MLP_RATIO = 4  # diffusers FeedForward(mult=4); Stability mlp_ratio=4.0
FREQUENCY_DIM = 256  # Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)


#################################################################################
#                       Positions: SD3's cropped sin-cos table                  #
#################################################################################


def sd3_pos_embed(embed_dim: int, max_size: int, base_size: int) -> Tensor:
    """SD3's fixed sin-cos table (max_size * max_size, embed_dim), float32, row-major positions.

    diffusers ``PatchEmbed(pos_embed_max_size=...)`` / ``get_2d_sincos_pos_embed(grid_size=max_size,
    base_size=sample_size // patch_size)``: positions ``arange(max_size) * base_size / max_size`` (a
    float32 grid, as diffusers), MAE sin-cos per axis in float64, first half of the channels the column
    (w) coordinate, second half the row (h) -- DiT's table on a rescaled grid.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 (sin and cos per axis), got {embed_dim}")
    pos = torch.arange(max_size, dtype=torch.float32) / (max_size / base_size)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))

    def sincos(p: Tensor) -> Tensor:
        out = p.reshape(-1).double()[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([sincos(cols), sincos(rows)], dim=1).float()


#################################################################################
#                               Joint transformer block                         #
#################################################################################


def joint_attention(
    x_qkv: tuple[Tensor, Tensor, Tensor], c_qkv: tuple[Tensor | None, Tensor, Tensor]
) -> tuple[Tensor, Tensor | None]:
    """SDPA over the concatenated keys [x; context] (diffusers ``JointAttnProcessor2_0``'s order).

    Each argument is (q, k, v) of shape (B, heads, N|M, head_dim); a None context q means only the
    image queries are needed (the pre-only block). Returns (B, N, dim) and (B, M, dim) or None.
    """
    (qx, kx, vx), (qc, kc, vc) = x_qkv, c_qkv
    n = qx.shape[2]
    q = qx if qc is None else torch.cat([qx, qc], dim=2)
    out = F.scaled_dot_product_attention(q, torch.cat([kx, kc], dim=2), torch.cat([vx, vc], dim=2))
    out = out.transpose(1, 2).flatten(2)  # (B, N [+ M], dim)
    return out[:, :n], (None if qc is None else out[:, n:])


class StreamBlock(nn.Module):
    """One stream's half of a joint block (Stability ``DismantledBlock``): its AdaLN, attention
    projections, optional second self-attention (SD3.5 ``x_block_self_attn``) and MLP.

    ``pre_only`` (the context stream of the last block): ``AdaLNContinuous`` (shift, scale) and no
    output projection or MLP. Otherwise ``AdaLNZero`` with branches (attention, [attention 2,] MLP),
    LayerNorm eps 1e-6 without affine, tanh-GELU MLP of width 4 * dim.
    """

    def __init__(
        self, dim: int, num_heads: int, *, qk_norm: str | None, pre_only: bool = False, dual_attention: bool = False
    ) -> None:
        super().__init__()
        if pre_only and dual_attention:
            raise ValueError("a pre-only stream has no second attention (dual_attention needs an output)")
        self.dim, self.pre_only, self.dual_attention = dim, pre_only, dual_attention
        if pre_only:
            self.adaLN_modulation = AdaLNContinuous(dim, dim, eps=SD3_EPS)
        else:
            self.adaLN_modulation = AdaLNZero(dim, dim, branches=3 if dual_attention else 2, eps=SD3_EPS)
        self.attn = StreamAttention(dim, num_heads, qk_norm=qk_norm, pre_only=pre_only)
        self.attn2 = Attention(dim, num_heads, qk_norm=qk_norm) if dual_attention else None
        self.mlp = None if pre_only else Mlp(dim, MLP_RATIO * dim, act="gelu_tanh")

    def pre_attention(
        self, x: Tensor, c: Tensor, *, queries: bool = True
    ) -> tuple[tuple[Tensor | None, Tensor, Tensor], list | None]:
        """(q, k, v) of the modulated tokens, and the modulation the post-attention step needs."""
        ada = self.adaLN_modulation
        if self.pre_only:
            return self.attn.heads(ada(x, c), queries=queries), None
        mods = ada(c)
        shift, scale, _ = mods[0]
        return self.attn.heads(ada.modulate(x, shift, scale), queries=queries), mods

    def post_attention(self, x: Tensor, attn_out: Tensor, mods: list) -> Tensor:
        """Gated residuals of the attention output, [attention 2,] and the MLP. x, attn_out (B, N, dim)."""
        ada = self.adaLN_modulation
        x_in = x
        x = ada.residual(x, self.attn.proj(attn_out), mods[0][2])
        if self.dual_attention:
            shift2, scale2, gate2 = mods[1]
            x = ada.residual(x, self.attn2(ada.modulate(x_in, shift2, scale2)), gate2)
        shift, scale, gate = mods[-1]
        return ada.residual(x, self.mlp(ada.modulate(x, shift, scale)), gate)


class JointBlock(nn.Module):
    """An MMDiT block: ``context_block`` and ``x_block`` (each a ``StreamBlock``) joined by one attention.

    diffusers ``JointTransformerBlock`` / Stability ``JointBlock`` + ``block_mixing``.
    forward(x (B, N, dim), context (B, M, dim), c (B, dim)) -> (x, context), context None when
    ``context_pre_only``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        context_pre_only: bool = False,
        qk_norm: str | None = None,
        dual_attention: bool = False,
    ) -> None:
        super().__init__()
        self.context_pre_only = context_pre_only
        self.context_block = StreamBlock(dim, num_heads, qk_norm=qk_norm, pre_only=context_pre_only)
        self.x_block = StreamBlock(dim, num_heads, qk_norm=qk_norm, dual_attention=dual_attention)

    def forward(self, x: Tensor, context: Tensor, c: Tensor) -> tuple[Tensor, Tensor | None]:
        x_qkv, x_mods = self.x_block.pre_attention(x, c)
        # the pre-only context's outputs are discarded, so its queries are never needed
        c_qkv, c_mods = self.context_block.pre_attention(context, c, queries=not self.context_pre_only)
        x_out, c_out = joint_attention(x_qkv, c_qkv)
        x = self.x_block.post_attention(x, x_out, x_mods)
        if self.context_pre_only:
            return x, None
        return x, self.context_block.post_attention(context, c_out, c_mods)


#################################################################################
#                                    The model                                  #
#################################################################################


class MMDiT(nn.Module):
    """SD3 / SD3.5 MMDiT (diffusers ``SD3Transformer2DModel``; defaults are its defaults).

    forward(x (B, C, H, W), t (B,) or scalar: diffusers' ``timestep`` (SD3: 1000 * sigma),
    context (B, L, context_dim), pooled (B, pooled_dim), *, skip_layers=None) -> (B, out_channels, H, W),
    the flow velocity ``noise - data`` (``velocity_sign = +1``). H / patch_size and W / patch_size may
    be anything up to ``pos_embed_max_size``: the centre of the position table is cropped (SD3's
    ``cropped_pos_embed``). ``skip_layers``: indices of joint blocks to skip (SD3.5 skip-layer guidance,
    diffusers' ``skip_layers``). ``sample_size`` only sets the position table's scale
    (``base_size = sample_size // patch_size``).

    Init (trainable from scratch, as DiT's ``initialize_weights``): Linears xavier-uniform with zero
    bias, timestep and pooled-text MLPs normal(0.02), every AdaLN projection zero (each block starts as
    the identity on both streams) and the output Linear zero.
    """

    velocity_sign = 1.0  # diffusers FlowMatchEulerDiscreteScheduler.step: x += (sigma_next - sigma) * output

    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        out_channels: int | None = None,
        hidden_size: int = 1152,
        depth: int = 18,
        num_heads: int = 18,
        context_dim: int = 4096,
        pooled_dim: int = 2048,
        pos_embed_max_size: int = 96,
        *,
        qk_norm: str | None = None,
        dual_attention_layers: Sequence[int] = (),
    ) -> None:
        super().__init__()
        for name, v in (("sample_size", sample_size), ("patch_size", patch_size), ("in_channels", in_channels),
                        ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads),
                        ("context_dim", context_dim), ("pooled_dim", pooled_dim),
                        ("pos_embed_max_size", pos_embed_max_size)):  # fmt: skip
            check_int(v, name)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
        dual = tuple(dual_attention_layers)
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth for i in dual):
            raise ValueError(
                f"dual_attention_layers must be block indices in [0, {depth}), got {dual_attention_layers!r}"
            )
        dual = tuple(sorted(set(dual)))
        base = sample_size // patch_size
        if not 1 <= base <= pos_embed_max_size:
            raise ValueError(
                f"sample_size // patch_size = {base} must be in [1, pos_embed_max_size={pos_embed_max_size}]"
            )
        self.sample_size, self.patch_size, self.in_channels = sample_size, patch_size, in_channels
        self.out_channels = in_channels if out_channels is None else check_int(out_channels, "out_channels")
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.context_dim, self.pooled_dim, self.pos_embed_max_size = context_dim, pooled_dim, pos_embed_max_size
        self.qk_norm, self.dual_attention_layers = qk_norm, dual

        self.x_embedder = PatchEmbed(None, patch_size, in_channels, hidden_size)
        self.register_buffer("pos_embed", sd3_pos_embed(hidden_size, pos_embed_max_size, base)[None])
        self.t_embedder = TimestepEmbedder(hidden_size, FREQUENCY_DIM, freq_shift=0)
        self.y_embedder = VectorEmbedder(pooled_dim, hidden_size, dropout_prob=0.0)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        self.joint_blocks = nn.ModuleList(
            JointBlock(hidden_size, num_heads, context_pre_only=i == depth - 1, qk_norm=qk_norm,
                       dual_attention=i in dual)
            for i in range(depth)
        )  # fmt: skip
        self.final_norm = AdaLNContinuous(hidden_size, hidden_size, eps=SD3_EPS)
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's ``initialize_weights`` carried to both streams (later steps overwrite earlier ones)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.x_embedder.reset_parameters()
        for linear in (*self.t_embedder.mlp[::2], self.y_embedder.linear_1, self.y_embedder.linear_2):
            nn.init.normal_(linear.weight, std=0.02)
        # adaLN-Zero on both streams and the final norm: shift = scale = gate = 0, blocks start as identity.
        for module in self.modules():
            if isinstance(module, (AdaLNZero, AdaLNContinuous)):
                nn.init.zeros_(module.proj[1].weight)
                nn.init.zeros_(module.proj[1].bias)
        # Zero output layer: the network predicts 0 at init.
        nn.init.zeros_(self.final_linear.weight)
        nn.init.zeros_(self.final_linear.bias)

    def flow_timestep(self, sigma: Tensor) -> Tensor:
        """The ``timestep`` diffusers' SD3 pipeline passes at noise level sigma: ``1000 * sigma``
        (``FlowMatchEulerDiscreteScheduler``, ``num_train_timesteps=1000``)."""
        return SD3_TIMESTEP_SCALE * sigma

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        """The centre (h, w) crop of the position table as (1, h * w, hidden) (SD3 ``cropped_pos_embed``)."""
        m = self.pos_embed_max_size
        top, left = (m - h) // 2, (m - w) // 2
        table = self.pos_embed.reshape(1, m, m, self.hidden_size)
        return table[:, top : top + h, left : left + w].reshape(1, h * w, self.hidden_size)

    def unpatchify(self, x: Tensor, h: int, w: int) -> Tensor:
        """(B, h * w, p * p * C_out) tokens -> (B, C_out, h * p, w * p)."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        context: Tensor | None = None,
        pooled: Tensor | None = None,
        context_mask: Tensor | None = None,
        guidance: Tensor | None = None,
        *,
        skip_layers: Sequence[int] | None = None,
    ) -> Tensor:
        """x (B, C, H, W), t (B,) or scalar, context (B, L, context_dim), pooled (B, pooled_dim) -> (B, C_out, H, W)."""
        t, skip = self._check_inputs(x, t, context, pooled, context_mask, guidance, skip_layers)
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.x_embedder(x) + self.cropped_pos_embed(h, w).to(x.dtype)  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(pooled)  # (B, D)
        ctx = self.context_embedder(context)  # (B, L, D)
        for i, block in enumerate(self.joint_blocks):
            if i not in skip:
                tokens, ctx = block(tokens, ctx, c)
        return self.unpatchify(self.final_linear(self.final_norm(tokens, c)), h, w)

    def _check_inputs(
        self,
        x: object,
        t: object,
        context: object,
        pooled: object,
        context_mask: object,
        guidance: object,
        skip_layers: object,
    ) -> tuple[Tensor, frozenset[int]]:
        """Every argument against the calling convention; returns t as (B,) and the blocks to skip."""
        check_unused("SD3's MMDiT", " (its joint attention is unmasked)", context_mask=context_mask, guidance=guidance)
        b, h, w = check_latents(x, self.in_channels, self.patch_size)
        m = self.pos_embed_max_size
        if not (h <= m and w <= m):
            raise ValueError(
                f"x's H and W must be at most pos_embed_max_size={m} patches each (<= {m * self.patch_size}), "
                f"got {tuple(x.shape[2:])}"
            )
        t = check_per_sample(t, "t", b, x.device)
        context = check_features(context, "context", b, self.context_dim, tokens=True, min_length=0)
        pooled = check_features(pooled, "pooled", b, self.pooled_dim, tokens=False)
        check_placement(self.x_embedder.proj.weight, x, t=t, context=context, pooled=pooled)
        if skip_layers is None:
            return t, frozenset()
        if isinstance(skip_layers, (str, bytes)) or not isinstance(skip_layers, Sequence):
            raise TypeError(f"skip_layers must be a sequence of block indices, got {type(skip_layers).__name__}")
        bad = [i for i in skip_layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"skip_layers must hold block indices in [0, {self.depth}), got {list(skip_layers)}")
        return t, frozenset(skip_layers)

    def extra_repr(self) -> str:
        return (
            f"sample_size={self.sample_size}, patch_size={self.patch_size}, in_channels={self.in_channels}, "
            f"out_channels={self.out_channels}, hidden_size={self.hidden_size}, depth={self.depth}, "
            f"num_heads={self.num_heads}, context_dim={self.context_dim}, pooled_dim={self.pooled_dim}, "
            f"pos_embed_max_size={self.pos_embed_max_size}, qk_norm={self.qk_norm!r}, "
            f"dual_attention_layers={self.dual_attention_layers}"
        )

    # ---- checkpoint layouts ------------------------------------------------------------------------

    def diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments of diffusers' ``SD3Transformer2DModel`` of this size (``to_diffusers_state_dict``)."""
        return dict(
            sample_size=self.sample_size,
            patch_size=self.patch_size,
            in_channels=self.in_channels,
            num_layers=self.depth,
            attention_head_dim=self.hidden_size // self.num_heads,
            num_attention_heads=self.num_heads,
            joint_attention_dim=self.context_dim,
            caption_projection_dim=self.hidden_size,
            pooled_projection_dim=self.pooled_dim,
            out_channels=self.out_channels,
            pos_embed_max_size=self.pos_embed_max_size,
            dual_attention_layers=self.dual_attention_layers,
            qk_norm={None: None, "rms": "rms_norm", "layer": "layer_norm"}[self.qk_norm],
        )

    def to_diffusers_state_dict(self) -> dict[str, Tensor]:
        """This model's weights in diffusers' ``SD3Transformer2DModel`` layout (``diffusers_config()``)."""
        return _export(self.state_dict(), _diffusers_table(self._structure()), "MMDiT")

    def load_diffusers_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load an ``SD3Transformer2DModel`` state dict; every key and shape is checked before loading."""
        table = _diffusers_table(self._structure())
        check_layout(state_dict, self.to_diffusers_state_dict(), "diffusers SD3Transformer2DModel", target="this MMDiT")
        self.load_state_dict(_import(state_dict, table))

    def to_sd3_state_dict(self) -> dict[str, Tensor]:
        """This model's weights in Stability's original SD3 layout (``mmditx.py`` ``MMDiTX`` key names)."""
        return _export(self.state_dict(), _sd3_table(self._structure()), "MMDiT")

    def load_sd3_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load an original SD3 / SD3.5 state dict (a ``model.diffusion_model.`` prefix is accepted)."""
        sd = _strip_prefix(state_dict)
        check_layout(sd, self.to_sd3_state_dict(), "original SD3 (mmditx.py)", target="this MMDiT")
        self.load_state_dict(convert_sd3_state_dict(state_dict))

    def _structure(self) -> _Structure:
        return _Structure(self.depth, self.dual_attention_layers, self.qk_norm)


#################################################################################
#                        Converters: diffusers and Stability layouts            #
#################################################################################

# SD3Transformer2DModel.__init__'s defaults (diffusers models/transformers/transformer_sd3.py).
_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=18, attention_head_dim=64, num_attention_heads=18,
    joint_attention_dim=4096, caption_projection_dim=1152, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=96, dual_attention_layers=(), qk_norm=None,
)  # fmt: skip
_DIFFUSERS_QK_NORMS = {None: None, "rms_norm": "rms", "layer_norm": "layer"}


def mmdit_kwargs_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """``MMDiT`` keyword arguments for a diffusers ``SD3Transformer2DModel`` config (missing keys: its defaults).

    Configs ours cannot express raise ``ValueError`` naming the key: a ``caption_projection_dim`` other
    than the hidden size (diffusers' blocks need the two equal too), ``pos_embed_max_size=None``, a
    ``qk_norm`` other than None / ``"rms_norm"`` / ``"layer_norm"``.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (a diffusers model's .config), got {type(config).__name__}")
    c = {**_DIFFUSERS_DEFAULTS, **config}
    hidden = c["num_attention_heads"] * c["attention_head_dim"]
    if c["caption_projection_dim"] != hidden:
        raise ValueError(
            f"config caption_projection_dim={c['caption_projection_dim']} must equal num_attention_heads * "
            f"attention_head_dim = {hidden} (the joint blocks take context tokens of the hidden width)"
        )
    if c["pos_embed_max_size"] is None:
        raise ValueError("config pos_embed_max_size=None is not SD3's cropped position table; MMDiT needs an int")
    if c["qk_norm"] not in _DIFFUSERS_QK_NORMS:
        raise ValueError(
            f"config qk_norm={c['qk_norm']!r} is not supported; expected one of {list(_DIFFUSERS_QK_NORMS)}"
        )
    return dict(
        sample_size=c["sample_size"],
        patch_size=c["patch_size"],
        in_channels=c["in_channels"],
        out_channels=c["in_channels"] if c["out_channels"] is None else c["out_channels"],
        hidden_size=hidden,
        depth=c["num_layers"],
        num_heads=c["num_attention_heads"],
        context_dim=c["joint_attention_dim"],
        pooled_dim=c["pooled_projection_dim"],
        pos_embed_max_size=c["pos_embed_max_size"],
        qk_norm=_DIFFUSERS_QK_NORMS[c["qk_norm"]],
        dual_attention_layers=tuple(c["dual_attention_layers"]),
    )


def from_diffusers(model: nn.Module) -> MMDiT:
    """Our MMDiT with a diffusers ``SD3Transformer2DModel``'s settings and weights: the same outputs.

    Config from ``model.config``; the state dict is checked key by key and shape by shape against it
    before anything loads. The result takes the model's dtype, device and train/eval mode. The class is
    recognised by name, so diffusers is not imported here.
    """
    if "SD3Transformer2DModel" not in {cls.__name__ for cls in type(model).__mro__}:
        raise TypeError(f"from_diffusers expects a diffusers SD3Transformer2DModel, got {type(model).__name__}")
    weight = next(model.parameters())
    ours = build_empty(lambda: MMDiT(**mmdit_kwargs_from_diffusers(dict(model.config))), weight)
    ours.load_diffusers_state_dict(model.state_dict())
    return ours.train(model.training)


class _Structure:
    """What a layout's key set depends on: depth, the dual-attention blocks and the qk-norm kind."""

    def __init__(self, depth: int, dual: Sequence[int], qk_norm: str | None) -> None:
        self.depth, self.dual, self.qk_norm = depth, frozenset(dual), qk_norm

    def norm_params(self) -> tuple[str, ...]:
        return {None: (), "rms": ("weight",), "layer": ("weight", "bias")}[self.qk_norm]


# A table row: (kind, our key prefix, their key prefixes, parameter suffixes). Kinds:
#   "param"  one tensor per suffix, copied (weight, bias; a norm's weight [, bias]; a buffer: suffix "")
#   "qkv"    our fused [q; k; v] Linear <-> three Linears (rows split in thirds)
#   "x9"     AdaLNZero(branches=3): ours (attn, attn2, mlp) <-> theirs (attn, mlp, attn2) row blocks
#   "cont"   AdaLNContinuous (shift, scale) <-> diffusers AdaLayerNormContinuous (scale, shift)
_LINEAR = ("weight", "bias")


def _diffusers_table(s: _Structure) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    """(kind, ours, theirs, suffixes) rows for diffusers' ``SD3Transformer2DModel``."""
    rows = [
        ("param", "pos_embed", ("pos_embed.pos_embed",), ("",)),
        ("param", "x_embedder.proj", ("pos_embed.proj",), _LINEAR),
        ("param", "t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), _LINEAR),
        ("param", "t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), _LINEAR),
        ("param", "y_embedder.linear_1", ("time_text_embed.text_embedder.linear_1",), _LINEAR),
        ("param", "y_embedder.linear_2", ("time_text_embed.text_embedder.linear_2",), _LINEAR),
        ("param", "context_embedder", ("context_embedder",), _LINEAR),
    ]
    qk = s.norm_params()
    for i in range(s.depth):
        ours, theirs, last = f"joint_blocks.{i}.", f"transformer_blocks.{i}.", i == s.depth - 1
        x, ctx = ours + "x_block.", ours + "context_block."
        x_ada = "x9" if i in s.dual else "param"
        rows += [
            (x_ada, x + "adaLN_modulation.proj.1", (theirs + "norm1.linear",), _LINEAR),
            ("cont" if last else "param", ctx + "adaLN_modulation.proj.1", (theirs + "norm1_context.linear",), _LINEAR),
            ("qkv", x + "attn.qkv", tuple(theirs + f"attn.to_{n}" for n in "qkv"), _LINEAR),
            ("qkv", ctx + "attn.qkv", tuple(theirs + f"attn.add_{n}_proj" for n in "qkv"), _LINEAR),
            ("param", x + "attn.proj", (theirs + "attn.to_out.0",), _LINEAR),
            ("param", x + "mlp.fc1", (theirs + "ff.net.0.proj",), _LINEAR),
            ("param", x + "mlp.fc2", (theirs + "ff.net.2",), _LINEAR),
        ]
        if qk:
            rows += [
                ("param", x + "attn.q_norm", (theirs + "attn.norm_q",), qk),
                ("param", x + "attn.k_norm", (theirs + "attn.norm_k",), qk),
                ("param", ctx + "attn.q_norm", (theirs + "attn.norm_added_q",), qk),
                ("param", ctx + "attn.k_norm", (theirs + "attn.norm_added_k",), qk),
            ]
        if not last:
            rows += [
                ("param", ctx + "attn.proj", (theirs + "attn.to_add_out",), _LINEAR),
                ("param", ctx + "mlp.fc1", (theirs + "ff_context.net.0.proj",), _LINEAR),
                ("param", ctx + "mlp.fc2", (theirs + "ff_context.net.2",), _LINEAR),
            ]
        if i in s.dual:
            rows += [
                ("qkv", x + "attn2.qkv", tuple(theirs + f"attn2.to_{n}" for n in "qkv"), _LINEAR),
                ("param", x + "attn2.proj", (theirs + "attn2.to_out.0",), _LINEAR),
            ]
            if qk:
                rows += [
                    ("param", x + "attn2.q_norm", (theirs + "attn2.norm_q",), qk),
                    ("param", x + "attn2.k_norm", (theirs + "attn2.norm_k",), qk),
                ]
    rows += [
        ("cont", "final_norm.proj.1", ("norm_out.linear",), _LINEAR),
        ("param", "final_linear", ("proj_out",), _LINEAR),
    ]
    return rows


def _sd3_table(s: _Structure) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    """Rows for Stability's ``MMDiTX`` (mmditx.py). Its adaLN Linears chunk (shift, scale[, gate]) as
    ours, its pre-only ones (shift, scale) too; only the 9-chunk dual modulation needs reordering."""
    rows = [
        ("param", "pos_embed", ("pos_embed",), ("",)),
        ("param", "x_embedder.proj", ("x_embedder.proj",), _LINEAR),
        ("param", "t_embedder.mlp.0", ("t_embedder.mlp.0",), _LINEAR),
        ("param", "t_embedder.mlp.2", ("t_embedder.mlp.2",), _LINEAR),
        ("param", "y_embedder.linear_1", ("y_embedder.mlp.0",), _LINEAR),
        ("param", "y_embedder.linear_2", ("y_embedder.mlp.2",), _LINEAR),
        ("param", "context_embedder", ("context_embedder",), _LINEAR),
    ]
    qk = s.norm_params()
    for i in range(s.depth):
        last = i == s.depth - 1
        for stream in ("x_block", "context_block"):
            p = f"joint_blocks.{i}.{stream}."
            pre_only = last and stream == "context_block"
            ada = "x9" if stream == "x_block" and i in s.dual else "param"
            rows += [
                (ada, p + "adaLN_modulation.proj.1", (p + "adaLN_modulation.1",), _LINEAR),
                ("param", p + "attn.qkv", (p + "attn.qkv",), _LINEAR),
            ]
            attns = ("attn", "attn2") if stream == "x_block" and i in s.dual else ("attn",)
            for a in attns:
                if qk:
                    rows += [
                        ("param", p + f"{a}.q_norm", (p + f"{a}.ln_q",), qk),
                        ("param", p + f"{a}.k_norm", (p + f"{a}.ln_k",), qk),
                    ]
                if not pre_only:
                    rows.append(("param", p + f"{a}.proj", (p + f"{a}.proj",), _LINEAR))
            if "attn2" in attns:
                rows.append(("param", p + "attn2.qkv", (p + "attn2.qkv",), _LINEAR))
            if not pre_only:
                rows += [("param", p + f"mlp.{fc}", (p + f"mlp.{fc}",), _LINEAR) for fc in ("fc1", "fc2")]
    rows += [
        ("param", "final_norm.proj.1", ("final_layer.adaLN_modulation.1",), _LINEAR),
        ("param", "final_linear", ("final_layer.linear",), _LINEAR),
    ]
    return rows


def _key(prefix: str, suffix: str) -> str:
    return f"{prefix}.{suffix}" if suffix else prefix


def _swap_branches(t: Tensor) -> Tensor:
    """Row blocks (a, b, c) -> (a, c, b): ours (attn, attn2, mlp) <-> SD3.5 (attn, mlp, attn2); self-inverse."""
    a, b, c = t.chunk(3, dim=0)
    return torch.cat([a, c, b], dim=0)


def _export(sd: Mapping[str, Tensor], table: list, source: str) -> dict[str, Tensor]:
    """Our state dict -> the table's layout. Every one of our keys must be used."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for kind, ours, theirs, suffixes in table:
        for suffix in suffixes:
            key = _key(ours, suffix)
            if key not in sd:
                raise ValueError(f"{source} state dict lacks {key!r}")
            used.add(key)
            v = sd[key]
            if kind == "qkv":
                out.update({_key(name, suffix): part for name, part in zip(theirs, v.chunk(3, dim=0))})
            elif kind == "x9":
                out[_key(theirs[0], suffix)] = _swap_branches(v)
            elif kind == "cont":
                (converted,) = adaln_continuous_to_diffusers({f"proj.1.{suffix}": v}).values()
                out[_key(theirs[0], suffix)] = converted
            else:
                out[_key(theirs[0], suffix)] = v
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"{source} state dict has keys no layout row covers: {unused}")
    return out


def _import(sd: Mapping[str, Tensor], table: list) -> dict[str, Tensor]:
    """The table's layout -> our state dict (keys and shapes already checked by ``check_layout``)."""
    out: dict[str, Tensor] = {}
    for kind, ours, theirs, suffixes in table:
        for suffix in suffixes:
            parts = [sd[_key(name, suffix)] for name in theirs]
            if kind == "qkv":
                out[_key(ours, suffix)] = torch.cat(parts, dim=0)
            elif kind == "x9":
                out[_key(ours, suffix)] = _swap_branches(parts[0])
            elif kind == "cont":
                (converted,) = adaln_continuous_from_diffusers({f"linear.{suffix}": parts[0]}).values()
                out[_key(ours, suffix)] = converted
            else:
                out[_key(ours, suffix)] = parts[0]
    return out


_SD3_PREFIX = "model.diffusion_model."  # full SD3 checkpoints (and ComfyUI) nest the MMDiT under it


def _strip_prefix(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if not isinstance(sd, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(sd).__name__}")
    return {k[len(_SD3_PREFIX):] if k.startswith(_SD3_PREFIX) else k: v for k, v in sd.items()}


def _sd3_structure(sd: Mapping[str, Tensor]) -> _Structure:
    """Depth from ``joint_blocks.N``, dual-attention blocks from ``x_block.attn2.qkv``, the qk norm from
    ``attn.ln_q`` (weight only: RMSNorm, with bias: LayerNorm) of an original SD3 state dict."""
    depth = block_count(sd, "joint_blocks", minimum=1)
    dual = [i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sd]
    qk_norm = None
    if "joint_blocks.0.x_block.attn.ln_q.weight" in sd:
        qk_norm = "layer" if "joint_blocks.0.x_block.attn.ln_q.bias" in sd else "rms"
    return _Structure(depth, dual, qk_norm)


SD3_HEAD_DIM = 64  # mmditx.py: hidden_size = 64 * depth with depth heads; SD3.5's q/k norms are 64 wide too


def mmdit_kwargs_from_sd3_state_dict(
    state_dict: Mapping[str, Tensor], *, sample_size: int = 128, head_dim: int | None = None
) -> dict[str, Any]:
    """``MMDiT`` keyword arguments that fit Stability's original SD3 / SD3.5 state dict (sizes from its shapes).

    Depth, dual-attention blocks and qk norm as ``convert_sd3_state_dict`` reads them; hidden width, input
    channels and patch size from ``x_embedder.proj.weight`` (D, C, p, p); the position table's side M from
    ``pos_embed`` (1, M * M, D); context and pooled widths from ``context_embedder`` and ``y_embedder.mlp.0``;
    output channels from ``final_layer.linear``. Heads: ``D / head width``, the head width read from
    ``attn.ln_q`` where there is a qk norm, else ``head_dim`` (default mmditx's 64; SD3's fused qkv does not
    store it). ``sample_size`` (the latent side of the
    training resolution: 128 for SD3 / SD3.5 at 1024 px) is not stored; it only scales a position table
    that the loaded ``pos_embed`` replaces, and travels with ``diffusers_config``.
    """
    sd = _strip_prefix(state_dict)
    s = _sd3_structure(sd)
    anchors = ["x_embedder.proj.weight", "pos_embed", "context_embedder.weight", "y_embedder.mlp.0.weight",
               "final_layer.linear.weight", "joint_blocks.0.x_block.mlp.fc1.weight"]  # fmt: skip
    missing = [k for k in anchors if not isinstance(sd.get(k), Tensor)]
    if missing:
        raise ValueError(f"cannot read MMDiT sizes from the state dict: missing {missing}")
    hidden, channels, p, _ = sd["x_embedder.proj.weight"].shape
    table = sd["pos_embed"].shape[1]
    side = round(table**0.5)
    if side * side != table:
        raise ValueError(f"pos_embed must hold a square M x M table, got {table} positions")
    head = sd["joint_blocks.0.x_block.attn.ln_q.weight"].shape[0] if s.qk_norm else head_dim or SD3_HEAD_DIM
    if hidden % head:
        raise ValueError(f"hidden width {hidden} is not a multiple of the head width {head}")
    mlp = sd["joint_blocks.0.x_block.mlp.fc1.weight"].shape[0]
    if mlp != MLP_RATIO * hidden:
        raise ValueError(f"MMDiT's MLP is {MLP_RATIO} x hidden = {MLP_RATIO * hidden} wide; this state dict's is {mlp}")
    return dict(
        sample_size=sample_size,
        patch_size=p,
        in_channels=channels,
        out_channels=sd["final_layer.linear.weight"].shape[0] // (p * p),
        hidden_size=hidden,
        depth=s.depth,
        num_heads=hidden // head,
        context_dim=sd["context_embedder.weight"].shape[1],
        pooled_dim=sd["y_embedder.mlp.0.weight"].shape[1],
        pos_embed_max_size=side,
        qk_norm=s.qk_norm,
        dual_attention_layers=tuple(sorted(s.dual)),
    )


def convert_sd3_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Stability's original SD3 / SD3.5 MMDiT state dict -> ours (keys of ``mmditx.py`` ``MMDiTX``).

    The structure is read from the keys: depth from ``joint_blocks.N``, dual-attention blocks from
    ``x_block.attn2.qkv``, the qk norm from ``attn.ln_q`` (weight only: RMSNorm, with bias: LayerNorm).
    Only MMDiT keys are read after an optional ``model.diffusion_model.`` prefix; text encoders or VAE
    weights of a full checkpoint must be left out. A missing or unexpected key is a ``ValueError``
    naming it. Load the result with ``MMDiT.load_state_dict`` (or use ``MMDiT.load_sd3_state_dict``;
    ``mmdit_kwargs_from_sd3_state_dict`` sizes a model for it).
    """
    sd = _strip_prefix(state_dict)
    table = _sd3_table(_sd3_structure(sd))
    expected = [_key(name, suffix) for _, _, theirs, suffixes in table for name in theirs for suffix in suffixes]
    missing = [k for k in expected if k not in sd]
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"original SD3 state dict: missing keys {missing}; unexpected keys {unexpected}")
    return _import(sd, table)
