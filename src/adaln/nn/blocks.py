"""Residual blocks conditioned through AdaLN-Zero.

``AdaLNZeroResidualBlock`` is nvSubquadratic's block of that name (``residual_block.py``): any sequence
mixer, any MLP, any norms, built from modules, factories or hydra configs. ``DiTBlock`` and
``FinalLayer`` are facebookresearch/DiT models.py's, with the modulation held by ``AdaLNZero`` /
``AdaLN`` (key ``adaLN_modulation.proj.1.*`` where fb has ``adaLN_modulation.1.*``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaln.checks import check_tensor
from adaln.functional import gate_residual, modulate, norm_modulate
from adaln.nn.adaln import AdaLN, AdaLNZero
from adaln.nn.attention import Attention, CrossAttention
from adaln.nn.mlp import DropPath, Mlp

ModuleSpec = Union[nn.Module, Callable[[], nn.Module], Mapping[str, Any]]

# Shape-preserving layers a Sequential's channel count can be read through.
_CHANNEL_PRESERVING = (nn.Identity, nn.Dropout, DropPath, nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid)


def build_module(spec: ModuleSpec, name: str) -> nn.Module:
    """An ``nn.Module`` as given, from a zero-argument factory, or from a hydra ``_target_`` config."""
    if isinstance(spec, nn.Module):
        module = spec
    elif isinstance(spec, Mapping):
        if "_target_" not in spec:
            raise TypeError(f"{name} config must have a '_target_' key (hydra), got keys {sorted(spec)}")
        from hydra.utils import instantiate  # imported on use: hydra is slow to import

        module = instantiate(spec)
    elif callable(spec):
        module = spec()
    else:
        raise TypeError(
            f"{name} must be an nn.Module, a zero-argument factory or a hydra config, got {spec!r}"
        )
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name} must build an nn.Module, got {type(module).__name__}")
    return module


def channel_dims(module: nn.Module) -> tuple[int | None, int | None]:
    """(input, output) channel counts where the module states them, else None (checked at forward)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        c = module.normalized_shape[0] if len(module.normalized_shape) == 1 else None
        return c, c
    if isinstance(module, (Attention, CrossAttention)):
        return module.dim, module.dim
    if isinstance(module, nn.Sequential):
        layers = [m for m in module if not isinstance(m, _CHANNEL_PRESERVING)]
        return (channel_dims(layers[0])[0], channel_dims(layers[-1])[1]) if layers else (None, None)
    dims = getattr(module, "in_features", None), getattr(module, "out_features", None)  # nn.Linear, Mlp
    return tuple(d if isinstance(d, int) else None for d in dims)


def accepts_conditioning(module: nn.Module) -> bool:
    """Whether ``module.forward`` declares a ``conditioning`` parameter by name."""
    param = inspect.signature(module.forward).parameters.get("conditioning")
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


def _check_output(y: Tensor, shape: torch.Size, name: str) -> Tensor:
    if not isinstance(y, Tensor) or y.shape != shape:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{name} must return its input's shape {tuple(shape)}, got {got}")
    return y


