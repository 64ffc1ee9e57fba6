"""The AdaLN family: adaptive norms whose affine parameters are predicted from a condition.

Channels-last everywhere: ``x`` is ``(B, *spatial, C)``; a condition is global ``(B, Cc)`` or
per-token ``(B, *spatial, Cc)``. Chunk order is DiT's: per branch ``(shift, scale, gate)``, branches in
forward order. With bf16/fp16 conditions the modulation Linear runs in fp32 (cond and weights cast) and
its outputs stay fp32, so ``1 + scale`` never rounds in half precision; module outputs come back in
``x``'s dtype. Init is named: ``adaln_zero`` = projection weight and bias zero.

Sources: facebookresearch/DiT ``models.py`` (``DiTBlock``, ``FinalLayer``), PixArt-alpha
``diffusion/model/nets/PixArt.py`` (adaLN-single), diffusers ``normalization.py``
(``AdaLayerNormContinuous``, ``LuminaRMSNormZero``) and ``transformer_z_image.py``,
google-deepmind/alphafold3 ``src/alphafold3/model/network/diffusion_transformer.py``
(``adaptive_layernorm``, ``adaptive_zero_init``; Algorithms 25-26 of the AF3 paper).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaln.checks import check_choice, compute_dtype
from adaln.functional import (
    GATES,
    NORMS,
    af3_adaptive_layernorm,
    check_tensor,
    gate_residual,
    norm_modulate,
)

__all__ = [
    "AF3AdaptiveLayerNorm",
    "AdaLN",
    "AdaLNContinuous",
    "AdaLNSingle",
    "AdaLNSingleTable",
    "AdaLNZero",
    "AdaptiveZeroInit",
    "adaln_continuous_from_diffusers",
    "adaln_continuous_to_diffusers",
]

AF3_EPS = 1e-5  # haiku LayerNorm default, used by every AF3 LayerNorm
AF3_GATE_BIAS = -2.0  # AF3: "init to a small gain, sigmoid(-2) ~ 0.1"
TRUNCATED_NORMAL_STDDEV_FACTOR = 0.87962566103423978  # std of N(0, 1) truncated to [-2, 2]
ACTIVATIONS = ("silu", None)  # before the modulation Linear: DiT / Lumina 2 SiLU, Z-Image none


#################################################################################
#                         Validation and shared helpers                         #
#################################################################################



def _check_x(x: object, dim: int, name: str = "x") -> Tensor:
    """``x`` must be a floating ``(B, *spatial, dim)`` tensor."""
    check_tensor(x, name, min_dim=2)
    if x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape (B, *spatial, {dim}), got {tuple(x.shape)}")
    return x


def _check_cond(cond: object, cond_dim: int) -> Tensor:
    """``cond`` must be a floating ``(B, [*spatial,] cond_dim)`` tensor."""
    if cond is None:
        raise ValueError(f"cond is required: expected (B, {cond_dim}) or (B, *spatial, {cond_dim})")
    check_tensor(cond, "cond", min_dim=2)
    if cond.shape[-1] != cond_dim:
        raise ValueError(
            f"cond must have last dim cond_dim={cond_dim}: expected (B, {cond_dim}) or "
            f"(B, *spatial, {cond_dim}), got {tuple(cond.shape)}"
        )
    return cond


def _check_cond_matches_x(x: Tensor, cond: Tensor, cond_dim: int) -> None:
    """``cond`` must be global ``(B, cond_dim)`` or per-token with ``x``'s leading dims."""
    if cond.shape[:-1] == x.shape[:-1]:
        return
    if cond.dim() == 2 and cond.shape[0] == x.shape[0]:
        return
    expected = (x.shape[0], cond_dim)
    per_token = (*x.shape[:-1], cond_dim)
    raise ValueError(
        f"cond must be global (B, cond_dim) = {expected} or per-token {per_token} to match x "
        f"{tuple(x.shape)}; got {tuple(cond.shape)}"
    )


