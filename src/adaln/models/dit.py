"""DiT: the Diffusion Transformer with AdaLN-Zero blocks (Peebles & Xie 2023), and its converters.

Matches facebookresearch/DiT ``models.py`` (``DiT``, ``initialize_weights``, ``unpatchify``, the
``DiT_models`` sizes) output for output; official checkpoints load with
``DiT.load_facebookresearch_state_dict``. Where we deliberately differ from that file:

- the input may be non-square (``input_size=(H, W)``); the sin-cos grid and ``unpatchify`` follow;
- ``forward`` checks its inputs (shape, dtype, device, class range) and raises ``ValueError``/``TypeError``;
- ``pos_embed`` is a persistent buffer (fb: a frozen ``nn.Parameter``; same state-dict key and value);
- classifier-free guidance is ``adaln.diffusion.ClassifierFreeGuidance`` on an EDM denoiser, all channels;
  ``forward_with_cfg`` keeps fb's DDPM-loop form, and fb's 3-channel quirk only with ``guided_channels=3``;
- two switches reproduce diffusers' ``DiTTransformer2DModel`` instead (``DiT.from_diffusers`` sets them):
  ``freq_shift=1`` (its timestep frequencies ``exp(-ln(1e4) i / 127)``, fb ``/ 128``) and
  ``mlp_norm_eps`` (its config's ``norm_eps`` on the MLP-branch LayerNorm; fb 1e-6 everywhere).

Images enter and leave as ``(B, C, H, W)`` (fb's layout, also diffusers'); tokens inside are ``(B, N, D)``
in row-major patch order. The adaLN projections live at ``adaLN_modulation.proj.1`` (fb:
``adaLN_modulation.1``); the converters below rename them. ``DiTBase`` holds what ``DiT``,
``adaln.models.conditioning.ConditionalDiT`` and ``adaln.models.residual_denoiser.ResidualDenoiser`` share.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from os import PathLike
from typing import Any

import torch
from torch import Tensor, nn

from adaln.checks import check_values
from adaln.diffusion import EDMPrecond, VPEpsDenoiser
from adaln.models._layout import build_empty, check_layout, check_state_dict
from adaln.nn.adaln import AdaLNZero
from adaln.nn.blocks import AdaLNZeroResidualBlock, DiTBlock, FinalLayer
from adaln.nn.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed

FB_EPS = 1e-6  # every LayerNorm of fb DiT

#################################################################################
#            The frame DiT, ConditionalDiT and ResidualDenoiser share           #
#################################################################################


class DiTBase(nn.Module):
    """Patches in, fixed sin-cos positions, timestep embedding, adaLN final layer, unpatchify out;
    fb DiT's ``initialize_weights``; the input checks at the public boundary.

    A subclass calls ``_build_stem`` first, then builds its conditioners, ``_register_pos_embed``, its
    ``self.blocks`` and ``_build_head``, in that order (fb's module order), and finally
    ``initialize_weights``. ``_keeps_own_init`` names sub-modules whose Linears
    keep their own init (fb's ``_basic_init`` reaches every Linear of its DiT).
    """

    def _build_stem(
        self,
        input_size: int | tuple[int, int],
        patch_size: int,
        in_channels: int,
        hidden_size: int,
        *,
        learn_sigma: bool,
        freq_shift: int = 0,
    ) -> None:
        """``x_embedder`` (PatchEmbed) and ``t_embedder`` (TimestepEmbedder), and the geometry attributes."""
        self.x_embedder = PatchEmbed(_pair(input_size, "input_size"), patch_size, in_channels, hidden_size)
        self.input_size, self.grid_size = self.x_embedder.img_size, self.x_embedder.grid_size
        self.patch_size, self.in_channels, self.hidden_size = patch_size, in_channels, hidden_size
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=freq_shift)

    def _register_pos_embed(self, layout: str | None) -> None:
        """The fixed 2-D sin-cos table as a buffer (no optimizer sees it), filled in ``initialize_weights``:
        ``"tokens"`` (1, N, D) as fb's ``pos_embed``, ``"grid"`` (1, h, w, D) for channels-last grids, None."""
        shapes = {"tokens": (1, self.grid_size[0] * self.grid_size[1]), "grid": (1, *self.grid_size)}
        value = None if layout is None else torch.zeros(*shapes[layout], self.hidden_size)
        self.register_buffer("pos_embed", value)

    def _build_head(self) -> None:
        self.final_layer = FinalLayer(self.hidden_size, self.patch_size, self.out_channels)

    def _keeps_own_init(self) -> tuple[nn.Module, ...]:
        return ()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """facebookresearch/DiT ``DiT.initialize_weights``, in its order (later steps overwrite earlier ones)."""
        own = {id(m) for part in self._keeps_own_init() for m in part.modules()}
        # Every Linear: xavier-uniform weight, zero bias (fb's _basic_init).
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module) not in own:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        # Sin-cos positions computed in float64 and stored in float32, as fb's checkpoints hold them.
        if self.pos_embed is not None:
            pos = torch.as_tensor(get_2d_sincos_pos_embed(self.hidden_size, self.grid_size), dtype=torch.float32)
            self.pos_embed.copy_(pos.reshape(self.pos_embed.shape))

        # Patch embedding like an nn.Linear on the flattened patch: xavier-uniform weight, zero bias.
        self.x_embedder.reset_parameters()

        if getattr(self, "y_embedder", None) is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: zero modulation makes every shift, scale and gate 0, so each block starts as the identity.
        for linear in self._adaln_zero_linears():
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

        # Zero output layer: the network predicts 0 at init (and the final modulation starts neutral).
        for linear in (self.final_layer.adaLN_modulation.proj[-1], self.final_layer.linear):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def _adaln_zero_linears(self) -> Iterator[nn.Linear]:
        """The modulation Linear of every AdaLN-Zero in the blocks (cross-attention branches included)."""
        for module in self.blocks.modules():
            if isinstance(module, AdaLNZero):
                yield module.proj[-1]
            elif isinstance(module, AdaLNZeroResidualBlock):
                yield module.condition_proj[1]

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p*p*C_out) or (B, h, w, p*p*C_out) tokens -> (B, C_out, H, W); token n is patch (n // w, n % w)."""
        (h, w), p, c = self.grid_size, self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    # ---- input checks (fb has none): every error names the argument and what was expected ------------

    def _check_x_t(self, x: Tensor, t: Tensor) -> int:
        """x (B, C, H, W) floating, in the model's dtype (unless autocast is on) and on its device; t (B,)
        real on the same device. Returns B."""
        expected = (self.in_channels, *self.input_size)
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point torch.Tensor, got {_describe_value(x)}")
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        b = x.shape[0]
        if not isinstance(t, Tensor) or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"t must be a real (integer or float) torch.Tensor, got {_describe_value(t)}")
        if tuple(t.shape) != (b,):
            raise ValueError(f"t must have shape (B,) = ({b},), got {tuple(t.shape)}")
        self._check_devices(x=x, t=t)
        weight = self.x_embedder.proj.weight
        if x.dtype != weight.dtype and not _autocast_enabled(x.device):
            raise TypeError(
                f"x has dtype {x.dtype} but the model's parameters are {weight.dtype}: cast one to the other "
                f"(x.to({weight.dtype}) or model.to({x.dtype})), or call the model under torch.autocast"
            )
        return b

    def _check_y(self, y: Tensor, b: int) -> None:
        """y (B,) int32/int64 class ids within the label table (the null class where it has one)."""
        if not isinstance(y, Tensor) or y.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"y must be an integer (int32/int64) torch.Tensor of class ids, got {_describe_value(y)}")
        if tuple(y.shape) != (b,):
            raise ValueError(f"y must have shape (B,) = ({b},), got {tuple(y.shape)}")
        self._check_devices(y=y)
        high = self.y_embedder.embedding_table.num_embeddings - 1
        # Data-dependent check: a host sync, skipped while tracing and in the training loop (trusted_values).
        if check_values() and bool(((y < 0) | (y > high)).any()):
            null = f"{high} = null class" if high == self.num_classes else "no null class: built without label dropout"
            raise ValueError(
                f"y must hold class ids in [0, {high}] ({null}), got values in [{int(y.min())}, {int(y.max())}]"
            )

    def _check_devices(self, **tensors: Tensor | None) -> None:
        device = self.x_embedder.proj.weight.device
        for name, value in tensors.items():
            if value is not None and value.device != device:
                raise ValueError(
                    f"{name} is on {value.device} but the model's parameters are on {device}; "
                    f"move it with {name}.to({str(device)!r})"
                )