class AdaLNZeroResidualBlock(nn.Module):
    """Pre-norm residual block with AdaLN-Zero conditioning; nvSubquadratic ``AdaLNZeroResidualBlock``.

    Forward computation (seed 001)::

        cond = condition_norm(mean(condition over all non-batch, non-channel axes))     # (B, C)
        shift_seq, scale_seq, gate_seq, shift_mlp, scale_mlp, gate_mlp = condition_proj(cond).chunk(6)
        x = x + dropout(sequence_mixer(sequence_norm(x) * (1 + scale_seq) + shift_seq,
                                       conditioning=cond)) * gate_seq
        x = x + dropout(mlp(mlp_norm(x) * (1 + scale_mlp) + shift_mlp)) * gate_mlp

    ``condition_proj`` = SiLU -> Linear(C, 6C) with zero weights and bias (``adaln_zero``), so at
    initialisation every gate is 0 and the block is exactly the identity. ``conditioning=cond`` is passed
    only when the mixer's ``forward`` declares a ``conditioning`` parameter (e.g. Hyena with FiLM).

    ======================  ==========================================================================
    Argument                Meaning
    ======================  ==========================================================================
    sequence_mixer          token mixer, (B, *spatial, C) -> (B, *spatial, C)
    sequence_mixer_norm     pre-norm of the mixer branch (e.g. ``nn.LayerNorm(C, elementwise_affine=
                            False, eps=1e-6)``), stored as ``sequence_norm``
    mlp                     position-wise MLP, (B, *spatial, C) -> (B, *spatial, C)
    mlp_norm                pre-norm of the MLP branch
    condition_norm          norm of the pooled condition (B, C); ``nn.Identity()`` to skip
    dropout                 dropout / ``DropPath`` applied to each branch before its gate
    hidden_dim              C, the channel count of x, the condition and every sub-module
    ======================  ==========================================================================

    Each of the first six is an ``nn.Module``, a zero-argument factory or a hydra config with a
    ``_target_`` (instantiated with ``hydra.utils.instantiate``). ``forward(x, condition)``: x
    (B, *spatial, C); condition (B, C) or (B, *spatial_cond, C) (any token layout, mean-pooled).
    Parameters of the three norms are tagged ``_no_weight_decay`` as in the source.

    We differ from the source in two checks: sub-modules whose channel count is readable (LayerNorm,
    RMSNorm, Linear, Mlp, Attention, Sequential of those) must match ``hidden_dim`` at construction,
    and every branch output must have x's shape at forward (the source fails deep inside a matmul).
    Norms that are ``nn.LayerNorm`` / ``nn.RMSNorm`` go through ``adaln.functional.norm_modulate``
    (the fused kernel's entry point); any other norm through ``modulate(norm(x), ...)``.
    """

    def __init__(
        self,
        sequence_mixer: ModuleSpec,
        sequence_mixer_norm: ModuleSpec,
        mlp: ModuleSpec,
        mlp_norm: ModuleSpec,
        condition_norm: ModuleSpec,
        dropout: ModuleSpec,
        hidden_dim: int,
    ) -> None:
        super().__init__()
        if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ValueError(f"hidden_dim must be a positive int, got {hidden_dim!r}")
        self.hidden_dim = hidden_dim
        self.sequence_mixer = build_module(sequence_mixer, "sequence_mixer")
        self.sequence_norm = build_module(sequence_mixer_norm, "sequence_mixer_norm")
        self.mlp = build_module(mlp, "mlp")
        self.mlp_norm = build_module(mlp_norm, "mlp_norm")
        self.condition_norm = build_module(condition_norm, "condition_norm")
        self.dropout = build_module(dropout, "dropout")
        self.condition_proj = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 6 * hidden_dim))
        self._check_channels()
        for norm in (self.sequence_norm, self.mlp_norm, self.condition_norm):
            for p in norm.parameters():
                p._no_weight_decay = True
        self.mixer_takes_conditioning = accepts_conditioning(self.sequence_mixer)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # adaln_zero: zero modulation weights and bias -> all gates 0 -> the block starts as the identity.
        nn.init.zeros_(self.condition_proj[1].weight)
        nn.init.zeros_(self.condition_proj[1].bias)

    def _check_channels(self) -> None:
        for name, module in (
            ("sequence_mixer", self.sequence_mixer),
            ("sequence_mixer_norm", self.sequence_norm),
            ("mlp", self.mlp),
            ("mlp_norm", self.mlp_norm),
            ("condition_norm", self.condition_norm),
        ):
            for side, c in zip(("input", "output"), channel_dims(module)):
                if c is not None and c != self.hidden_dim:
                    raise ValueError(f"{name} has {side} channel dim {c} but hidden_dim is {self.hidden_dim}")

    def pool_condition(self, condition: Tensor, batch: int) -> Tensor:
        """condition (B, C) or (B, *spatial_cond, C) -> condition_norm(mean over token axes) (B, C)."""
        if condition is None:
            raise ValueError("condition is required: (B, C) or (B, *spatial, C), got None")
        check_tensor(condition, "condition", min_dim=2)
        if condition.shape[0] != batch or condition.shape[-1] != self.hidden_dim:
            raise ValueError(
                f"condition must be (B, C) or (B, *spatial, C) with B = {batch}, C = {self.hidden_dim}; "
                f"got {tuple(condition.shape)}"
            )
        if condition.dim() > 2:
            condition = condition.mean(dim=tuple(range(1, condition.dim() - 1)))
        return _check_output(self.condition_norm(condition), condition.shape, "condition_norm")

    def modulation(self, cond: Tensor) -> tuple[Tensor, ...]:
        """The six (B, C) chunks (shift_seq, scale_seq, gate_seq, shift_mlp, scale_mlp, gate_mlp)."""
        silu, linear = self.condition_proj
        # dtype policy: the modulation linear runs in fp32 for half inputs (never narrower than its weights)
        ct = torch.promote_types(torch.promote_types(cond.dtype, torch.float32), linear.weight.dtype)
        return F.linear(silu(cond.to(ct)), linear.weight.to(ct), linear.bias.to(ct)).chunk(6, dim=-1)

    def _norm_modulate(self, norm: nn.Module, x: Tensor, shift: Tensor, scale: Tensor, name: str) -> Tensor:
        if isinstance(norm, nn.LayerNorm):
            return norm_modulate(
                x, shift, scale, norm="layer", eps=norm.eps, weight=norm.weight, bias=norm.bias
            )
        if isinstance(norm, nn.RMSNorm):
            eps = torch.finfo(x.dtype).eps if norm.eps is None else norm.eps  # torch's RMSNorm default
            return norm_modulate(x, shift, scale, norm="rms", eps=eps, weight=norm.weight)
        return modulate(_check_output(norm(x), x.shape, name), shift, scale)

    def forward(self, x: Tensor, condition: Tensor) -> Tensor:
        """x (B, *spatial, C); condition (B, C) or (B, *spatial_cond, C) -> (B, *spatial, C)."""
        check_tensor(x, "x", min_dim=2)
        if x.shape[-1] != self.hidden_dim:
            raise ValueError(f"x must be (B, *spatial, {self.hidden_dim}), got {tuple(x.shape)}")
        cond = self.pool_condition(condition, x.shape[0])
        shift_seq, scale_seq, gate_seq, shift_mlp, scale_mlp, gate_mlp = self.modulation(cond)

        h = self._norm_modulate(self.sequence_norm, x, shift_seq, scale_seq, "sequence_mixer_norm")
        if self.mixer_takes_conditioning:
            y = self.sequence_mixer(h, conditioning=cond)
        else:
            y = self.sequence_mixer(h)
        x = gate_residual(x, self.dropout(_check_output(y, x.shape, "sequence_mixer")), gate_seq)

        h = self._norm_modulate(self.mlp_norm, x, shift_mlp, scale_mlp, "mlp_norm")
        y = _check_output(self.mlp(h), x.shape, "mlp")
        return gate_residual(x, self.dropout(y), gate_mlp)


