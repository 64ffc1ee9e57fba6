"""Residual blocks conditioned through AdaLN-Zero, and the ``_target_`` / ``__target__`` configs for them.

``AdaLNZeroResidualBlock`` is nvSubquadratic's block of that name (``residual_block.py``): any sequence
mixer, any MLP, any norms, built from modules, factories or configs. ``DiTBlock`` and ``FinalLayer`` are
facebookresearch/DiT models.py's, with the modulation held by ``AdaLNZero`` / ``AdaLN`` (key
``adaLN_modulation.proj.1.*`` where fb has ``adaLN_modulation.1.*``).
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
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


#################################################################################
#            Configs: hydra ``_target_`` and nvSubquadratic ``__target__``      #
#################################################################################

HYDRA_KEYS = ("_target_", "_args_", "_partial_", "_recursive_")
LAZY_TARGET = "__target__"


def is_config(spec: object) -> bool:
    """Whether ``spec`` is a mapping with a ``_target_`` (hydra) or ``__target__`` (nvSubquadratic) key."""
    return isinstance(spec, Mapping) and ("_target_" in spec or LAZY_TARGET in spec)


def locate(path: str, name: str = "config") -> Any:
    """What a dotted path such as ``"torch.nn.LayerNorm"`` names: longest importable module, then attrs."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and (module_name + ".").startswith(err.name + "."):
                continue  # this prefix (or a parent of it) is not a module: try a shorter one
            raise  # the module exists but one of its own imports is missing
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise ValueError(f"{name}: target {path!r} not found (no attribute {attr!r})") from None
        return obj
    raise ValueError(f"{name}: target {path!r} names no importable module")


def instantiate(config: Mapping[str, Any], name: str = "config") -> Any:
    """Call a config's target with its other keys as keyword arguments; no hydra or omegaconf needed.

    Two forms, told apart by the target key:

    - hydra ``_target_``: nested ``_target_`` configs (in mappings and lists, at any depth) are built
      first, as ``hydra.utils.instantiate`` does by default; ``_args_`` (positional arguments),
      ``_partial_: true`` (return a ``functools.partial``) and ``_recursive_: false`` are honoured;
      any other ``_x_`` key is an error.
    - nvSubquadratic ``__target__`` (its ``LazyConfig(cls)(**kwargs)`` output, a DictConfig or a dict):
      as nvSubquadratic's ``instantiate`` by default, a nested ``__target__`` config whose target is an
      ``nn.Module`` class is passed on unbuilt (the parent builds it), other nested targets (init
      functions, ...) are built. We do not evaluate arithmetic strings (``"128 * 4"``) or detect its
      ``PLACEHOLDER`` sentinel; its shipped block configs use neither.

    A target is a dotted path or the callable itself. Works on any ``Mapping`` (OmegaConf's DictConfig
    included); ``config`` itself is never modified, and an unbuilt nested config is passed as a copy (a
    parent may fill it in; blocks built from one config must not share it).
    """
    if not is_config(config):
        raise TypeError(f"{name} must be a mapping with a '_target_' or '__target__' key, got {config!r}")
    if "_target_" in config and LAZY_TARGET in config:
        raise ValueError(f"{name} config has both '_target_' and '__target__'; use one")
    hydra = "_target_" in config
    target = _resolve(config["_target_" if hydra else LAZY_TARGET], name)
    if not hydra:
        kwargs = {k: _lazy_arg(v, f"{name}.{k}") for k, v in config.items() if k != LAZY_TARGET}
        return target(**kwargs)
    reserved = sorted(k for k in config if k.startswith("_") and k.endswith("_") and k not in HYDRA_KEYS)
    if reserved:
        raise ValueError(f"{name} config: unsupported keys {reserved}; supported are {list(HYDRA_KEYS)}")
    recursive = bool(config.get("_recursive_", True))
    args = [_hydra_arg(v, f"{name}._args_", recursive) for v in config.get("_args_", ())]
    kwargs = {k: _hydra_arg(v, f"{name}.{k}", recursive) for k, v in config.items() if k not in HYDRA_KEYS}
    if config.get("_partial_", False):
        return functools.partial(target, *args, **kwargs)
    return target(*args, **kwargs)


def _resolve(target: object, name: str) -> Callable[..., Any]:
    obj = locate(target, name) if isinstance(target, str) else target
    if not callable(obj):
        raise TypeError(f"{name}: target must be a dotted path or a callable, got {target!r}")
    return obj


def _hydra_arg(value: Any, name: str, recursive: bool) -> Any:
    if not recursive:
        return value
    if is_config(value):
        return instantiate(value, name)
    if isinstance(value, Mapping):
        return {k: _hydra_arg(v, f"{name}.{k}", recursive) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):  # OmegaConf ListConfig too
        return [_hydra_arg(v, f"{name}[{i}]", recursive) for i, v in enumerate(value)]
    return value


