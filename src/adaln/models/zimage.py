"""Z-Image: the single-stream S3-DiT of Tongyi-MAI, a Next-DiT whose AdaLN reads the timestep alone.

Matches diffusers' ``ZImageTransformer2DModel`` (``models/transformers/transformer_z_image.py``; the same
network as Tongyi-MAI/Z-Image ``src/zimage/transformer.py``) output for output in its text-to-image mode,
built from Lumina 2's blocks (``adaln.models.lumina2``). What differs from Lumina 2::

    c = t_embedder(t_scale * t)                         # (B, min(D, 256)), 256 -> 1024 -> min(D, 256) MLP
    (scale_a, gate_a), (scale_m, gate_m) = Linear(c)    # a bare Linear: no SiLU (AdaLNZero(activation=None))
    out = Linear(LN(x) * (1 + Linear(SiLU(c))))         # the final layer keeps its SiLU

no grouped-query attention (diffusers builds ``n_heads`` key/value heads whatever ``n_kv_heads`` says),
optional qk norm, SwiGLU of width ``int(D / 3 * 8)``, RoPE base ``rope_theta`` with float32 angles,
and the joint sequence ordered [image; caption].

Z-Image pads every sample's caption and image tokens to a multiple of 32 (``SEQ_MULTI_OF``) with learned
tokens that take part in attention, so the padding is part of the function: a caption of L_i tokens gets
``ceil32(L_i) - L_i`` copies of ``cap_pad_token``, caption slot j sits at RoPE position (1 + j, 0, 0) for
real and pad tokens alike; the N image tokens get ``ceil32(N) - N`` copies of ``x_pad_token`` at (0, 0, 0)
and sit at (ceil32(L_i) + 1, row, col). Ours computes exactly that on a fixed-shape batch (``ceil32(L)``
caption slots, slots past ``ceil32(L_i)`` masked) instead of diffusers' per-sample lists, so shapes never
depend on the mask and ``torch.compile`` sees one graph; the attention is the same up to float summation
order. As in ``adaln.models.lumina2``: a mask need not be a prefix (kept tokens are moved to the front in
order), the content of masked tokens never matters, positions are computed rather than looked up in
``axes_lens``-long tables.

Inputs: x (B, C, H, W) (diffusers takes a list of (C, 1, H, W) frames and returns one: ours stacks them),
context (B, L, context_dim) with context_mask (B, L) (diffusers: a list of (L_i, context_dim) captions).
Not supported: the Omni mode (SigLIP features, several images per sample, ``siglip_feat_dim``), several
patch sizes in one model, ``f_patch_size`` other than 1, ControlNet residuals.

Flow convention (diffusers ``pipeline_z_image.py``): the transformer gets ``t = (1000 - 1000 sigma) / 1000
= 1 - sigma`` and the pipeline negates its output before the scheduler step (``velocity_sign = -1``).
Layout: ``from_diffusers`` / ``ZImage.to_diffusers_state_dict``; Tongyi-MAI's own checkpoints use
diffusers' key names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaln.models._layout import Row, build_empty, check_layout, export_layout, import_layout, linear_rows
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
from adaln.models.lumina2 import NextDiTBlock, NextDiTFinalLayer
from adaln.nn.adaln import AdaLN, AdaLNZero
from adaln.nn.embeddings import timestep_embedding
from adaln.nn.rope import RotaryEmbedding

__all__ = ["ZImage", "ZImageTimestepEmbedder", "from_diffusers", "zimage_ffn_dim", "zimage_kwargs_from_diffusers"]

ZIMAGE_EPS = 1e-5  # the config's norm_eps: every RMSNorm of the blocks and the caption embedder
SEQ_MULTI_OF = 32  # diffusers / Tongyi-MAI SEQ_MULTI_OF: captions and images are padded to multiples of it
MAX_COND_DIM = 256  # ADALN_EMBED_DIM: the timestep embedding (the AdaLN condition) is min(D, 256) wide
FREQUENCY_DIM = 256  # FREQUENCY_EMBEDDING_SIZE, the sinusoid's width (cos first, i / half spacing)
TIMESTEP_HIDDEN = 1024  # TimestepEmbedder(mid_size=1024)


def zimage_ffn_dim(dim: int) -> int:
    """SwiGLU width ``int(dim / 3 * 8)`` (``ZImageTransformerBlock``; the expression's own rounding)."""
    return int(dim / 3 * 8)


def _ceil_to(n: Tensor | int, multiple: int) -> Tensor | int:
    return (n + multiple - 1) // multiple * multiple


class ZImageTimestepEmbedder(nn.Module):
    """Scaled timesteps -> ``mlp(sinusoid)``: 256 cos-first features, Linear to ``hidden``, SiLU, Linear to
    ``out_size`` (Z-Image ``TimestepEmbedder(min(D, 256), mid_size=1024)``, keys ``mlp.0`` / ``mlp.2``).
    Init normal std 0.02, biases 0 (DiT's). t (B,) -> (B, out_size) in the MLP's dtype."""

    def __init__(self, out_size: int, hidden: int = TIMESTEP_HIDDEN, frequency_embedding_size: int = FREQUENCY_DIM):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden), nn.SiLU(), nn.Linear(hidden, out_size))
        for linear in self.mlp[::2]:
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size, freq_shift=0)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class ZImage(nn.Module):
    """Z-Image S3-DiT (diffusers ``ZImageTransformer2DModel``; defaults are its defaults, Z-Image-Turbo's).

    forward(x (B, C, H, W), t (B,) or scalar: diffusers' ``t`` (``1 - sigma``; scaled by ``t_scale``
    inside), context (B, L, context_dim) caption features, context_mask (B, L) bool (True = keep) or None
    (all kept)) -> (B, C, H, W), the pipeline's ``data - noise`` (``velocity_sign = -1``). H and W need only
    be multiples of ``patch_size``; ``pooled`` and ``guidance`` are not Z-Image inputs and must be None.

    ``axes_dim`` (caption, row, column) must sum to the head width; ``axes_lens`` only travels with the
    diffusers config. ``timestep_hidden`` is the timestep MLP's hidden width (diffusers fixes 1024; a
    smaller one suits a small model trained here). Init (trainable from scratch): Linears xavier-uniform
    with zero bias, timestep MLP normal(0.02), pad tokens 0, every AdaLN projection and the output Linear
    zero, so each modulated block starts as the identity (tanh(0) gates) and the network predicts 0.
    """

    velocity_sign = -1.0  # pipeline_z_image.py: noise_pred = -noise_pred before FlowMatchEulerDiscreteScheduler.step

    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 16,
        hidden_size: int = 3840,
        depth: int = 30,
        num_refiner_layers: int = 2,
        num_heads: int = 30,
        context_dim: int = 2560,
        *,
        norm_eps: float = ZIMAGE_EPS,
        qk_norm: bool = True,
        rope_theta: float = 256.0,
        t_scale: float = 1000.0,
        axes_dim: Sequence[int] = (32, 48, 48),
        axes_lens: Sequence[int] = (1024, 512, 512),
        timestep_hidden: int = TIMESTEP_HIDDEN,
    ) -> None:
        super().__init__()
        axes_dim = check_config(
            hidden_size, num_heads, num_refiner_layers, axes_dim, norm_eps, patch_size=patch_size,
            in_channels=in_channels, depth=depth, context_dim=context_dim, timestep_hidden=timestep_hidden,
        )
        axes_lens = tuple(axes_lens)
        self.patch_size, self.in_channels, self.out_channels = patch_size, in_channels, in_channels
        self.hidden_size, self.depth, self.num_refiner_layers = hidden_size, depth, num_refiner_layers
        self.num_heads, self.context_dim, self.norm_eps, self.qk_norm = num_heads, context_dim, norm_eps, bool(qk_norm)
        self.rope_theta, self.t_scale = float(rope_theta), float(t_scale)
        self.axes_dim, self.axes_lens, self.timestep_hidden = axes_dim, axes_lens, timestep_hidden
        self.cond_dim = min(hidden_size, MAX_COND_DIM)

        # Z-Image rounds its RoPE angles to float32 before cos/sin (RopeEmbedder: .float() before polar)
        self.rope = RotaryEmbedding(axes_dim, self.rope_theta, angle_dtype=torch.float32)
        self.x_embedder = nn.Linear(patch_size * patch_size * in_channels, hidden_size)
        self.t_embedder = ZImageTimestepEmbedder(self.cond_dim, timestep_hidden)
        self.cap_embedder = nn.Sequential(nn.RMSNorm(context_dim, eps=norm_eps), nn.Linear(context_dim, hidden_size))
        self.x_pad_token = nn.Parameter(torch.zeros(1, hidden_size))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, hidden_size))
        ffn = zimage_ffn_dim(hidden_size)

        def blocks(n: int, modulated: bool) -> nn.ModuleList:
            cond = self.cond_dim if modulated else None
            return nn.ModuleList(
                NextDiTBlock(hidden_size, num_heads, None, ffn, norm_eps=norm_eps, qk_norm=self.qk_norm,
                             cond_dim=cond, activation=None)
                for _ in range(n)
            )  # fmt: skip

        self.noise_refiner = blocks(num_refiner_layers, True)
        self.context_refiner = blocks(num_refiner_layers, False)
        self.layers = blocks(depth, True)
        self.final_layer = NextDiTFinalLayer(hidden_size, self.cond_dim, patch_size * patch_size * in_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Init for training from scratch (later steps overwrite earlier ones); pad tokens stay 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for linear in self.t_embedder.mlp[::2]:
            nn.init.normal_(linear.weight, std=0.02)
        # adaLN-Zero: scale = gate = 0, so every modulated block starts as the identity (tanh(0) = 0).
        for module in self.modules():
            if isinstance(module, (AdaLNZero, AdaLN)):
                nn.init.zeros_(module.proj[1].weight)
                nn.init.zeros_(module.proj[1].bias)
        # Zero output layer: the network predicts 0 at init.
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def flow_timestep(self, sigma: Tensor) -> Tensor:
        """The ``t`` diffusers' Z-Image pipeline passes at noise level sigma: ``(1000 - 1000 sigma) / 1000``."""
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
        """x (B, C, H, W), t (B,), context (B, L, context_dim), context_mask (B, L) bool -> (B, C, H, W)."""
        t, mask = check_inputs(self, "Z-Image", x, t, context, pooled, context_mask, guidance)
        b, p, d = x.shape[0], self.patch_size, self.hidden_size
        h, w = x.shape[2] // p, x.shape[3] // p
        n, length = h * w, context.shape[1]
        c = self.t_embedder(t * self.t_scale)  # (B, min(D, 256))
        if mask is None:
            mask = torch.ones(context.shape[:2], dtype=torch.bool, device=x.device)
        context, mask = compact_captions(context, mask)
        cap_len = mask.sum(dim=1)
        padded_len = _ceil_to(cap_len, SEQ_MULTI_OF)  # real tokens + cap_pad_token copies, per sample
        slots = _ceil_to(length, SEQ_MULTI_OF)  # enough caption slots for any sample of this batch
        slot = torch.arange(slots, device=x.device)
        active = slot < padded_len[:, None]  # (B, slots): real or pad token; the rest are masked
        cap = self.cap_embedder(F.pad(context, (0, 0, 0, slots - length)))  # (B, slots, D)
        cap = torch.where((slot < cap_len[:, None])[..., None], cap, self.cap_pad_token.to(cap.dtype))
        cap_freqs = self.rope(caption_ids(slots, 1, x.device))  # slot j at (1 + j, 0, 0)

        img_pad = _ceil_to(n, SEQ_MULTI_OF) - n  # x_pad_token copies at (0, 0, 0)
        tokens = self.x_embedder(patchify(x, p))  # (B, N, D)
        tokens = torch.cat([tokens, self.x_pad_token.to(tokens.dtype).expand(b, img_pad, d)], dim=1)
        img_ids = torch.cat([image_ids(padded_len + 1, h, w), cap_len.new_zeros(b, img_pad, 3)], dim=1)
        img_freqs = self.rope(img_ids)

        for block in self.noise_refiner:
            tokens = block(tokens, img_freqs, None, c)
        refine_keep = active | ~active.any(dim=1, keepdim=True)  # an empty caption attends to its padding
        for block in self.context_refiner:
            cap = block(cap, cap_freqs, refine_keep)
        unified = torch.cat([tokens, cap], dim=1)  # diffusers' order: [image; caption]
        keep = torch.cat([active.new_ones(b, n + img_pad), active], dim=1)
        freqs = cat_freqs(img_freqs, cap_freqs)
        for block in self.layers:
            unified = block(unified, freqs, keep, c)
        return unpatchify(self.final_layer(unified[:, :n], c), h, w, p, self.out_channels)

    def extra_repr(self) -> str:
        return (
            f"patch_size={self.patch_size}, in_channels={self.in_channels}, hidden_size={self.hidden_size}, "
            f"depth={self.depth}, num_refiner_layers={self.num_refiner_layers}, num_heads={self.num_heads}, "
            f"context_dim={self.context_dim}, qk_norm={self.qk_norm}, axes_dim={self.axes_dim}"
        )

    # ---- checkpoint layout -------------------------------------------------------------------------

    def diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments of diffusers' ``ZImageTransformer2DModel`` of this size and settings."""
        if self.timestep_hidden != TIMESTEP_HIDDEN:
            raise ValueError(
                f"diffusers' Z-Image has a timestep MLP of width {TIMESTEP_HIDDEN}; this one has {self.timestep_hidden}"
            )
        return dict(
            all_patch_size=(self.patch_size,),
            all_f_patch_size=(1,),
            in_channels=self.in_channels,
            dim=self.hidden_size,
            n_layers=self.depth,
            n_refiner_layers=self.num_refiner_layers,
            n_heads=self.num_heads,
            n_kv_heads=self.num_heads,
            norm_eps=self.norm_eps,
            qk_norm=self.qk_norm,
            cap_feat_dim=self.context_dim,
            rope_theta=self.rope_theta,
            t_scale=self.t_scale,
            axes_dims=list(self.axes_dim),
            axes_lens=list(self.axes_lens),
        )

    def to_diffusers_state_dict(self) -> dict[str, Tensor]:
        """This model's weights in diffusers' ``ZImageTransformer2DModel`` layout (``diffusers_config()``)."""
        return export_layout(self.state_dict(), self._diffusers_rows(), "ZImage")

    def load_diffusers_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a ``ZImageTransformer2DModel`` state dict; every key and shape is checked before loading."""
        check_layout(state_dict, self.to_diffusers_state_dict(), "diffusers ZImageTransformer2DModel")
        self.load_state_dict(import_layout(state_dict, self._diffusers_rows()))

    def _diffusers_rows(self) -> list[Row]:
        patch = f"{self.patch_size}-1"  # diffusers' ModuleDict key "{patch_size}-{f_patch_size}"
        rows: list[Row] = [
            ("x_pad_token", ("x_pad_token",), ()),
            ("cap_pad_token", ("cap_pad_token",), ()),
            ("cap_embedder.0.weight", ("cap_embedder.0.weight",), ()),
        ]
        rows += linear_rows("x_embedder", f"all_x_embedder.{patch}")
        rows += linear_rows("t_embedder.mlp.0", "t_embedder.mlp.0")
        rows += linear_rows("t_embedder.mlp.2", "t_embedder.mlp.2")
        rows += linear_rows("cap_embedder.1", "cap_embedder.1")
        split = self.layers[0].attention.split  # (q, k, v) rows of the fused projection
        for group, n, modulated in (("noise_refiner", self.num_refiner_layers, True),
                                    ("context_refiner", self.num_refiner_layers, False),
                                    ("layers", self.depth, True)):  # fmt: skip
            for i in range(n):
                p = f"{group}.{i}."
                rows += [
                    (p + "attention.qkv.weight", tuple(p + f"attention.to_{part}.weight" for part in "qkv"), split),
                    (p + "attention.out.weight", (p + "attention.to_out.0.weight",), ()),
                ]
                if self.qk_norm:
                    rows += [
                        (p + "attention.q_norm.weight", (p + "attention.norm_q.weight",), ()),
                        (p + "attention.k_norm.weight", (p + "attention.norm_k.weight",), ()),
                    ]
                same = ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2", "feed_forward.w1",
                        "feed_forward.w2", "feed_forward.w3")  # fmt: skip
                rows += [(p + f"{m}.weight", (p + f"{m}.weight",), ()) for m in same]
                if modulated:
                    rows += linear_rows(p + "adaLN_modulation.proj.1", p + "adaLN_modulation.0")
        rows += linear_rows("final_layer.adaLN_modulation.proj.1", f"all_final_layer.{patch}.adaLN_modulation.1")
        rows += linear_rows("final_layer.linear", f"all_final_layer.{patch}.linear")
        return rows


# ZImageTransformer2DModel.__init__'s defaults (diffusers models/transformers/transformer_z_image.py).
_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, siglip_feat_dim=None,
    rope_theta=256.0, t_scale=1000.0, axes_dims=(32, 48, 48), axes_lens=(1024, 512, 512),
)  # fmt: skip


def zimage_kwargs_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """``ZImage`` keyword arguments for a diffusers ``ZImageTransformer2DModel`` config (missing keys: its
    defaults). Configs ours cannot express raise ``ValueError`` naming the key: several patch sizes, an
    ``f_patch_size`` other than 1, SigLIP features (Omni). ``n_kv_heads`` is not read: diffusers' attention
    has ``n_heads`` key/value heads whatever it says."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (a diffusers model's .config), got {type(config).__name__}")
    c = {**_DIFFUSERS_DEFAULTS, **config}
    if len(c["all_patch_size"]) != 1:
        raise ValueError(f"config all_patch_size={c['all_patch_size']!r}: ZImage has one patch size")
    if tuple(c["all_f_patch_size"]) != (1,):
        raise ValueError(f"config all_f_patch_size={c['all_f_patch_size']!r}: ZImage takes single frames, (1,)")
    if c["siglip_feat_dim"] is not None:
        raise ValueError(f"config siglip_feat_dim={c['siglip_feat_dim']!r}: the Omni mode is not supported")
    return dict(
        patch_size=c["all_patch_size"][0],
        in_channels=c["in_channels"],
        hidden_size=c["dim"],
        depth=c["n_layers"],
        num_refiner_layers=c["n_refiner_layers"],
        num_heads=c["n_heads"],
        context_dim=c["cap_feat_dim"],
        norm_eps=float(c["norm_eps"]),
        qk_norm=bool(c["qk_norm"]),
        rope_theta=float(c["rope_theta"]),
        t_scale=float(c["t_scale"]),
        axes_dim=tuple(c["axes_dims"]),
        axes_lens=tuple(c["axes_lens"]),
    )


def from_diffusers(model: nn.Module) -> ZImage:
    """Our Z-Image with a diffusers ``ZImageTransformer2DModel``'s settings and weights: the same outputs.

    Config from ``model.config``; the state dict is checked key by key and shape by shape before anything
    loads. The result takes the model's dtype, device and train/eval mode. Where diffusers is called
    ``model([x_i[:, None] ...], t, [caption_i ...])``, call ``ours(x, t, context=padded captions,
    context_mask=...)``. The class is recognised by name, so diffusers is not imported here.
    """
    if "ZImageTransformer2DModel" not in {cls.__name__ for cls in type(model).__mro__}:
        raise TypeError(f"from_diffusers expects a diffusers ZImageTransformer2DModel, got {type(model).__name__}")
    weight = next(model.parameters())
    ours = build_empty(lambda: ZImage(**zimage_kwargs_from_diffusers(dict(model.config))), weight)
    ours.load_diffusers_state_dict(model.state_dict())
    return ours.train(model.training)