def _check_x_c(x: Tensor, c: Tensor, dim: int) -> None:
    check_tensor(x, "x", min_dim=3)
    if x.shape[-1] != dim:
        raise ValueError(f"x must be (B, N, {dim}) or (B, *spatial, {dim}), got {tuple(x.shape)}")
    check_tensor(c, "c", min_dim=2)
    if tuple(c.shape) != (x.shape[0], dim) and c.shape != x.shape:
        raise ValueError(
            f"c must be (B, C) = {(x.shape[0], dim)} or per-token {tuple(x.shape)}, got {tuple(c.shape)}"
        )


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning; facebookresearch/DiT models.py ``DiTBlock``.

    LayerNorm without affine, eps 1e-6; timm attention with qkv bias; MLP with tanh-GELU; one
    modulation SiLU -> Linear(C, 6C) giving (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
    gate_mlp), zero-initialised. x (B, N, C) (or (B, *spatial, C)), c (B, C) -> (B, N, C).
    ``qk_norm`` and ``block_kwargs`` (attn_drop, proj_drop) go to ``Attention``; fb has no qk-norm.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        qk_norm: str | None = None,
        **block_kwargs: float,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm, **block_kwargs)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act="gelu_tanh")
        self.adaLN_modulation = AdaLNZero(hidden_size, hidden_size, branches=2)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        _check_x_c(x, c, self.hidden_size)
        ada = self.adaLN_modulation
        (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = ada(c)
        x = ada.residual(x, self.attn(ada.modulate(x, shift_msa, scale_msa)), gate_msa)
        return ada.residual(x, self.mlp(ada.modulate(x, shift_mlp, scale_mlp)), gate_mlp)


class FinalLayer(nn.Module):
    """The final layer of DiT; facebookresearch/DiT models.py ``FinalLayer``.

    ``linear(LN(x) * (1 + scale) + shift)`` with LN without affine, eps 1e-6, and (shift, scale) from a
    zero-initialised SiLU -> Linear(C, 2C). ``linear`` keeps nn.Linear's default init here; the DiT
    model zeroes it in its ``initialize_weights`` as fb does. x (B, N, C), c (B, C) -> (B, N, p*p*out).
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.adaLN_modulation = AdaLN(hidden_size, hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        _check_x_c(x, c, self.hidden_size)
        return self.linear(self.adaLN_modulation(x, c))