def _as_global(t: Tensor, x: Tensor) -> Tensor:
    """View a global ``(B, C)`` tensor as ``(B, 1, ..., 1, C)`` so it broadcasts over x's token axes."""
    if t.dim() == 2 and x.dim() > 2:
        return t.view(t.shape[0], *([1] * (x.dim() - 2)), t.shape[-1])
    return t


def _modulation_linear(linear: nn.Linear, cond: Tensor, silu: bool = True) -> Tensor:
    """``Linear(SiLU(cond))`` in fp32 for half inputs (dtype policy), else in the wider dtype."""
    ct = torch.promote_types(compute_dtype(cond.dtype), linear.weight.dtype)
    h = cond.to(ct)
    if silu:
        h = F.silu(h)
    bias = None if linear.bias is None else linear.bias.to(ct)
    return F.linear(h, linear.weight.to(ct), bias)


def _adaln_zero_(linear: nn.Linear) -> None:
    """Named init ``adaln_zero``: the modulation starts at shift = scale = gate = 0."""
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def _af3_lecun_normal_(weight: Tensor) -> None:
    """AF3 ``'linear'`` initializer: fan-in truncated normal, std 1/sqrt(fan_in) after truncation."""
    std = math.sqrt(1.0 / weight.shape[1]) / TRUNCATED_NORMAL_STDDEV_FACTOR
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


#################################################################################
#                         DiT-style AdaLN and AdaLN-Zero                        #
#################################################################################


class AdaLN(nn.Module):
    """Adaptive norm ``norm(x) * (1 + scale) + shift`` with ``(shift, scale) = Linear(SiLU(cond))``.

    Matches DiT ``FinalLayer`` (``norm="layer"``, eps 1e-6), and Z-Image's ``FinalLayer``
    (``shift=False``: scale only). The norm has no affine. Init ``adaln_zero``: output = norm(x).
    x: (B, *spatial, dim); cond: (B, cond_dim) or (B, *spatial, cond_dim). Returns x's shape/dtype.
    """

    def __init__(
        self, dim: int, cond_dim: int, *, norm: str = "layer", shift: bool = True, eps: float = 1e-6
    ) -> None:
        super().__init__()
        check_choice(norm, "norm", NORMS)
        self.dim, self.cond_dim, self.norm, self.shift, self.eps = dim, cond_dim, norm, shift, eps
        self.proj = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, (2 if shift else 1) * dim))
        _adaln_zero_(self.proj[1])

    def modulation(self, cond: Tensor) -> tuple[Tensor | None, Tensor]:
        """``(shift, scale)`` (shift None without shift), each cond's leading dims + (dim,)."""
        _check_cond(cond, self.cond_dim)
        out = _modulation_linear(self.proj[1], cond)
        if not self.shift:
            return None, out
        shift, scale = out.chunk(2, dim=-1)
        return shift, scale

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        _check_x(x, self.dim)
        _check_cond_matches_x(x, _check_cond(cond, self.cond_dim), self.cond_dim)
        shift, scale = self.modulation(cond)
        return norm_modulate(x, shift, scale, norm=self.norm, eps=self.eps)