def _lazy_arg(value: Any, name: str) -> Any:
    if not (isinstance(value, Mapping) and LAZY_TARGET in value):
        return value
    target = _resolve(value[LAZY_TARGET], name)
    if inspect.isclass(target) and issubclass(target, nn.Module):
        return copy.deepcopy(value)  # nvSubquadratic: module configs reach their parent unbuilt, as copies
    return instantiate(value, name)


def build_module(spec: ModuleSpec, name: str) -> nn.Module:
    """An ``nn.Module`` as given, from a zero-argument factory, or from a config (see ``instantiate``).

    A factory that returns a config is instantiated too: an uncalled nvSubquadratic ``LazyConfig(cls)``
    is such a factory.
    """
    if isinstance(spec, nn.Module):
        module = spec
    elif isinstance(spec, Mapping):
        if not is_config(spec):
            raise TypeError(
                f"{name} config must have a '_target_' (hydra) or '__target__' (nvSubquadratic LazyConfig) "
                f"key, got keys {sorted(spec)}"
            )
        module = instantiate(spec, name)
    elif callable(spec):
        module = spec()
        if is_config(module):
            module = instantiate(module, name)
    else:
        raise TypeError(
            f"{name} must be an nn.Module, a zero-argument factory or a '_target_'/'__target__' config, "
            f"got {spec!r}"
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
    """Whether ``module.forward`` can take ``conditioning=``: a parameter of that name, or ``**kwargs``.

    nvSubquadratic's ``QKVSequenceMixer.forward(x, cp_group=None, **mixer_kwargs)`` takes it through
    ``**kwargs`` and hands it to its inner mixer.
    """
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # no introspectable signature (a builtin forward)
        return False
    param = params.get("conditioning")
    if param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
        return True
    return any(p.kind == p.VAR_KEYWORD for p in params.values())


def _check_output(y: Tensor, shape: torch.Size, name: str) -> Tensor:
    if not isinstance(y, Tensor) or y.shape != shape:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{name} must return its input's shape {tuple(shape)}, got {got}")
    return y


def _one_of(ours: ModuleSpec | None, theirs: ModuleSpec | None, name: str) -> ModuleSpec:
    """The spec given under our name or nvSubquadratic's ``<name>_cfg``; exactly one is required."""
    if ours is not None and theirs is not None:
        raise TypeError(f"pass {name} or {name}_cfg (nvSubquadratic's name), not both")
    if ours is None and theirs is None:
        raise TypeError(f"{name} is required (nvSubquadratic's name: {name}_cfg)")
    return ours if theirs is None else theirs


class AdaLNZeroResidualBlock(nn.Module):
    """Pre-norm residual block with AdaLN-Zero conditioning; nvSubquadratic ``AdaLNZeroResidualBlock``.

    Forward computation (nvSubquadratic ``residual_block.py``)::

        cond = condition_norm(mean(condition over all non-batch, non-channel axes))     # (B, C)
        shift_seq, scale_seq, gate_seq, shift_mlp, scale_mlp, gate_mlp = condition_proj(cond).chunk(6)
        x = x + dropout(sequence_mixer(sequence_norm(x) * (1 + scale_seq) + shift_seq,
                                       conditioning=cond)) * gate_seq
        x = x + dropout(mlp(mlp_norm(x) * (1 + scale_mlp) + shift_mlp)) * gate_mlp

    ``condition_proj`` = SiLU -> Linear(C, 6C) with zero weights and bias (``adaln_zero``), so at
    initialisation every gate is 0 and the block is exactly the identity.

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
    film                    FiLM-style mixer conditioning, ``conditioning=cond`` (see below)
    ======================  ==========================================================================

    Each of the first six is an ``nn.Module``, a zero-argument factory or a config (``instantiate``):
    a hydra ``_target_`` mapping or an nvSubquadratic ``LazyConfig`` (``__target__``). nvSubquadratic's
    keyword names are accepted as aliases, so its configs build this block unchanged:
    ``sequence_mixer_cfg`` -> ``sequence_mixer``, ``sequence_mixer_norm_cfg`` -> ``sequence_mixer_norm``,
    ``mlp_cfg`` -> ``mlp``, ``mlp_norm_cfg`` -> ``mlp_norm``, ``condition_norm_cfg`` ->
    ``condition_norm``, ``dropout_cfg`` -> ``dropout`` (``hidden_dim`` is the same); each slot takes
    exactly one of its two names. ``forward(x, condition)``: x (B, *spatial, C); condition (B, C) or
    (B, *spatial_cond, C) with at least one token (any token layout, mean-pooled). Parameters of the
    three norms are tagged ``_no_weight_decay`` as in the source.

    ``film`` says whether FiLM-style conditioning is requested, i.e. whether the mixer receives
    ``conditioning=cond``: ``None`` (default) passes it whenever the mixer's ``forward`` can take it (a
    ``conditioning`` parameter or ``**kwargs``, as nvSubquadratic's ``QKVSequenceMixer``) and calls
    ``mixer(x)`` otherwise (e.g. ``Attention``); ``True`` requires it, and a mixer that cannot take it
    is a ``ValueError`` at construction; ``False`` never passes it (e.g. a ``Hyena`` built without
    ``cond_dim``, which declares ``conditioning`` but rejects it).

    We differ from the source in these checks: sub-modules whose channel count is readable (LayerNorm,
    RMSNorm, Linear, Mlp, Attention, Sequential of those) must match ``hidden_dim`` at construction,
    every branch output must have x's shape at forward (the source fails deep inside a matmul), a
    condition with zero tokens is an error (the source's mean over nothing is NaN), and a mixer that
    cannot take ``conditioning`` is called without it unless ``film=True`` (the source always passes it).
    Norms that are ``nn.LayerNorm`` / ``nn.RMSNorm`` go through ``adaln.functional.norm_modulate``
    (the fused kernel's entry point); any other norm through ``modulate(norm(x), ...)``.
    """

    def __init__(
        self,
        sequence_mixer: ModuleSpec | None = None,
        sequence_mixer_norm: ModuleSpec | None = None,
        mlp: ModuleSpec | None = None,
        mlp_norm: ModuleSpec | None = None,
        condition_norm: ModuleSpec | None = None,
        dropout: ModuleSpec | None = None,
        hidden_dim: int | None = None,
        *,
        film: bool | None = None,
        sequence_mixer_cfg: ModuleSpec | None = None,
        sequence_mixer_norm_cfg: ModuleSpec | None = None,
        mlp_cfg: ModuleSpec | None = None,
        mlp_norm_cfg: ModuleSpec | None = None,
        condition_norm_cfg: ModuleSpec | None = None,
        dropout_cfg: ModuleSpec | None = None,
    ) -> None:
        super().__init__()
        if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ValueError(f"hidden_dim must be a positive int, got {hidden_dim!r}")
        if film is not None and not isinstance(film, bool):
            raise TypeError(f"film must be None, True or False, got {film!r}")
        self.hidden_dim = hidden_dim
        given = {
            "sequence_mixer": (sequence_mixer, sequence_mixer_cfg),
            "sequence_mixer_norm": (sequence_mixer_norm, sequence_mixer_norm_cfg),
            "mlp": (mlp, mlp_cfg),
            "mlp_norm": (mlp_norm, mlp_norm_cfg),
            "condition_norm": (condition_norm, condition_norm_cfg),
            "dropout": (dropout, dropout_cfg),
        }
        built = {name: build_module(_one_of(*specs, name), name) for name, specs in given.items()}
        self.sequence_mixer, self.sequence_norm = built["sequence_mixer"], built["sequence_mixer_norm"]
        self.mlp, self.mlp_norm = built["mlp"], built["mlp_norm"]
        self.condition_norm, self.dropout = built["condition_norm"], built["dropout"]
        self.condition_proj = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 6 * hidden_dim))
        self._check_channels()
        for norm in (self.sequence_norm, self.mlp_norm, self.condition_norm):
            for p in norm.parameters():
                p._no_weight_decay = True
        accepts = accepts_conditioning(self.sequence_mixer)
        if film and not accepts:
            mixer = type(self.sequence_mixer).__name__
            raise ValueError(
                f"film=True needs a sequence_mixer whose forward takes conditioning= (a parameter of that "
                f"name or **kwargs); {mixer}.forward takes neither"
            )
        self.mixer_takes_conditioning = accepts if film is None else film
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
            if math.prod(condition.shape[1:-1]) == 0:
                raise ValueError(
                    f"condition must have at least one token to mean-pool, got shape {tuple(condition.shape)}"
                )
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
    ``mlp_norm_eps`` is the MLP branch's LayerNorm eps: diffusers' ``BasicTransformerBlock``
    (``norm_type="ada_norm_zero"``) takes it from its config's ``norm_eps`` (``norm3``, class default 1e-5)
    while its attention-branch norm keeps 1e-6; fb uses 1e-6 for both.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        qk_norm: str | None = None,
        mlp_norm_eps: float = 1e-6,
        **block_kwargs: float,
    ) -> None:
        super().__init__()
        self.hidden_size, self.mlp_norm_eps = hidden_size, mlp_norm_eps
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm, **block_kwargs)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act="gelu_tanh")
        self.adaLN_modulation = AdaLNZero(hidden_size, hidden_size, branches=2)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        _check_x_c(x, c, self.hidden_size)
        ada = self.adaLN_modulation
        (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = ada(c)
        x = ada.residual(x, self.attn(ada.modulate(x, shift_msa, scale_msa)), gate_msa)
        h = norm_modulate(x, shift_mlp, scale_mlp, norm="layer", eps=self.mlp_norm_eps)
        return ada.residual(x, self.mlp(h), gate_mlp)


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
