"""Lumina 2: Lumina-Image 2.0's Next-DiT, a single-stream transformer over [caption; image] tokens.

Matches diffusers' ``Lumina2Transformer2DModel`` (``models/transformers/transformer_lumina2.py``) output for
output, built from our layers. Module and parameter names are Alpha-VLLM/Lumina-Image-2.0's own
(``models/model.py``: ``x_embedder``, ``t_embedder``, ``cap_embedder``, ``noise_refiner``, ``context_refiner``,
``layers.N.{attention.qkv, attention.out, attention.q_norm, attention.k_norm, attention_norm1,
attention_norm2, ffn_norm1, ffn_norm2, feed_forward.w1/w2/w3, adaLN_modulation}``, ``final_layer``); ours
differ only in ``adaLN_modulation.proj.1`` (theirs ``adaLN_modulation.1``). The computation::

    c = t_embedder(t)                                   # (B, min(D, 1024)), sinusoid cos-first
    cap = cap_embedder(context)                         # RMSNorm + Linear to D
    cap = context_refiner(cap, mask)                    # unmodulated blocks, caption tokens only
    img = noise_refiner(x_embedder(patches), c)         # modulated blocks, image tokens only
    h = layers([cap; img], mask, c)                     # modulated blocks, one joint attention
    out = final_layer(h_img, c)                         # LayerNorm * (1 + scale), Linear

A block (``NextDiTBlock``; diffusers ``Lumina2TransformerBlock`` with ``LuminaRMSNormZero``, our
``AdaLNZero(norm="rms", shift=False, gate="tanh")``) with sandwich norms::

    (scale_a, gate_a), (scale_m, gate_m) = Linear(SiLU(c))
    x = x + tanh(gate_a) * attention_norm2(attention(attention_norm1(x) * (1 + scale_a)))
    x = x + tanh(gate_m) * ffn_norm2(feed_forward(ffn_norm1(x) * (1 + scale_m)))

Attention is grouped-query (``num_kv_heads`` key/value heads) with per-head RMSNorm on q and k (eps 1e-5)
and 3-axis RoPE (``adaln.nn.rope``, interleaved pairs, base 10000): caption token j sits at (j, 0, 0), image
token (row, col) at (L_i, row, col), L_i the number of kept caption tokens of sample i (diffusers
``Lumina2RotaryPosEmbed``). The feed-forward is SwiGLU of width ``multiple_of``-rounded
``ffn_dim_multiplier * 4 D`` (diffusers ``LuminaFeedForward``).

Where we deliberately differ from diffusers: the batch keeps its padded shape (the caption slots, masked
where ``context_mask`` is False, then the image tokens) instead of packing each sample's kept tokens
and re-padding, so shapes never depend on the mask and ``torch.compile`` sees one graph; the attention
is the same, up to float summation order. A mask need not be a prefix: the kept tokens are moved to the
front in order (diffusers reads the first ``sum(mask)`` tokens whatever the mask says, the same for the
right-padded masks its pipeline makes). Padding never influences the output (its tokens are zeroed), and a
sample with no kept token gets an image-only sequence. RoPE angles are computed, not looked up, so
positions past ``axes_lens`` work (diffusers' tables end there); rotations run in float64 as diffusers'
complex128 ones do.

Flow convention (diffusers ``pipeline_lumina2.py``): the transformer gets ``t = 1 - sigma`` and the
pipeline negates its output before the scheduler step, i.e. the output is ``data - noise``
(``velocity_sign = -1``).

Layouts: ``from_diffusers`` / ``Lumina2.to_diffusers_state_dict`` (diffusers); ``convert_lumina2_state_dict``
/ ``Lumina2.to_lumina2_state_dict`` (Lumina-Image-2.0's ``NextDiT``, the key names diffusers'
``loaders/single_file_utils.py`` ``convert_lumina2_to_diffusers`` reads).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaln.checks import check_int
from adaln.models._layout import (
    Row,
    block_count,
    build_empty,
    check_layout,
    export_layout,
    import_layout,
    linear_rows,
    rename_key,
)
from adaln.models._next_dit import (
    caption_ids,
    cat_freqs,
    check_config,
    check_inputs,
    compact_captions,
    image_ids,
    patchify,
    unpatchify,
)
from adaln.nn.adaln import AdaLN, AdaLNZero
from adaln.nn.embeddings import TimestepEmbedder
from adaln.nn.mlp import SwiGLU
from adaln.nn.rope import RotaryEmbedding, apply_rope

__all__ = [
    "JointAttention",
    "Lumina2",
    "NextDiTBlock",
    "NextDiTFinalLayer",
    "compact_captions",
    "convert_lumina2_state_dict",
    "from_diffusers",
    "lumina2_kwargs_from_diffusers",
    "lumina2_kwargs_from_lumina2_state_dict",
    "lumina_ffn_dim",
    "patchify",
    "unpatchify",
]

LUMINA_EPS = 1e-5  # RMSNorms of the blocks and the caption embedder (the config's norm_eps)
QK_NORM_EPS = 1e-5  # per-head q/k RMSNorm (diffusers Attention(eps=1e-5); NextDiT's RMSNorm default)
FINAL_EPS = 1e-6  # final LayerNorm (diffusers LuminaLayerNormContinuous(eps=1e-6), NextDiT FinalLayer)
ROPE_THETA = 10000.0  # Lumina2RotaryPosEmbed(theta=10000)
FREQUENCY_DIM = 256  # Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
MAX_COND_DIM = 1024  # the timestep embedding (the AdaLN condition) is min(D, 1024) wide


#################################################################################
#                            Next-DiT block and final layer                     #
#################################################################################


def lumina_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU width: ``4 dim``, times ``ffn_dim_multiplier``, rounded up to ``multiple_of``
    (diffusers ``LuminaFeedForward(inner_dim=4 * dim)``)."""
    inner = 4 * dim
    if ffn_dim_multiplier is not None:
        inner = int(ffn_dim_multiplier * inner)
    return multiple_of * ((inner + multiple_of - 1) // multiple_of)


class JointAttention(nn.Module):
    """Grouped-query self-attention with per-head q/k RMSNorm and RoPE (NextDiT ``JointAttention``).

    ``qkv`` is laid out ``[q; k; v]`` with ``num_heads``, ``num_kv_heads``, ``num_kv_heads`` heads of
    ``head_dim`` (query head h reads key/value head ``h // (num_heads / num_kv_heads)``, NextDiT's
    ``repeat``); no biases. forward(x (B, N, dim), freqs (cos, sin) each (N | B, N, head_dim / 2),
    keep (B, N) bool key mask or None) -> (B, N, dim).
    """

    def __init__(
        self, dim: int, num_heads: int, num_kv_heads: int | None = None, *, qk_norm: bool = True,
        eps: float = QK_NORM_EPS,
    ) -> None:  # fmt: skip
        super().__init__()
        kv = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if kv < 1 or num_heads % kv:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({kv})")
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, kv, dim // num_heads
        self.split = (num_heads * self.head_dim, kv * self.head_dim, kv * self.head_dim)
        self.qkv = nn.Linear(dim, sum(self.split), bias=False)
        self.out = nn.Linear(num_heads * self.head_dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, freqs: tuple[Tensor, Tensor], keep: Tensor | None = None) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = apply_rope(self.q_norm(q.view(b, n, self.num_heads, self.head_dim)).transpose(1, 2), freqs)
        k = apply_rope(self.k_norm(k.view(b, n, self.num_kv_heads, self.head_dim)).transpose(1, 2), freqs)
        v = v.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        mask = None if keep is None else keep[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.out(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class NextDiTBlock(nn.Module):
    """Next-DiT block with sandwich RMSNorms; modulated by ``AdaLNZero(norm="rms", shift=False, gate="tanh")``
    when ``cond_dim`` is set, else plain (Lumina 2's context refiner).

    NextDiT ``JointTransformerBlock`` / diffusers ``Lumina2TransformerBlock`` (``activation="silu"``,
    ``cond_dim = min(D, 1024)``) and Z-Image's ``ZImageTransformerBlock`` (``activation=None``,
    ``cond_dim = min(D, 256)``). The pre-norms' weights (``attention_norm1``, ``ffn_norm1``) enter the
    modulation as the norm's own scale. forward(x (B, N, D), freqs, keep (B, N) bool or None, cond (B,
    cond_dim) or None) -> (B, N, D).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None,
        ffn_dim: int,
        *,
        norm_eps: float = LUMINA_EPS,
        qk_norm: bool = True,
        cond_dim: int | None = None,
        activation: str | None = "silu",
    ) -> None:
        super().__init__()
        self.attention = JointAttention(dim, num_heads, num_kv_heads, qk_norm=qk_norm)
        self.feed_forward = SwiGLU(dim, ffn_dim)
        self.attention_norm1 = nn.RMSNorm(dim, eps=norm_eps)
        self.attention_norm2 = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm1 = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm2 = nn.RMSNorm(dim, eps=norm_eps)
        self.adaLN_modulation = None
        if cond_dim is not None:
            self.adaLN_modulation = AdaLNZero(
                dim, cond_dim, norm="rms", shift=False, gate="tanh", eps=norm_eps, activation=activation
            )

    def forward(
        self, x: Tensor, freqs: tuple[Tensor, Tensor], keep: Tensor | None = None, cond: Tensor | None = None
    ) -> Tensor:
        ada = self.adaLN_modulation
        if ada is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), freqs, keep))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        (_, scale_msa, gate_msa), (_, scale_mlp, gate_mlp) = ada(cond)
        h = ada.modulate(x, None, scale_msa, weight=self.attention_norm1.weight)
        x = ada.residual(x, self.attention_norm2(self.attention(h, freqs, keep)), gate_msa)
        h = ada.modulate(x, None, scale_mlp, weight=self.ffn_norm1.weight)
        return ada.residual(x, self.ffn_norm2(self.feed_forward(h)), gate_mlp)


class NextDiTFinalLayer(nn.Module):
    """``linear(LN(x) * (1 + scale))`` with ``scale = Linear(SiLU(cond))``: scale only, LN without affine.

    NextDiT ``FinalLayer`` / diffusers ``LuminaLayerNormContinuous`` (Lumina 2) and Z-Image ``FinalLayer``:
    ``adaLN_modulation`` is our ``AdaLN(shift=False)``, eps 1e-6. x (B, N, D), cond (B, cond_dim) -> (B, N, out_dim).
    """

    def __init__(self, hidden_size: int, cond_dim: int, out_dim: int) -> None:
        super().__init__()
        self.adaLN_modulation = AdaLN(hidden_size, cond_dim, norm="layer", shift=False, eps=FINAL_EPS)
        self.linear = nn.Linear(hidden_size, out_dim)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return self.linear(self.adaLN_modulation(x, cond))


#################################################################################
#                                  The model                                    #
#################################################################################


class Lumina2(nn.Module):
    """Lumina 2 Next-DiT (diffusers ``Lumina2Transformer2DModel``; defaults are its defaults).

    forward(x (B, C, H, W), t (B,) or scalar: diffusers' ``timestep`` (``1 - sigma``), context (B, L,
    context_dim) caption features, context_mask (B, L) bool (True = keep) or None (all kept)) ->
    (B, out_channels, H, W), the pipeline's ``data - noise`` (``velocity_sign = -1``). H and W need only be
    multiples of ``patch_size``; ``pooled`` and ``guidance`` are not Lumina 2 inputs and must be None.

    ``num_kv_heads`` None means ``num_heads`` (plain multi-head attention); ``axes_dim`` (caption, row,
    column) must sum to the head width. ``sample_size`` and ``axes_lens`` only travel with the diffusers
    config (no position table is built from them). Init (trainable from scratch, NextDiT's): Linears
    xavier-uniform with zero bias, timestep MLP normal(0.02), caption Linear truncated normal(0.02), every
    AdaLN projection and the output Linear zero, so each modulated block starts as the identity
    (tanh(0) gates) and the network predicts 0.
    """

    velocity_sign = -1.0  # pipeline_lumina2.py: noise_pred = -noise_pred before FlowMatchEulerDiscreteScheduler.step

    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        out_channels: int | None = None,
        hidden_size: int = 2304,
        depth: int = 26,
        num_refiner_layers: int = 2,
        num_heads: int = 24,
        num_kv_heads: int | None = 8,
        context_dim: int = 1024,
        *,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        norm_eps: float = LUMINA_EPS,
        axes_dim: Sequence[int] = (32, 32, 32),
        axes_lens: Sequence[int] = (300, 512, 512),
    ) -> None:
        super().__init__()
        axes_dim = check_config(
            hidden_size, num_heads, num_refiner_layers, axes_dim, norm_eps, sample_size=sample_size,
            patch_size=patch_size, in_channels=in_channels, depth=depth, context_dim=context_dim,
            multiple_of=multiple_of,
        )
        axes_lens = tuple(axes_lens)
        self.sample_size, self.patch_size, self.in_channels = sample_size, patch_size, in_channels
        self.out_channels = in_channels if out_channels is None else check_int(out_channels, "out_channels")
        self.hidden_size, self.depth, self.num_refiner_layers = hidden_size, depth, num_refiner_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.context_dim, self.multiple_of, self.ffn_dim_multiplier = context_dim, multiple_of, ffn_dim_multiplier
        self.norm_eps, self.axes_dim, self.axes_lens = norm_eps, axes_dim, axes_lens
        self.cond_dim = min(hidden_size, MAX_COND_DIM)

        self.rope = RotaryEmbedding(axes_dim, ROPE_THETA)
        self.x_embedder = nn.Linear(patch_size * patch_size * in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(self.cond_dim, FREQUENCY_DIM, freq_shift=0)
        self.cap_embedder = nn.Sequential(nn.RMSNorm(context_dim, eps=norm_eps), nn.Linear(context_dim, hidden_size))
        ffn = lumina_ffn_dim(hidden_size, multiple_of, ffn_dim_multiplier)

        def blocks(n: int, modulated: bool) -> nn.ModuleList:
            cond = self.cond_dim if modulated else None
            return nn.ModuleList(
                NextDiTBlock(hidden_size, num_heads, self.num_kv_heads, ffn, norm_eps=norm_eps, cond_dim=cond)
                for _ in range(n)
            )

        self.noise_refiner = blocks(num_refiner_layers, True)
        self.context_refiner = blocks(num_refiner_layers, False)
        self.layers = blocks(depth, True)
        self.final_layer = NextDiTFinalLayer(hidden_size, self.cond_dim, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """NextDiT's init (Lumina-Image-2.0 ``models/model.py``); later steps overwrite earlier ones."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for linear in self.t_embedder.mlp[::2]:
            nn.init.normal_(linear.weight, std=0.02)
        nn.init.trunc_normal_(self.cap_embedder[1].weight, std=0.02)
        # adaLN-Zero: scale = gate = 0, so every modulated block starts as the identity (tanh(0) = 0).
        for module in self.modules():
            if isinstance(module, (AdaLNZero, AdaLN)):
                nn.init.zeros_(module.proj[1].weight)
                nn.init.zeros_(module.proj[1].bias)
        # Zero output layer: the network predicts 0 at init.
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def flow_timestep(self, sigma: Tensor) -> Tensor:
        """The ``timestep`` diffusers' Lumina 2 pipeline passes at noise level sigma: ``1 - sigma``
        (``current_timestep = 1 - t / num_train_timesteps``, t = 1000 sigma)."""
        return 1.0 - sigma

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        context: Tensor | None = None,
        pooled: Tensor | None = None,
        context_mask: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """x (B, C, H, W), t (B,), context (B, L, context_dim), context_mask (B, L) bool -> (B, C_out, H, W)."""
        t, mask = check_inputs(self, "Lumina 2", x, t, context, pooled, context_mask, guidance)
        b, p = x.shape[0], self.patch_size
        h, w = x.shape[2] // p, x.shape[3] // p
        length = context.shape[1]
        c = self.t_embedder(t)  # (B, min(D, 1024))
        tokens = self.x_embedder(patchify(x, p))  # (B, N, D)
        cap_ids = caption_ids(length, 0, x.device)  # caption token j at (j, 0, 0)
        if mask is None:
            cap_len = torch.full((b,), length, dtype=torch.long, device=x.device)
            refine_keep = joint_keep = None
        else:
            context, mask = compact_captions(context, mask)
            cap_len = mask.sum(dim=1)
            refine_keep = mask | ~mask.any(dim=1, keepdim=True)  # an empty caption attends to its padding
            joint_keep = torch.cat([mask, mask.new_ones(b, h * w)], dim=1)
        cap = self.cap_embedder(context)  # (B, L, D)
        cap_freqs = self.rope(cap_ids, dtype=torch.float64)  # float64, as diffusers' complex128 freqs_cis
        img_freqs = self.rope(image_ids(cap_len, h, w), dtype=torch.float64)  # (L_i, row, col)
        for block in self.context_refiner:
            cap = block(cap, cap_freqs, refine_keep)
        for block in self.noise_refiner:
            tokens = block(tokens, img_freqs, None, c)
        joint, freqs = torch.cat([cap, tokens], dim=1), cat_freqs(cap_freqs, img_freqs)
        for block in self.layers:
            joint = block(joint, freqs, joint_keep, c)
        out = self.final_layer(joint[:, length:], c)
        return unpatchify(out, h, w, p, self.out_channels)

    def extra_repr(self) -> str:
        return (
            f"patch_size={self.patch_size}, in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"hidden_size={self.hidden_size}, depth={self.depth}, num_refiner_layers={self.num_refiner_layers}, "
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, context_dim={self.context_dim}, "
            f"axes_dim={self.axes_dim}"
        )

    # ---- checkpoint layouts ------------------------------------------------------------------------

    def diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments of diffusers' ``Lumina2Transformer2DModel`` of this size and settings."""
        return dict(
            sample_size=self.sample_size,
            patch_size=self.patch_size,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            hidden_size=self.hidden_size,
            num_layers=self.depth,
            num_refiner_layers=self.num_refiner_layers,
            num_attention_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            multiple_of=self.multiple_of,
            ffn_dim_multiplier=self.ffn_dim_multiplier,
            norm_eps=self.norm_eps,
            axes_dim_rope=self.axes_dim,
            axes_lens=self.axes_lens,
            cap_feat_dim=self.context_dim,
        )

    def to_diffusers_state_dict(self) -> dict[str, Tensor]:
        """This model's weights in diffusers' ``Lumina2Transformer2DModel`` layout (``diffusers_config()``)."""
        return export_layout(self.state_dict(), self._diffusers_rows(), "Lumina2")

    def load_diffusers_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a ``Lumina2Transformer2DModel`` state dict; every key and shape is checked before loading."""
        check_layout(state_dict, self.to_diffusers_state_dict(), "diffusers Lumina2Transformer2DModel")
        self.load_state_dict(import_layout(state_dict, self._diffusers_rows()))

    def to_lumina2_state_dict(self) -> dict[str, Tensor]:
        """This model's weights with Lumina-Image-2.0's ``NextDiT`` key names, its unused top-level
        ``norm_final.weight`` included at its init value (ones) so ``NextDiT`` loads it strictly."""
        sd = {rename_key(k, _OURS_TO_LUMINA2): v for k, v in self.state_dict().items()}
        ref = self.x_embedder.weight
        sd[_LUMINA2_UNUSED] = torch.ones(self.hidden_size, dtype=ref.dtype, device=ref.device)
        return sd

    def load_lumina2_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a Lumina-Image-2.0 checkpoint (``convert_lumina2_state_dict``), every key and shape checked."""
        converted = convert_lumina2_state_dict(state_dict)
        lumina2_names = partial(rename_key, rules=_OURS_TO_LUMINA2)
        check_layout(converted, self.state_dict(), "Lumina-Image-2.0 NextDiT", rename=lumina2_names)
        self.load_state_dict(converted)

    def _diffusers_rows(self) -> list[Row]:
        rows: list[Row] = [
            ("x_embedder.weight", ("x_embedder.weight",), ()),
            ("x_embedder.bias", ("x_embedder.bias",), ()),
            ("cap_embedder.0.weight", ("time_caption_embed.caption_embedder.0.weight",), ()),
        ]
        rows += linear_rows("t_embedder.mlp.0", "time_caption_embed.timestep_embedder.linear_1")
        rows += linear_rows("t_embedder.mlp.2", "time_caption_embed.timestep_embedder.linear_2")
        rows += linear_rows("cap_embedder.1", "time_caption_embed.caption_embedder.1")
        split = self.layers[0].attention.split  # (q, k, v) rows of the fused projection
        for group, n, modulated in (("noise_refiner", self.num_refiner_layers, True),
                                    ("context_refiner", self.num_refiner_layers, False),
                                    ("layers", self.depth, True)):  # fmt: skip
            for i in range(n):
                p = f"{group}.{i}."
                rows += [
                    (p + "attention.qkv.weight", tuple(p + f"attn.to_{part}.weight" for part in "qkv"), split),
                    (p + "attention.out.weight", (p + "attn.to_out.0.weight",), ()),
                    (p + "attention.q_norm.weight", (p + "attn.norm_q.weight",), ()),
                    (p + "attention.k_norm.weight", (p + "attn.norm_k.weight",), ()),
                    (p + "attention_norm1.weight", (p + ("norm1.norm.weight" if modulated else "norm1.weight"),), ()),
                    (p + "attention_norm2.weight", (p + "norm2.weight",), ()),
                    (p + "ffn_norm1.weight", (p + "ffn_norm1.weight",), ()),
                    (p + "ffn_norm2.weight", (p + "ffn_norm2.weight",), ()),
                ]
                rows += [
                    (p + f"feed_forward.w{j}.weight", (p + f"feed_forward.linear_{j}.weight",), ()) for j in (1, 2, 3)
                ]
                if modulated:
                    rows += linear_rows(p + "adaLN_modulation.proj.1", p + "norm1.linear")
        rows += linear_rows("final_layer.adaLN_modulation.proj.1", "norm_out.linear_1")
        rows += linear_rows("final_layer.linear", "norm_out.linear_2")
        return rows


#################################################################################
#                        Lumina-Image-2.0 layout converter                      #
#################################################################################

# Lumina-Image-2.0 NextDiT keys = ours, but for the Sequential index of the AdaLN Linears.
_OURS_TO_LUMINA2 = ((r"adaLN_modulation\.proj\.1\.", "adaLN_modulation.1."),)
_LUMINA2_TO_OURS = ((r"adaLN_modulation\.1\.", "adaLN_modulation.proj.1."),)
_LUMINA2_UNUSED = "norm_final.weight"  # NextDiT builds an RMSNorm its forward never calls
_LUMINA2_PREFIX = "model.diffusion_model."  # ComfyUI checkpoints nest the model under it
_LUMINA2_KEY = re.compile(
    r"^(x_embedder\.(weight|bias)|t_embedder\.mlp\.[02]\.(weight|bias)|cap_embedder\.(0\.weight|1\.(weight|bias))"
    r"|final_layer\.(linear|adaLN_modulation\.1)\.(weight|bias)"
    r"|(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(qkv|out|q_norm|k_norm)\.weight"
    r"|(attention_norm[12]|ffn_norm[12])\.weight|feed_forward\.w[123]\.weight|adaLN_modulation\.1\.(weight|bias)))$"
)


def _strip_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict without an optional ``model.diffusion_model.`` prefix (``TypeError`` unless a mapping)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    return {k.removeprefix(_LUMINA2_PREFIX): v for k, v in state_dict.items()}


def convert_lumina2_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Lumina-Image-2.0 ``NextDiT`` state dict (Alpha-VLLM/Lumina-Image-2.0 ``models/model.py``, the layout
    diffusers' ``single_file_utils.py`` ``convert_lumina2_to_diffusers`` reads) -> ours.

    ``*.adaLN_modulation.1.*`` -> ``*.adaLN_modulation.proj.1.*``; every other weight keeps its name (the
    fused ``attention.qkv`` included). Dropped: an optional ``model.diffusion_model.`` prefix (ComfyUI) and
    ``norm_final.weight`` (unused by ``NextDiT.forward``). Any other key is a ``ValueError`` naming it.
    Load the result with ``Lumina2.load_state_dict`` (or use ``Lumina2.load_lumina2_state_dict``).
    """
    sd = _strip_prefix(state_dict)
    sd.pop(_LUMINA2_UNUSED, None)
    unknown = sorted(k for k in sd if not _LUMINA2_KEY.match(k))
    if unknown:
        raise ValueError(f"keys not in a Lumina-Image-2.0 NextDiT state dict: {unknown}")
    return {rename_key(k, _LUMINA2_TO_OURS): v for k, v in sd.items()}


def lumina2_kwargs_from_lumina2_state_dict(
    state_dict: Mapping[str, Tensor],
    *,
    patch_size: int = 2,
    multiple_of: int = 256,
    ffn_dim_multiplier: float | None = None,
    axes_dim: Sequence[int] | None = None,
    sample_size: int = 128,
) -> dict[str, Any]:
    """``Lumina2`` keyword arguments that fit a Lumina-Image-2.0 ``NextDiT`` state dict (sizes from its shapes).

    Read: the width and channels from ``x_embedder`` (D, p * p * C), depth and refiner counts from the block
    indices, the head width from ``attention.q_norm`` (so the head count) and the key/value heads from the
    fused ``attention.qkv`` rows, the caption width from ``cap_embedder.1``, output channels from
    ``final_layer.linear``. Not stored, so given (defaults: Lumina-Image-2.0's): ``patch_size``,
    ``multiple_of`` and ``ffn_dim_multiplier`` (checked against the stored SwiGLU width), ``axes_dim``
    (None: the head split in three equal even parts, Lumina 2's (32, 32, 32) for heads of 96) and
    ``sample_size``.
    """
    sd = _strip_prefix(state_dict)
    anchors = ["x_embedder.weight", "cap_embedder.1.weight", "final_layer.linear.weight",
               "layers.0.attention.q_norm.weight", "layers.0.attention.qkv.weight", "layers.0.feed_forward.w1.weight"]
    missing = [k for k in anchors if not isinstance(sd.get(k), Tensor)]
    if missing:
        raise ValueError(f"cannot read Lumina 2 sizes from the state dict: missing {missing}")
    hidden, patch_features = sd["x_embedder.weight"].shape
    p2 = patch_size * patch_size
    if patch_features % p2:
        raise ValueError(f"x_embedder's {patch_features} input features are not patch_size**2 = {p2} x channels")
    head = sd["layers.0.attention.q_norm.weight"].shape[0]
    heads = hidden // head
    kv = (sd["layers.0.attention.qkv.weight"].shape[0] // head - heads) // 2
    ffn = sd["layers.0.feed_forward.w1.weight"].shape[0]
    if ffn != lumina_ffn_dim(hidden, multiple_of, ffn_dim_multiplier):
        raise ValueError(
            f"the state dict's SwiGLU is {ffn} wide, but multiple_of={multiple_of} and ffn_dim_multiplier="
            f"{ffn_dim_multiplier} give {lumina_ffn_dim(hidden, multiple_of, ffn_dim_multiplier)}: pass the "
            "values the checkpoint was trained with"
        )
    if axes_dim is None:
        if head % 6:
            raise ValueError(f"heads of width {head} do not split into three equal even RoPE axes: pass axes_dim")
        axes_dim = (head // 3,) * 3
    refiners = block_count(sd, "noise_refiner")
    if block_count(sd, "context_refiner") != refiners:
        raise ValueError("noise_refiner and context_refiner must have the same number of blocks")
    return dict(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=patch_features // p2,
        out_channels=sd["final_layer.linear.weight"].shape[0] // p2,
        hidden_size=hidden,
        depth=block_count(sd, "layers"),
        num_refiner_layers=refiners,
        num_heads=heads,
        num_kv_heads=kv,
        context_dim=sd["cap_embedder.1.weight"].shape[1],
        multiple_of=multiple_of,
        ffn_dim_multiplier=ffn_dim_multiplier,
        axes_dim=tuple(axes_dim),
    )


# Lumina2Transformer2DModel.__init__'s defaults (diffusers models/transformers/transformer_lumina2.py).
_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=None, hidden_size=2304, num_layers=26,
    num_refiner_layers=2, num_attention_heads=24, num_kv_heads=8, multiple_of=256, ffn_dim_multiplier=None,
    norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=(32, 32, 32), axes_lens=(300, 512, 512), cap_feat_dim=1024,
)  # fmt: skip


def lumina2_kwargs_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """``Lumina2`` keyword arguments for a diffusers ``Lumina2Transformer2DModel`` config (missing keys: its
    defaults). ``scaling_factor`` is not read: diffusers' forward never uses it."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (a diffusers model's .config), got {type(config).__name__}")
    c = {**_DIFFUSERS_DEFAULTS, **config}
    return dict(
        sample_size=c["sample_size"],
        patch_size=c["patch_size"],
        in_channels=c["in_channels"],
        out_channels=c["out_channels"] or c["in_channels"],
        hidden_size=c["hidden_size"],
        depth=c["num_layers"],
        num_refiner_layers=c["num_refiner_layers"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c["num_kv_heads"],
        context_dim=c["cap_feat_dim"],
        multiple_of=c["multiple_of"],
        ffn_dim_multiplier=c["ffn_dim_multiplier"],
        norm_eps=float(c["norm_eps"]),
        axes_dim=tuple(c["axes_dim_rope"]),
        axes_lens=tuple(c["axes_lens"]),
    )


def from_diffusers(model: nn.Module) -> Lumina2:
    """Our Lumina 2 with a diffusers ``Lumina2Transformer2DModel``'s settings and weights: the same outputs.

    Config from ``model.config``; the state dict is checked key by key and shape by shape before anything
    loads. The result takes the model's dtype, device and train/eval mode. Call it ``ours(x, t,
    context=encoder_hidden_states, context_mask=encoder_attention_mask.bool())``. The class is recognised
    by name, so diffusers is not imported here.
    """
    if "Lumina2Transformer2DModel" not in {cls.__name__ for cls in type(model).__mro__}:
        raise TypeError(f"from_diffusers expects a diffusers Lumina2Transformer2DModel, got {type(model).__name__}")
    weight = next(model.parameters())
    ours = build_empty(lambda: Lumina2(**lumina2_kwargs_from_diffusers(dict(model.config))), weight)
    ours.load_diffusers_state_dict(model.state_dict())
    return ours.train(model.training)
