"""DiT: the Diffusion Transformer with AdaLN-Zero blocks (Peebles & Xie 2023), and its converters.

Matches facebookresearch/DiT ``models.py`` (``DiT``, ``initialize_weights``, ``unpatchify``, the
``DiT_models`` sizes) output for output; official checkpoints load with
``DiT.load_facebookresearch_state_dict``. Where we deliberately differ from that file:

- the input may be non-square (``input_size=(H, W)``); the sin-cos grid and ``unpatchify`` follow;
- ``forward`` checks its inputs (shape, dtype, class range) and raises ``ValueError``/``TypeError``;
- ``pos_embed`` is a persistent buffer (fb: a frozen ``nn.Parameter``; same state-dict key and value);
- classifier-free guidance is ``adaln.diffusion.ClassifierFreeGuidance`` on an EDM denoiser, all channels;
  ``forward_with_cfg`` keeps fb's DDPM-loop form, and fb's 3-channel quirk only with ``guided_channels=3``.

Images enter and leave as ``(B, C, H, W)`` (fb's layout, also diffusers'); tokens inside are ``(B, N, D)``
in row-major patch order. The adaLN projections live at ``adaLN_modulation.proj.1`` (fb:
``adaLN_modulation.1``); the converters below rename them.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from os import PathLike

import torch
from torch import Tensor, nn

from adaln.diffusion import EDMPrecond, VPEpsDenoiser
from adaln.nn.blocks import DiTBlock, FinalLayer
from adaln.nn.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed

#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone (facebookresearch/DiT ``models.DiT``).

    forward(x (B, C, H, W), t (B,) DDPM timestep (may be fractional), y (B,) class ids in
    [0, num_classes], ``num_classes`` being the null class) -> (B, out_channels, H, W); with
    ``learn_sigma`` the first C output channels are eps and the last C the variance interpolation.
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
    ) -> None:
        super().__init__()
        if not 0.0 <= class_dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1], got {class_dropout_prob}")
        self.input_size = _pair(input_size, "input_size")
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.class_dropout_prob = class_dropout_prob
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma

        self.x_embedder = PatchEmbed(self.input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.grid_size = tuple(self.x_embedder.grid_size)
        # Fixed 2-D sin-cos embedding, filled in initialize_weights; a buffer so no optimizer sees it.
        self.register_buffer("pos_embed", torch.zeros(1, self.grid_size[0] * self.grid_size[1], hidden_size))
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """fb DiT's initialisation, in the same order (later steps overwrite earlier ones)."""

        # Every Linear: xavier-uniform weight, zero bias (fb's _basic_init).
        self.apply(_basic_init)

        # Sin-cos positions computed in float64 and stored in float32, as fb's checkpoints hold them.
        pos = torch.as_tensor(get_2d_sincos_pos_embed(self.hidden_size, self.grid_size), dtype=torch.float32)
        self.pos_embed.copy_(pos.reshape(self.pos_embed.shape))

        # Patch embedding initialised like an nn.Linear on the flattened patch; its bias keeps Conv2d's
        # default uniform init, as in fb (whose _basic_init touches nn.Linear only).
        self.x_embedder.proj.reset_parameters()
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: zero modulation makes every shift, scale and gate 0, so each block starts as the identity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation.proj[-1].weight)
            nn.init.zeros_(block.adaLN_modulation.proj[-1].bias)

        # Zero output layer: the network predicts 0 at init (and the final modulation starts neutral).
        nn.init.zeros_(self.final_layer.adaLN_modulation.proj[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation.proj[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p*p*C_out) tokens -> (B, C_out, H, W); token n is patch (n // w, n % w)."""
        (h, w), p, c = self.grid_size, self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """x (B, C, H, W), t (B,), y (B,) int -> (B, out_channels, H, W).

        In training mode labels are replaced by the null class with probability ``class_dropout_prob``
        (drawn with ``generator`` when given).
        """
        self._check_inputs(x, t, y)
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

    def _check_inputs(self, x: Tensor, t: Tensor, y: Tensor) -> None:
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
        if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"y must be an integer torch.Tensor of class ids, got {_describe_value(y)}")
        if tuple(y.shape) != (b,):
            raise ValueError(f"y must have shape (B,) = ({b},), got {tuple(y.shape)}")
        # Data-dependent check: a host sync, skipped while tracing for torch.compile.
        if not torch.compiler.is_compiling() and bool(((y < 0) | (y > self.num_classes)).any()):
            raise ValueError(
                f"y must hold class ids in [0, {self.num_classes}] ({self.num_classes} = null class), "
                f"got values in [{int(y.min())}, {int(y.max())}]"
            )

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, patch_size={self.patch_size}, in_channels={self.in_channels}, "
            f"hidden_size={self.hidden_size}, depth={self.depth}, num_heads={self.num_heads}, "
            f"num_classes={self.num_classes}, learn_sigma={self.learn_sigma}"
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

    def diffusers_config(self) -> dict[str, object]:
        """Keyword arguments for diffusers' ``DiTTransformer2DModel`` of this size (see ``convert_to_diffusers``)."""
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
            norm_eps=1e-6,  # fb's MLP-branch LayerNorm eps; diffusers' default 1e-5 would differ
        )

    def to_diffusers_state_dict(self) -> dict[str, Tensor]:
        """This model's weights in diffusers' ``DiTTransformer2DModel`` layout (``diffusers_config()``)."""
        return convert_to_diffusers(self.state_dict(), num_classes=self.num_classes)

    def load_diffusers_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a diffusers ``DiTTransformer2DModel`` state dict; ``pos_embed`` keeps this model's sin-cos."""
        converted = convert_from_diffusers(state_dict, null_class=self.class_dropout_prob > 0)
        converted.setdefault("pos_embed", self.pos_embed)
        _check_state_dict(self, converted, "diffusers DiTTransformer2DModel", lambda k: k)
        self.load_state_dict(converted)


def _basic_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _pair(size: int | tuple[int, int], name: str) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    raise TypeError(f"{name} must be an int or a pair of ints (H, W), got {size!r}")


def _describe_value(v: object) -> str:
    return f"{type(v).__name__} of dtype {v.dtype}" if isinstance(v, Tensor) else type(v).__name__


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
    _check_mapping(state_dict)
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
    _check_mapping(obj)
    return dict(obj)


def _check_mapping(state_dict: object) -> None:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    bad = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"state_dict values must be tensors; not tensors: {bad}")


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