class AdaLNZero(nn.Module):
    """AdaLN-Zero modulation for ``branches`` residual branches from one projection (DiT ``DiTBlock``).

    ``self.proj = act -> Linear(cond_dim, branches * k * dim)``, k = 3 with shift (per branch
    ``(shift, scale, gate)``, DiT) else 2 (``(scale, gate)``). ``cond_dim`` is the projection's own input
    width, independent of ``dim``. ``activation``: ``"silu"`` (DiT, Lumina 2) or ``None`` (a bare Linear,
    Z-Image); ``proj[0]`` is ``nn.Identity`` then, so the Linear's key stays ``proj.1.*``. Init
    ``adaln_zero``: every gate is 0, so a block using ``residual`` with ``gate="linear"``/``"tanh"`` is
    the identity at init (with ``"sigmoid"`` a zero gate means gain 0.5).

    Lumina 2 (diffusers ``transformer_lumina2.py``, ``LuminaRMSNormZero``) is ``norm="rms",
    shift=False, gate="tanh"`` with ``cond_dim = min(dim, 1024)``: its chunks ``(scale_msa, gate_msa,
    scale_mlp, gate_mlp)`` are exactly our per-branch ``(scale, gate)``; its pre-norms ``norm1.norm`` and
    ``ffn_norm1`` carry weights (``modulate(..., weight=)``). Z-Image (``transformer_z_image.py``
    ``ZImageTransformerBlock``) is the same with ``activation=None`` and ``cond_dim = min(dim, 256)``;
    its pre-norms ``attention_norm1`` / ``ffn_norm1`` are weighted RMSNorms too. Both blocks
    RMS-normalise each branch output (weighted ``norm2`` / ``ffn_norm2``) before the gate: that norm is
    the caller's, applied to ``y`` before ``residual``.
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        *,
        branches: int = 2,
        norm: str = "layer",
        shift: bool = True,
        gate: str = "linear",
        eps: float = 1e-6,
        activation: str | None = "silu",
    ) -> None:
        super().__init__()
        check_choice(norm, "norm", NORMS)
        check_choice(gate, "gate", GATES)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if branches < 1:
            raise ValueError(f"branches must be >= 1, got {branches}")
        self.dim, self.cond_dim, self.branches = dim, cond_dim, branches
        self.norm, self.shift, self.gate, self.eps, self.activation = norm, shift, gate, eps, activation
        act = nn.SiLU() if activation == "silu" else nn.Identity()
        self.proj = nn.Sequential(act, nn.Linear(cond_dim, branches * (3 if shift else 2) * dim))
        _adaln_zero_(self.proj[1])

    def forward(self, cond: Tensor) -> list[tuple[Tensor | None, Tensor, Tensor]]:
        """Per branch ``(shift | None, scale, gate)``; gates are pre-activation (``residual`` applies it).

        cond: (B, cond_dim) or (B, *spatial, cond_dim) -> tensors of shape cond.shape[:-1] + (dim,).
        """
        _check_cond(cond, self.cond_dim)
        out = _modulation_linear(self.proj[1], cond, silu=self.activation == "silu")
        chunks = out.chunk(self.branches * (3 if self.shift else 2), -1)
        if self.shift:
            return [tuple(chunks[3 * i : 3 * i + 3]) for i in range(self.branches)]
        return [(None, chunks[2 * i], chunks[2 * i + 1]) for i in range(self.branches)]

    def modulate(
        self, x: Tensor, shift: Tensor | None, scale: Tensor, *, weight: Tensor | None = None
    ) -> Tensor:
        """``norm(x) * (1 + scale) + shift`` with this module's norm and eps. x: (B, *spatial, dim).

        ``weight`` (dim,): the norm's own elementwise scale, applied before the modulation (the weighted
        pre-norm RMSNorms of Lumina 2 and Z-Image); None means 1.
        """
        _check_x(x, self.dim)
        return norm_modulate(x, shift, scale, norm=self.norm, eps=self.eps, weight=weight)

    def residual(self, x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
        """``x + act(gate) * y`` with this module's gate kind. x, y: (B, *spatial, dim)."""
        _check_x(x, self.dim)
        return gate_residual(x, y, gate, kind=self.gate)


#################################################################################
#                        PixArt-alpha adaLN-single                              #
#################################################################################