def _autocast_enabled(device: torch.device) -> bool:
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def _pair(size: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    raise TypeError(f"{name} must be an int or a pair of ints (H, W), got {size!r}")


def _describe_value(v: object) -> str:
    return f"{type(v).__name__} of dtype {v.dtype}" if isinstance(v, Tensor) else type(v).__name__


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class DiT(DiTBase):
    """Diffusion model with a Transformer backbone (facebookresearch/DiT ``models.DiT``).

    forward(x (B, C, H, W), t (B,) DDPM timestep (may be fractional), y (B,) class ids in
    [0, num_classes], ``num_classes`` being the null class) -> (B, out_channels, H, W); with
    ``learn_sigma`` the first C output channels are eps and the last C the variance interpolation.
    ``x`` must have the parameters' dtype (any dtype under ``torch.autocast``) and every input their device.

    ``freq_shift`` and ``mlp_norm_eps`` default to fb's model; ``freq_shift=1`` and the diffusers config's
    ``norm_eps`` give diffusers' ``DiTTransformer2DModel`` (see the module docstring, ``from_diffusers``).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        *,
        freq_shift: int = 0,
        mlp_norm_eps: float = FB_EPS,
    ) -> None:
        super().__init__()
        if not 0.0 <= class_dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1], got {class_dropout_prob}")
        if not mlp_norm_eps > 0:
            raise ValueError(f"mlp_norm_eps must be > 0, got {mlp_norm_eps!r}")
        self._build_stem(
            input_size, patch_size, in_channels, hidden_size, learn_sigma=learn_sigma, freq_shift=freq_shift
        )
        self.depth, self.num_heads, self.mlp_ratio = depth, num_heads, mlp_ratio
        self.class_dropout_prob, self.num_classes = class_dropout_prob, num_classes
        self.freq_shift, self.mlp_norm_eps = freq_shift, mlp_norm_eps

        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self._register_pos_embed("tokens")
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, mlp_norm_eps=mlp_norm_eps)
            for _ in range(depth)
        )
        self._build_head()
        self.initialize_weights()

    def forward(self, x: Tensor, t: Tensor, y: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """x (B, C, H, W), t (B,), y (B,) int -> (B, out_channels, H, W).

        In training mode labels are replaced by the null class with probability ``class_dropout_prob``
        (drawn with ``generator`` when given).
        """
        self._check_y(y, self._check_x_t(x, t))
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, generator=generator)  # (B, D)
        for block in self.blocks:
            x = block(x, c)  # (B, N, D)
        return self.unpatchify(self.final_layer(x, c))  # (B, out_channels, H, W)

    def forward_with_cfg(
        self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float, *, guided_channels: int | None = None
    ) -> Tensor:
        """fb DiT's batched guidance for its DDPM loop: inputs are [cond; uncond] halves (2B, ...).

        Only ``x[:B]`` is used (fb feeds identical halves); returns (2B, out_channels, H, W) whose
        first ``guided_channels`` channels are ``eps_u + cfg_scale * (eps_c - eps_u)`` in both halves,
        the rest the raw outputs. ``guided_channels=None`` guides every eps channel (``in_channels``);
        ``guided_channels=3`` reproduces fb's published samples (``model_out[:, :3]``). For EDM
        sampling use ``adaln.diffusion.ClassifierFreeGuidance`` instead.
        """
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[0] % 2:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"forward_with_cfg needs x of shape (2B, C, H, W) = [cond; uncond], got {got}")
        k = self.in_channels if guided_channels is None else guided_channels
        if not 1 <= k <= self.out_channels:
            raise ValueError(f"guided_channels must be in [1, {self.out_channels}], got {guided_channels}")
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        cond, uncond = out[:, :k].chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), out[:, k:]], dim=1)

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, patch_size={self.patch_size}, in_channels={self.in_channels}, "
            f"hidden_size={self.hidden_size}, depth={self.depth}, num_heads={self.num_heads}, "
            f"num_classes={self.num_classes}, learn_sigma={self.learn_sigma}, freq_shift={self.freq_shift}, "
            f"mlp_norm_eps={self.mlp_norm_eps}"
        )

    # ---- checkpoint layouts ------------------------------------------------------------------------

    def load_facebookresearch_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load an official facebookresearch/DiT state dict (``models.DiT.state_dict()`` layout).

        Raises one ``ValueError`` listing every missing, unexpected and mis-shaped key (fb names).
        """
        converted = convert_facebookresearch_state_dict(state_dict)
        _check_state_dict(self, converted, "facebookresearch/DiT", _ours_to_fb_key)
        self.load_state_dict(converted)

    def to_facebookresearch_state_dict(self) -> dict[str, Tensor]:
        """This model's state dict in facebookresearch/DiT's layout (loads into ``models.DiT``)."""
        return {_ours_to_fb_key(k): v for k, v in self.state_dict().items()}

    @classmethod
    def from_diffusers(cls, model: nn.Module) -> DiT:
        """Our DiT with a diffusers ``DiTTransformer2DModel``'s settings and weights: the same outputs.

        The settings come from ``model.config`` (``dit_kwargs_from_diffusers``: ``freq_shift=1``,
        ``mlp_norm_eps=norm_eps``); the state dict is checked against that config before anything is
        loaded. The result has the model's dtype, device and train/eval mode; call it
        ``ours(x, t, y)`` with the ``hidden_states``, ``timestep`` and ``class_labels`` diffusers takes.
        """
        config = dict(model.config)
        weight = next(model.parameters())
        ours = build_empty(lambda: cls(**dit_kwargs_from_diffusers(config)), weight)
        converted = convert_from_diffusers(model.state_dict(), config=config)
        converted["pos_embed"] = ours.pos_embed
        _check_state_dict(ours, converted, "diffusers DiTTransformer2DModel")
        ours.load_state_dict(converted)
        return ours.train(model.training)

    def diffusers_config(self) -> dict[str, object]:
        """Keyword arguments for diffusers' ``DiTTransformer2DModel`` of this size (``to_diffusers_state_dict``).

        ``norm_eps`` is this model's ``mlp_norm_eps``. diffusers has no switch for the timestep spacing:
        its model computes what ours does with ``freq_shift=1`` (see ``convert_to_diffusers``).
        """
        h, w = self.input_size
        if h != w:
            raise ValueError(f"diffusers' DiTTransformer2DModel takes square inputs only; this DiT is {h}x{w}")
        if self.mlp_ratio != 4.0:
            raise ValueError(f"diffusers' DiTTransformer2DModel has mlp_ratio 4 only; this DiT has {self.mlp_ratio}")
        return dict(
            num_attention_heads=self.num_heads,
            attention_head_dim=self.hidden_size // self.num_heads,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            num_layers=self.depth,
            sample_size=h,
            patch_size=self.patch_size,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=self.num_classes,
            norm_type="ada_norm_zero",
            norm_elementwise_affine=False,
            norm_eps=self.mlp_norm_eps,
        )

    def to_diffusers_state_dict(self) -> dict[str, Tensor]:
        """This model's weights in diffusers' ``DiTTransformer2DModel`` layout (``diffusers_config()``).

        The diffusers model built from both computes our outputs only when this DiT has ``freq_shift=1``
        (e.g. one made by ``from_diffusers``); with fb's ``freq_shift=0`` the weights are the same but
        diffusers evaluates them with its own timestep spacing, which is what diffusers' DiT does with
        fb's released checkpoints.
        """
        return convert_to_diffusers(self.state_dict(), num_classes=self.num_classes)

    def load_diffusers_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a diffusers ``DiTTransformer2DModel`` state dict; ``pos_embed`` keeps this model's sin-cos.

        Only the weights: this model keeps its own ``freq_shift`` and ``mlp_norm_eps`` (``from_diffusers``
        takes both from the diffusers model). Shapes are checked before anything is loaded.
        """
        converted = convert_from_diffusers(state_dict, null_class=self.class_dropout_prob > 0)
        converted.setdefault("pos_embed", self.pos_embed)
        _check_state_dict(self, converted, "diffusers DiTTransformer2DModel")
        self.load_state_dict(converted)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################


def DiT_XL_2(**kwargs) -> DiT:
    return DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)


def DiT_XL_4(**kwargs) -> DiT:
    return DiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)


def DiT_XL_8(**kwargs) -> DiT:
    return DiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs)


def DiT_L_2(**kwargs) -> DiT:
    return DiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)


def DiT_L_4(**kwargs) -> DiT:
    return DiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)


def DiT_L_8(**kwargs) -> DiT:
    return DiT(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kwargs)


def DiT_B_2(**kwargs) -> DiT:
    return DiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)


def DiT_B_4(**kwargs) -> DiT:
    return DiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)


def DiT_B_8(**kwargs) -> DiT:
    return DiT(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kwargs)


def DiT_S_2(**kwargs) -> DiT:
    return DiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)


def DiT_S_4(**kwargs) -> DiT:
    return DiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)


def DiT_S_8(**kwargs) -> DiT:
    return DiT(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kwargs)


DiT_models = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
}  # fmt: skip

#################################################################################
#                     facebookresearch/DiT checkpoint layout                    #
#################################################################################

_FB_ADALN = re.compile(r"(^|\.)adaLN_modulation\.1\.")
_OUR_ADALN = re.compile(r"(^|\.)adaLN_modulation\.proj\.1\.")


def _fb_to_ours_key(key: str) -> str:
    return _FB_ADALN.sub(r"\1adaLN_modulation.proj.1.", key)


def _ours_to_fb_key(key: str) -> str:
    return _OUR_ADALN.sub(r"\1adaLN_modulation.1.", key)


def convert_facebookresearch_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """fb DiT layout -> ours: only ``adaLN_modulation.1.*`` becomes ``adaLN_modulation.proj.1.*``.

    Every other key (``x_embedder.proj``, ``t_embedder.mlp.0/2``, ``y_embedder.embedding_table``,
    ``pos_embed``, ``blocks.N.attn.qkv/proj``, ``blocks.N.mlp.fc1/fc2``, ``final_layer.linear``) is
    shared; tensors are not copied.
    """
    check_state_dict(state_dict)
    return {_fb_to_ours_key(k): v for k, v in state_dict.items()}


def load_facebookresearch_checkpoint(
    path: str | PathLike, *, ema: bool = True, map_location: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """Read an fb DiT checkpoint (weights only) and return its state dict in fb's layout.

    Accepts the released files (a bare state dict, e.g. DiT-XL-2-256x256.pt) and train.py's
    ``{"model", "ema", "opt", "args"}`` dicts, returning ``"ema"`` when present and ``ema`` is True
    (as fb's sample.py does), else ``"model"``. Loads with ``weights_only=True``; the one non-tensor
    class allowed is ``argparse.Namespace`` (train.py stores its ``args``).
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint {path} holds a {type(obj).__name__}, expected a state dict or a dict of them")
    if "ema" in obj and ema:
        obj = obj["ema"]
    elif "model" in obj:
        obj = obj["model"]
    check_state_dict(obj)
    return dict(obj)


def _summary(sd: Mapping[str, Tensor]) -> str:
    """The size a DiT state dict (our layout) implies: hidden, depth, patch, channels, classes, tokens."""
    parts = []
    if isinstance(w := sd.get("x_embedder.proj.weight"), Tensor) and w.dim() == 4:
        parts += [f"hidden_size={w.shape[0]}", f"in_channels={w.shape[1]}", f"patch_size={w.shape[2]}"]
        if isinstance(lin := sd.get("final_layer.linear.weight"), Tensor) and w.shape[2]:
            parts.append(f"out_channels={lin.shape[0] // (w.shape[2] * w.shape[3])}")
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    parts.append(f"depth={depth}")
    if isinstance(table := sd.get("y_embedder.embedding_table.weight"), Tensor):
        parts.append(f"label_rows={table.shape[0]}")
    if isinstance(pos := sd.get("pos_embed"), Tensor):
        parts.append(f"tokens={pos.shape[1]}")
    return ", ".join(parts)


def _check_state_dict(
    model: DiT, sd: Mapping[str, Tensor], source: str, rename: Callable[[str], str] | None = None
) -> None:
    """One ValueError naming every missing, unexpected and mis-shaped key (names via ``rename``) and both sizes."""
    check_layout(sd, model.state_dict(), source, target="this DiT", rename=rename, summary=_summary)


#################################################################################
#                    diffusers DiTTransformer2DModel layout                     #
#################################################################################

# (ours, diffusers) per block; diffusers splits fb's fused qkv into to_q / to_k / to_v.
_BLOCK_PAIRS = (
    ("attn.proj", "attn1.to_out.0"),
    ("mlp.fc1", "ff.net.0.proj"),
    ("mlp.fc2", "ff.net.2"),
    ("adaLN_modulation.proj.1", "norm1.linear"),  # both chunk (shift, scale, gate) x (msa, mlp)
)
_QKV = ("attn1.to_q", "attn1.to_k", "attn1.to_v")
# diffusers keeps one timestep + label embedder per block (AdaLayerNormZero.emb); all copies are equal.
_EMB_PAIRS = (
    ("t_embedder.mlp.0", "norm1.emb.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "norm1.emb.timestep_embedder.linear_2"),
)
_TABLE, _DIFFUSERS_TABLE = "y_embedder.embedding_table.weight", "norm1.emb.class_embedder.embedding_table.weight"
_GLOBAL_PAIRS = (
    ("x_embedder.proj", "pos_embed.proj"),
    ("final_layer.adaLN_modulation.proj.1", "proj_out_1"),  # both chunk (shift, scale)
    ("final_layer.linear", "proj_out_2"),
)
_PARAMS = ("weight", "bias")

# DiTTransformer2DModel.__init__'s defaults (diffusers models/transformers/dit_transformer_2d.py).
_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None, num_layers=28,
    dropout=0.0, attention_bias=True, sample_size=32, patch_size=2, activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-5,
)  # fmt: skip
_DIFFUSERS_FREQ_SHIFT = 1  # CombinedTimestepLabelEmbeddings: Timesteps(256, True, downscale_freq_shift=1)
_DIFFUSERS_MLP_RATIO = 4  # BasicTransformerBlock's FeedForward(mult=4)
_DIFFUSERS_LABEL_DROPOUT = 0.1  # CombinedTimestepLabelEmbeddings(class_dropout_prob=0.1): a null row always


def dit_kwargs_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """``DiT`` keyword arguments giving a diffusers ``DiTTransformer2DModel`` config's network and outputs.

    Missing keys take diffusers' class defaults. ``freq_shift=1`` and ``mlp_norm_eps=norm_eps`` make
    the outputs diffusers'; ``learn_sigma`` follows ``out_channels`` (2 * in_channels or in_channels).
    Configs our DiT cannot express (another activation, no attention bias, affine norms, dropout, an
    odd ``out_channels``) raise ``ValueError`` naming the key.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (a diffusers model's .config), got {type(config).__name__}")
    c = {**_DIFFUSERS_DEFAULTS, **config}
    fixed = dict(
        norm_type="ada_norm_zero", activation_fn="gelu-approximate", attention_bias=True,
        norm_elementwise_affine=False, dropout=0.0,
    )  # fmt: skip
    for key, value in fixed.items():
        if c[key] != value:
            raise ValueError(f"config {key}={c[key]!r} is not fb's DiT (our DiT has {key}={value!r})")
    if c["num_embeds_ada_norm"] is None:
        raise ValueError("config num_embeds_ada_norm=None: our DiT is class-conditional, it needs a class count")
    in_ch = c["in_channels"]
    out_ch = in_ch if c["out_channels"] is None else c["out_channels"]
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"config out_channels={out_ch} must be in_channels ({in_ch}) or twice it (learn_sigma)")
    return dict(
        input_size=c["sample_size"],
        patch_size=c["patch_size"],
        in_channels=in_ch,
        hidden_size=c["num_attention_heads"] * c["attention_head_dim"],
        depth=c["num_layers"],
        num_heads=c["num_attention_heads"],
        mlp_ratio=float(_DIFFUSERS_MLP_RATIO),
        class_dropout_prob=_DIFFUSERS_LABEL_DROPOUT,
        num_classes=c["num_embeds_ada_norm"],
        learn_sigma=out_ch == 2 * in_ch,
        freq_shift=_DIFFUSERS_FREQ_SHIFT,
        mlp_norm_eps=float(c["norm_eps"]),
    )


@dataclass(frozen=True)
class _DiffusersSizes:
    hidden: int
    in_channels: int
    out_channels: int
    patch: int
    depth: int
    num_classes: int

    def __str__(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> _DiffusersSizes:
        k = dit_kwargs_from_diffusers(config)
        out = 2 * k["in_channels"] if k["learn_sigma"] else k["in_channels"]
        return cls(k["hidden_size"], k["in_channels"], out, k["patch_size"], k["depth"], k["num_classes"])

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> _DiffusersSizes:
        """The sizes the patch conv, the output Linear, block 0's label table and the block count imply."""
        anchors = ("pos_embed.proj.weight", "proj_out_2.weight", f"transformer_blocks.0.{_DIFFUSERS_TABLE}")
        missing = [k for k in anchors if not isinstance(sd.get(k), Tensor)]
        conv, out, table = (sd.get(k) for k in anchors)
        if missing or conv.dim() != 4 or conv.shape[2] != conv.shape[3] or out.dim() != 2 or table.dim() != 2:
            raise ValueError(
                f"cannot read the model size from the diffusers state dict (keys {list(anchors)}; missing "
                f"{missing}); pass config= (the diffusers model's .config)"
            )
        p = conv.shape[2]
        return cls(conv.shape[0], conv.shape[1], out.shape[0] // (p * p), p, _depth(sd, "transformer_blocks."),
                   table.shape[0] - 1)  # fmt: skip

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key of the diffusers state dict and its shape."""
        d, p, ff = self.hidden, self.patch, _DIFFUSERS_MLP_RATIO * self.hidden
        linears = {
            "pos_embed.proj": ((d, self.in_channels, p, p), d),
            "proj_out_1": ((2 * d, d), 2 * d),
            "proj_out_2": ((p * p * self.out_channels, d), p * p * self.out_channels),
        }
        block = {
            "norm1.emb.timestep_embedder.linear_1": ((d, 256), d),
            "norm1.emb.timestep_embedder.linear_2": ((d, d), d),
            "norm1.linear": ((6 * d, d), 6 * d),
            **{name: ((d, d), d) for name in (*_QKV, "attn1.to_out.0")},
            "ff.net.0.proj": ((ff, d), ff),
            "ff.net.2": ((d, ff), d),
        }
        for i in range(self.depth):
            linears.update({f"transformer_blocks.{i}.{k}": v for k, v in block.items()})
        shapes = {}
        for name, (weight, bias) in linears.items():
            shapes[f"{name}.weight"], shapes[f"{name}.bias"] = weight, (bias,)
        for i in range(self.depth):
            shapes[f"transformer_blocks.{i}.{_DIFFUSERS_TABLE}"] = (self.num_classes + 1, d)
        return shapes


def _depth(keys, prefix: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))}
    if found != set(range(len(found))):
        raise ValueError(f"block indices under {prefix!r} must run 0..N-1, got {sorted(found)}")
    return len(found)


class _Reader:
    """Takes tensors out of a state dict by name, remembering which names were missing or unused."""

    def __init__(self, sd: Mapping[str, Tensor]) -> None:
        check_state_dict(sd)
        self.sd, self.used, self.missing = sd, set(), []

    def __call__(self, key: str) -> Tensor | None:
        if key not in self.sd:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.sd[key]

    def finish(self, what: str) -> None:
        unexpected = [k for k in self.sd if k not in self.used]
        if self.missing or unexpected:
            raise ValueError(f"{what}: missing keys {self.missing}; unexpected keys {unexpected}")


def convert_to_diffusers(state_dict: Mapping[str, Tensor], *, num_classes: int) -> dict[str, Tensor]:
    """Our DiT state dict -> diffusers ``DiTTransformer2DModel`` (configure it with ``DiT.diffusers_config``).

    The mapping of weights is exact. What the diffusers model then computes depends on our DiT's settings,
    because diffusers' model differs from fb's in two places and has a config switch for only one:

    - timestep frequencies: diffusers' ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)``
      uses ``exp(-ln(10000) * i / 127)``, fb ``exp(-ln(10000) * i / 128)`` (i = 0..127; both cos first).
      Our ``freq_shift=1`` is diffusers' spacing; diffusers cannot be set to fb's;
    - the MLP-branch LayerNorm eps is the config's ``norm_eps`` (class default 1e-5, fb 1e-6);
      ``diffusers_config`` writes our ``mlp_norm_eps`` there.

    So a DiT with diffusers' settings (``freq_shift=1``, as ``DiT.from_diffusers`` builds it) gives the
    diffusers model its own outputs (float32: within 1e-5 relative in our tests); a DiT with fb's settings
    (``freq_shift=0``) gives a diffusers model that computes diffusers' DiT on fb's weights, not fb's.

    ``pos_embed`` is dropped (diffusers recomputes it, non-persistent). diffusers' label table always
    has a null row (num_classes + 1 rows); a table without one gets a zero row appended.
    """
    read = _Reader(state_dict)
    depth = _depth(state_dict, "blocks.")
    if "pos_embed" in state_dict:
        read("pos_embed")
    out: dict[str, Tensor] = {}
    for ours, theirs in _GLOBAL_PAIRS:
        for p in _PARAMS:
            if (v := read(f"{ours}.{p}")) is not None:
                out[f"{theirs}.{p}"] = v
    emb = {f"{theirs}.{p}": read(f"{ours}.{p}") for ours, theirs in _EMB_PAIRS for p in _PARAMS}
    table = read(_TABLE)
    if table is not None:
        if table.shape[0] == num_classes:
            table = torch.cat([table, table.new_zeros(1, table.shape[1])])
        elif table.shape[0] != num_classes + 1:
            raise ValueError(f"{_TABLE} has {table.shape[0]} rows, expected {num_classes} or {num_classes + 1}")
        emb[_DIFFUSERS_TABLE] = table
    for i in range(depth):
        out.update({f"transformer_blocks.{i}.{k}": v for k, v in emb.items() if v is not None})
        for p in _PARAMS:
            if (qkv := read(f"blocks.{i}.attn.qkv.{p}")) is not None:
                for name, part in zip(_QKV, qkv.chunk(3, dim=0)):
                    out[f"transformer_blocks.{i}.{name}.{p}"] = part
            for ours, theirs in _BLOCK_PAIRS:
                if (v := read(f"blocks.{i}.{ours}.{p}")) is not None:
                    out[f"transformer_blocks.{i}.{theirs}.{p}"] = v
    read.finish("cannot convert DiT state dict to diffusers")
    return out


def convert_from_diffusers(
    state_dict: Mapping[str, Tensor], *, config: Mapping[str, Any] | None = None, null_class: bool = True
) -> dict[str, Tensor]:
    """diffusers ``DiTTransformer2DModel`` state dict -> ours (without ``pos_embed``, which diffusers
    does not store).

    Checked before anything is converted, in one ``ValueError`` naming every missing, unexpected and
    mis-shaped key (diffusers names, got and expected shapes): against ``config`` (the diffusers model's
    ``.config``, or ``DiT.diffusers_config()``) when given, else against the sizes that the patch conv,
    ``proj_out_2``, block 0's label table and the block count imply. The per-block embedder copies must
    then be equal (they are in every converted fb checkpoint); ``null_class=False`` drops the table's
    null row (for ``class_dropout_prob=0``).
    """
    check_state_dict(state_dict)
    sizes = _DiffusersSizes.from_state_dict(state_dict) if config is None else _DiffusersSizes.from_config(config)
    expected = sizes.shapes()
    basis = "the config" if config is not None else "the sizes its patch conv, proj_out_2 and label table imply"
    check_layout(state_dict, expected, "diffusers DiTTransformer2DModel", target=f"{basis} ({sizes})")
    shared = [f"{theirs}.{p}" for _, theirs in _EMB_PAIRS for p in _PARAMS] + [_DIFFUSERS_TABLE]
    differing = [
        f"transformer_blocks.{i}.{key}"
        for key in shared
        for i in range(1, sizes.depth)
        if not torch.equal(state_dict[f"transformer_blocks.{i}.{key}"], state_dict[f"transformer_blocks.0.{key}"])
    ]
    if differing:
        raise ValueError(
            "diffusers keeps a timestep/label embedder per block; ours is shared, so all copies must equal "
            f"block 0's. These differ: {differing}"
        )
    out: dict[str, Tensor] = {}
    for p in _PARAMS:
        for ours, theirs in _GLOBAL_PAIRS:
            out[f"{ours}.{p}"] = state_dict[f"{theirs}.{p}"]
        for ours, theirs in _EMB_PAIRS:
            out[f"{ours}.{p}"] = state_dict[f"transformer_blocks.0.{theirs}.{p}"]
        for i in range(sizes.depth):
            prefix = f"transformer_blocks.{i}."
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([state_dict[f"{prefix}{n}.{p}"] for n in _QKV], dim=0)
            for ours, theirs in _BLOCK_PAIRS:
                out[f"blocks.{i}.{ours}.{p}"] = state_dict[f"{prefix}{theirs}.{p}"]
    table = state_dict[f"transformer_blocks.0.{_DIFFUSERS_TABLE}"]
    out[_TABLE] = table if null_class else table[:-1]
    return out


def from_diffusers(model: nn.Module) -> nn.Module:
    """Our model with a diffusers transformer's settings and weights (``adaln.models.from_diffusers``).

    Supported: ``DiTTransformer2DModel`` -> ``DiT.from_diffusers(model)``; others raise ``TypeError``.
    The class is recognised by name, so diffusers is not imported here.
    """
    names = {cls.__name__ for cls in type(model).__mro__}
    if "DiTTransformer2DModel" in names:
        return DiT.from_diffusers(model)
    raise TypeError(f"from_diffusers supports DiTTransformer2DModel; got {type(model).__name__}")


#################################################################################
#                              Diffusion denoisers                              #
#################################################################################


class EDMTimestep:
    """EDM's noise input as a DiT timestep: ``sigma -> timestep_scale * ln(sigma) / 4``.

    fb DiT's sinusoidal timestep embedding was designed for DDPM t in [0, 999] (frequencies 1 down to
    1e-4). EDM's c_noise = ln(sigma)/4 spans about [-1.55, 1.10] for sigma in [0.002, 80]; times 1000
    that is t in [-1554, 1095], a span of the same order as fb's, so every frequency band keeps its role
    (unscaled, the low-frequency half of the features would be nearly constant).
    """

    def __init__(self, timestep_scale: float = 1000.0) -> None:
        self.timestep_scale = timestep_scale

    def __call__(self, sigma: Tensor) -> Tensor:
        return self.timestep_scale * sigma.log() / 4

    def __repr__(self) -> str:
        return f"EDMTimestep(timestep_scale={self.timestep_scale})"


def dit_edm_denoiser(model: nn.Module, sigma_data: float = 0.5, *, timestep_scale: float = 1000.0) -> EDMPrecond:
    """EDM denoiser ``D(x, sigma, y=...)`` around a DiT with ``learn_sigma=False`` (images: sigma_data 0.5).

    Any model with DiT's ``forward(x, t, y)`` and a ``learn_sigma`` attribute works (e.g.
    ``adaln.models.residual_denoiser.ResidualDenoiser``).

    D = c_skip x + c_out DiT(c_in x, timestep_scale * c_noise, y) with EDM's scalings and
    c_noise = ln(sigma)/4 (``adaln.diffusion.EDMPrecond``); see ``EDMTimestep`` for the scale.
    """
    if model.learn_sigma:
        raise ValueError("dit_edm_denoiser needs a DiT with learn_sigma=False (its output must be C channels)")
    return EDMPrecond(model, sigma_data, noise_input=EDMTimestep(timestep_scale))


def fb_dit_vp_denoiser(model: DiT, **kwargs) -> VPEpsDenoiser:
    """EDM denoiser around an fb-style DDPM eps-predictor DiT (e.g. the released DiT-XL/2 weights).

    ``adaln.diffusion.VPEpsDenoiser`` maps sigma to the DDPM timestep and keeps the first C (eps)
    channels when ``learn_sigma``; keyword arguments go to it.
    """
    return VPEpsDenoiser(model, learned_sigma_channels=model.learn_sigma, **kwargs)