def _check_state_dict(model: DiT, sd: Mapping[str, Tensor], source: str, rename) -> None:
    """Raise one ValueError naming every missing, unexpected and mis-shaped key (names via ``rename``)."""
    expected = model.state_dict()
    missing = [rename(k) for k in expected if k not in sd]
    unexpected = [rename(k) for k in sd if k not in expected]
    shapes = [
        f"{rename(k)}: got {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
        for k, v in sd.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        found = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        problems = [f"{name} ({len(items)}): {items}" for name, items in found if items]
        raise ValueError(
            f"{source} state dict does not fit this DiT.\n  state dict: {_summary(sd)}\n  model:      "
            f"{_summary(expected)}\n  " + "\n  ".join(problems)
        )


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


def _depth(keys, prefix: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))}
    if found != set(range(len(found))):
        raise ValueError(f"block indices under {prefix!r} must run 0..N-1, got {sorted(found)}")
    return len(found)


class _Reader:
    """Takes tensors out of a state dict by name, remembering which names were missing or unused."""

    def __init__(self, sd: Mapping[str, Tensor]) -> None:
        _check_mapping(sd)
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

    The mapping is exact; diffusers' model itself differs from fb's DiT in two places, so equal weights
    do not give equal outputs unless these are matched:

    - timestep frequencies: diffusers' ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)``
      uses ``exp(-ln(10000) * i / 127)``, fb ``exp(-ln(10000) * i / 128)`` (i = 0..127; both cos first);
    - the MLP-branch LayerNorm eps is the config's ``norm_eps`` (class default 1e-5, fb 1e-6;
      ``diffusers_config`` sets 1e-6).

    With both matched, float32 outputs agree to the bit in our tests; a float64 diffusers model still
    computes its timestep sinusoid in float32 (about 4e-6 away from a float64 DiT).

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
                for name, part in zip(("to_q", "to_k", "to_v"), qkv.chunk(3, dim=0)):
                    out[f"transformer_blocks.{i}.attn1.{name}.{p}"] = part
            for ours, theirs in _BLOCK_PAIRS:
                if (v := read(f"blocks.{i}.{ours}.{p}")) is not None:
                    out[f"transformer_blocks.{i}.{theirs}.{p}"] = v
    read.finish("cannot convert DiT state dict to diffusers")
    return out


def convert_from_diffusers(state_dict: Mapping[str, Tensor], *, null_class: bool = True) -> dict[str, Tensor]:
    """diffusers ``DiTTransformer2DModel`` state dict -> ours (without ``pos_embed``, which diffusers
    does not store). The per-block embedder copies must be equal (they are in every converted fb
    checkpoint); ``null_class=False`` drops the table's null row (for ``class_dropout_prob=0``).
    """
    read = _Reader(state_dict)
    depth = _depth(state_dict, "transformer_blocks.")
    out: dict[str, Tensor] = {}
    for ours, theirs in _GLOBAL_PAIRS:
        for p in _PARAMS:
            if (v := read(f"{theirs}.{p}")) is not None:
                out[f"{ours}.{p}"] = v
    emb_keys = [(f"{ours}.{p}", f"{theirs}.{p}") for ours, theirs in _EMB_PAIRS for p in _PARAMS]
    emb_keys.append((_TABLE, _DIFFUSERS_TABLE))
    differing = []
    for ours, theirs in emb_keys:
        copies = [read(f"transformer_blocks.{i}.{theirs}") for i in range(depth)]
        if depth and copies[0] is not None:
            out[ours] = copies[0]
            differing += [
                f"transformer_blocks.{i}.{theirs}"
                for i, v in enumerate(copies)
                if v is not None and (v.shape != copies[0].shape or not torch.equal(v, copies[0]))
            ]
    for i in range(depth):
        for p in _PARAMS:
            qkv = [read(f"transformer_blocks.{i}.attn1.{n}.{p}") for n in ("to_q", "to_k", "to_v")]
            if all(v is not None for v in qkv):
                out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(qkv, dim=0)
            for ours, theirs in _BLOCK_PAIRS:
                if (v := read(f"transformer_blocks.{i}.{theirs}.{p}")) is not None:
                    out[f"blocks.{i}.{ours}.{p}"] = v
    if "pos_embed.pos_embed" in state_dict:
        out["pos_embed"] = read("pos_embed.pos_embed")
    read.finish("cannot convert diffusers DiTTransformer2DModel state dict")
    if differing:
        raise ValueError(
            "diffusers keeps a timestep/label embedder per block; ours is shared, so all copies must equal "
            f"block 0's. These differ: {differing}"
        )
    if not null_class and _TABLE in out:
        out[_TABLE] = out[_TABLE][:-1]
    return out


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