class AdaLNSingle(nn.Module):
    """PixArt-alpha adaLN-single: one network-wide ``SiLU -> Linear(dim, num_params * dim)`` on t_emb.

    ``self.t_block`` is PixArt's name (``PixArt.t_block``), so PixArt keys ``t_block.1.*`` load as is;
    diffusers ``AdaLayerNormSingle.linear.*`` maps to ``t_block.1.*`` (its timestep embedder
    ``emb`` is a separate module here). Init as PixArt: weight normal std 0.02, bias 0.
    t_emb: (B, dim) -> (B, num_params * dim), fp32 for half inputs.
    """

    def __init__(self, dim: int, *, num_params: int = 6) -> None:
        super().__init__()
        self.dim, self.num_params = dim, num_params
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, num_params * dim))
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.zeros_(self.t_block[1].bias)

    def forward(self, t_emb: Tensor) -> Tensor:
        check_tensor(t_emb, "t_emb", min_dim=2)
        if t_emb.dim() != 2 or t_emb.shape[1] != self.dim:
            raise ValueError(f"t_emb must have shape (B, {self.dim}), got {tuple(t_emb.shape)}")
        return _modulation_linear(self.t_block[1], t_emb)


class AdaLNSingleTable(nn.Module):
    """PixArt-alpha per-block ``scale_shift_table``: block params = table + reshaped shared t_mod.

    Table init ``randn(num_params, dim) / sqrt(dim)`` (PixArt ``PixArtBlock``). PixArt chunks the sum
    as ``(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)`` = DiT's order, so the
    returned tuple is our per-branch ``(shift, scale, gate)`` for branches (attention, MLP) unchanged.
    t_mod: (B, num_params * dim) -> tuple of num_params tensors (B, dim).
    """

    def __init__(self, dim: int, num_params: int = 6) -> None:
        super().__init__()
        self.dim, self.num_params = dim, num_params
        self.scale_shift_table = nn.Parameter(torch.randn(num_params, dim) / dim**0.5)

    def forward(self, t_mod: Tensor) -> tuple[Tensor, ...]:
        check_tensor(t_mod, "t_mod", min_dim=2)
        if t_mod.dim() != 2 or t_mod.shape[1] != self.num_params * self.dim:
            raise ValueError(
                f"t_mod must have shape (B, num_params * dim) = (B, {self.num_params * self.dim}), "
                f"got {tuple(t_mod.shape)}"
            )
        ct = torch.promote_types(t_mod.dtype, self.scale_shift_table.dtype)
        params = self.scale_shift_table.to(ct)[None] + t_mod.to(ct).view(-1, self.num_params, self.dim)
        return tuple(params.unbind(dim=1))


#################################################################################
#                  SD3 / Flux final norm (diffusers AdaLayerNormContinuous)     #
#################################################################################


def _swap_halves(t: Tensor) -> Tensor:
    """Swap the two halves along dim 0: (scale, shift) <-> (shift, scale)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


_DIFFUSERS_KEYS = {
    "proj.1.weight": "linear.weight",
    "proj.1.bias": "linear.bias",
    "norm_weight": "norm.weight",
    "norm_bias": "norm.bias",
}


def adaln_continuous_from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``AdaLayerNormContinuous`` state dict -> ours (linear halves (scale, shift) swapped)."""
    return _convert(sd, {v: k for k, v in _DIFFUSERS_KEYS.items()}, "diffusers AdaLayerNormContinuous")


def adaln_continuous_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our ``AdaLNContinuous`` state dict -> diffusers' (linear halves swapped to (scale, shift))."""
    return _convert(sd, _DIFFUSERS_KEYS, "AdaLNContinuous")


def _convert(sd: dict[str, Tensor], mapping: dict[str, str], source: str) -> dict[str, Tensor]:
    unknown = sorted(set(sd) - set(mapping))
    if unknown:
        raise ValueError(f"unexpected keys for a {source} state dict: {unknown}; expected {sorted(mapping)}")
    # only the modulation Linear's rows are chunked; the norm's affine is per channel
    return {
        mapping[k]: _swap_halves(v) if k.startswith(("linear.", "proj.")) else v for k, v in sd.items()
    }


class AdaLNContinuous(nn.Module):
    """SD3 / Flux final-layer norm (diffusers ``AdaLayerNormContinuous``) in DiT chunk order.

    ``norm(x) * (1 + scale) + shift`` with ``(shift, scale) = Linear(SiLU(cond))`` — diffusers stores
    the Linear halves as ``(scale, shift)``; ``from_diffusers_state_dict`` / ``to_diffusers_state_dict``
    swap them. ``elementwise_affine`` adds the norm's own weight (and bias for LayerNorm) as diffusers
    does; ``bias=False`` drops the Linear's bias and the LayerNorm's bias (diffusers' ``bias`` switch
    covers both). Init ``adaln_zero`` (diffusers' default init is not zero). eps 1e-6 as SD3/Flux
    configure it (diffusers' class default is 1e-5). x: (B, *spatial, dim); cond: (B, cond_dim) or
    per-token. Differs from diffusers in precision only: half inputs modulate in fp32 (dtype policy).
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        *,
        norm: str = "layer",
        eps: float = 1e-6,
        elementwise_affine: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_choice(norm, "norm", NORMS)
        self.dim, self.cond_dim, self.norm, self.eps = dim, cond_dim, norm, eps
        self.elementwise_affine = elementwise_affine
        self.proj = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim, bias=bias))
        _adaln_zero_(self.proj[1])
        self.norm_weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None
        has_bias = elementwise_affine and bias and norm == "layer"
        self.norm_bias = nn.Parameter(torch.zeros(dim)) if has_bias else None

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        _check_x(x, self.dim)
        _check_cond_matches_x(x, _check_cond(cond, self.cond_dim), self.cond_dim)
        shift, scale = _modulation_linear(self.proj[1], cond).chunk(2, dim=-1)
        return norm_modulate(
            x, shift, scale, norm=self.norm, eps=self.eps, weight=self.norm_weight, bias=self.norm_bias
        )

    @classmethod
    def from_diffusers_state_dict(
        cls, sd: dict[str, Tensor], *, norm: str = "layer", eps: float = 1e-6
    ) -> AdaLNContinuous:
        """Build from a diffusers state dict (``linear.weight``, optional ``linear.bias`` and ``norm.*``).

        ``norm``/``eps`` as the diffusers module was configured; a missing ``linear.bias`` means
        ``bias=False``. The module takes the state dict's dtype and device (no rounding to float32).
        """
        weight = sd.get("linear.weight")
        if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[0] % 2:
            raise ValueError(
                f"sd must hold 'linear.weight' of shape (2 * dim, cond_dim), got keys {sorted(sd)}"
            )
        two_dim, cond_dim = weight.shape
        module = cls(
            two_dim // 2,
            cond_dim,
            norm=norm,
            eps=eps,
            elementwise_affine="norm.weight" in sd,
            bias="linear.bias" in sd,
        )
        module.to(dtype=weight.dtype, device=weight.device)
        module.load_state_dict(adaln_continuous_from_diffusers(sd))
        return module

    def to_diffusers_state_dict(self) -> dict[str, Tensor]:
        """This module's parameters in diffusers' ``AdaLayerNormContinuous`` layout."""
        return adaln_continuous_to_diffusers(self.state_dict())


#################################################################################
#                       AlphaFold3 adaptive LayerNorm and gate                  #
#################################################################################


class AF3AdaptiveLayerNorm(nn.Module):
    """AlphaFold3 Algorithm 26 as in ``diffusion_transformer.py`` ``adaptive_layernorm``.

    With cond: ``sigmoid(single_cond_scale(c)) * LN(x) + single_cond_bias(c)``, ``c = LN(cond)`` with
    scale and no offset; LN(x) has no affine. Both Linears are zero-initialised (AF3
    ``initializer='zeros'``), so the output is 0.5 * LN(x) at init; ``single_cond_bias`` has no bias
    (haiku ``hm.Linear`` default). Without cond: a plain LayerNorm with scale and offset. eps 1e-5
    (haiku default). Attribute names mirror the haiku scopes so loading official parameters is a rename.
    x: (..., N, dim); cond: (..., N, cond_dim) per-token (or (B, cond_dim) global). Returns x's dtype.
    """

    def __init__(self, dim: int, cond_dim: int | None) -> None:
        super().__init__()
        self.dim, self.cond_dim = dim, cond_dim
        if cond_dim is None:
            self.layer_norm = nn.LayerNorm(dim, eps=AF3_EPS)
            return
        self.single_cond_layer_norm = nn.LayerNorm(cond_dim, eps=AF3_EPS, bias=False)
        self.single_cond_scale = nn.Linear(cond_dim, dim)
        self.single_cond_bias = nn.Linear(cond_dim, dim, bias=False)
        for linear in (self.single_cond_scale, self.single_cond_bias):
            nn.init.zeros_(linear.weight)
        nn.init.zeros_(self.single_cond_scale.bias)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        _check_x(x, self.dim)
        if self.cond_dim is None:
            if cond is not None:
                raise ValueError("cond must be None: this AF3AdaptiveLayerNorm was built with cond_dim=None")
            ln = self.layer_norm
            ct = compute_dtype(x.dtype)  # haiku LayerNorm upcasts half inputs to fp32
            y = F.layer_norm(x.to(ct), (self.dim,), ln.weight.to(ct), ln.bias.to(ct), AF3_EPS)
            return y.to(x.dtype)
        _check_cond_matches_x(x, _check_cond(cond, self.cond_dim), self.cond_dim)
        ct = torch.promote_types(compute_dtype(cond.dtype), self.single_cond_scale.weight.dtype)
        gamma = self.single_cond_layer_norm.weight.to(ct)
        c = F.layer_norm(cond.to(ct), (self.cond_dim,), gamma, None, AF3_EPS)
        scale_logits = _modulation_linear(self.single_cond_scale, c, silu=False)
        bias = _modulation_linear(self.single_cond_bias, c, silu=False)
        return af3_adaptive_layernorm(x, scale_logits, bias, eps=AF3_EPS)


class AdaptiveZeroInit(nn.Module):
    """AlphaFold3 ``adaptive_zero_init`` (``diffusion_transformer.py``): the gated branch output.

    With cond: ``sigmoid(adaptive_zero_cond(cond)) * transition2(x)`` on the RAW cond (no LayerNorm);
    ``transition2`` is a bias-free Linear with AF3's ``'linear'`` init (fan-in truncated normal);
    ``adaptive_zero_cond`` has zero weights and bias -2 ("init to a small gain, sigmoid(-2) ~ 0.1").
    Without cond: ``transition2`` alone, zero-initialised (AF3 ``global_config.final_init='zeros'``).
    x: (..., N, in_dim); cond: (..., N, cond_dim) per-token (or (B, cond_dim) global) -> (..., N, out_dim).
    """

    def __init__(self, in_dim: int, out_dim: int, cond_dim: int | None) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.cond_dim = in_dim, out_dim, cond_dim
        self.transition2 = nn.Linear(in_dim, out_dim, bias=False)
        if cond_dim is None:
            nn.init.zeros_(self.transition2.weight)
            return
        _af3_lecun_normal_(self.transition2.weight)
        self.adaptive_zero_cond = nn.Linear(cond_dim, out_dim)
        nn.init.zeros_(self.adaptive_zero_cond.weight)
        nn.init.constant_(self.adaptive_zero_cond.bias, AF3_GATE_BIAS)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        _check_x(x, self.in_dim)
        if self.cond_dim is None:
            if cond is not None:
                raise ValueError("cond must be None: this AdaptiveZeroInit was built with cond_dim=None")
            return self.transition2(x)
        _check_cond_matches_x(x, _check_cond(cond, self.cond_dim), self.cond_dim)
        y = self.transition2(x)
        gate = torch.sigmoid(_modulation_linear(self.adaptive_zero_cond, cond, silu=False))
        return (_as_global(gate, y) * y.to(gate.dtype)).to(y.dtype)
