"""Official AlphaFold3 parameter layout: load into and export from our modules.

The official parameters are a flat mapping ``'{haiku module name}/{param name}' -> array``. Haiku
weights are ``(in, out)`` (with multi-dim outputs such as ``(C, H, d)``); ``torch.nn.Linear`` weights are
``(out, in)``. Blocks built with ``hk.experimental.layer_stack`` store each parameter once, stacked
along leading layer axes, under ``.../__layer_stack_with_per_layer/...``.

Each module describes its parameters with ``_af3_entries(prefix) -> {official name: Entry}``; the two
public functions below only walk that table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

LAYER_STACK = "__layer_stack_with_per_layer"


@dataclass(frozen=True)
class Entry:
    """One official array: its shape and how to read/write it from our parameters (official layout)."""

    shape: tuple[int, ...]
    read: Callable[[], Tensor]
    write: Callable[[Tensor], None]


def _assign(p: Tensor) -> Callable[[Tensor], None]:
    def write(value: Tensor) -> None:
        with torch.no_grad():
            p.copy_(value.reshape(p.shape).to(p.dtype))

    return write


def linear_entries(
    name: str,
    linear: nn.Linear,
    in_shape: tuple[int, ...] | None = None,
    out_shape: tuple[int, ...] | None = None,
) -> dict[str, Entry]:
    """``{name}/weights`` of shape ``in_shape + out_shape`` (and ``{name}/bias`` of ``out_shape``)."""
    in_shape = in_shape or (linear.in_features,)
    out_shape = out_shape or (linear.out_features,)
    w = linear.weight
    entries = {
        f"{name}/weights": Entry(
            in_shape + out_shape,
            lambda: w.detach().t().reshape(in_shape + out_shape),
            lambda v: _assign(w)(v.reshape(math.prod(in_shape), math.prod(out_shape)).t()),
        )
    }
    if linear.bias is not None:
        b = linear.bias
        entries[f"{name}/bias"] = Entry(out_shape, lambda: b.detach().reshape(out_shape), _assign(b))
    return entries


def norm_entries(name: str, norm: nn.LayerNorm) -> dict[str, Entry]:
    """``hm.LayerNorm``: ``{name}/scale`` and, when it has one, ``{name}/offset``."""
    entries = {}
    for key, p in (("scale", norm.weight), ("offset", norm.bias)):
        if p is not None:
            entries[f"{name}/{key}"] = Entry(tuple(p.shape), lambda p=p: p.detach(), _assign(p))
    return entries


def adaptive_layernorm_entries(module: nn.Module, name: str) -> dict[str, Entry]:
    """``adaptive_layernorm(x, single_cond, name)`` of diffusion_transformer.py."""
    if getattr(module, "single_cond_layer_norm", None) is None:
        return norm_entries(f"{name}layer_norm", module.layer_norm)
    return {
        **norm_entries(f"{name}single_cond_layer_norm", module.single_cond_layer_norm),
        **linear_entries(f"{name}single_cond_scale", module.single_cond_scale),
        **linear_entries(f"{name}single_cond_bias", module.single_cond_bias),
    }


def adaptive_zero_init_entries(module: nn.Module, name: str) -> dict[str, Entry]:
    """``adaptive_zero_init(x, num_channels, single_cond, global_config, name)``."""
    entries = linear_entries(f"{name}transition2", module.transition2)
    if getattr(module, "adaptive_zero_cond", None) is not None:
        entries.update(linear_entries(f"{name}adaptive_zero_cond", module.adaptive_zero_cond))
    return entries


def stack_entries(layers: list[dict[str, Entry]], leading: tuple[int, ...], prefix: str) -> dict[str, Entry]:
    """Stack per-layer tables (same keys, row-major over ``leading``) as ``layer_stack`` does."""
    if len(layers) != math.prod(leading):
        raise ValueError(f"{len(layers)} layers cannot fill layer-stack axes {leading}")
    stacked = {}
    for key, first in layers[0].items():
        parts = [layer[key] for layer in layers]

        def read(parts=parts, shape=first.shape):
            return torch.stack([e.read() for e in parts]).reshape(leading + shape)

        def write(v, parts=parts, shape=first.shape):
            for e, part in zip(parts, v.reshape((-1,) + shape)):
                e.write(part)

        stacked[f"{prefix}{key}"] = Entry(leading + first.shape, read, write)
    return stacked


def checked_tensor(value: object) -> Tensor | str:
    """``value`` as a tensor, or why it cannot be loaded (not numeric, not finite)."""
    if isinstance(value, Tensor):
        t = value.detach()
        if t.is_complex() or t.dtype == torch.bool:
            return f"dtype {t.dtype} is not a real number type"
    else:
        array = np.asarray(value)
        if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16 (official checkpoints): torch cannot wrap it
            array = array.astype(np.float32)
        elif array.dtype.kind not in "iuf":
            return f"dtype {array.dtype} is not a real number type"
        t = torch.as_tensor(array)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        return "holds NaN or infinite values"
    return t


def _shape(value: object) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, Tensor) else tuple(np.shape(value))


def _entries(module: nn.Module, prefix: str) -> dict[str, Entry]:
    if not hasattr(module, "_af3_entries"):
        raise TypeError(f"module must be an adaln.models.af3 module, got {type(module).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    return module._af3_entries(prefix)


def _candidates(module: nn.Module, params: Mapping[str, object], prefix: str) -> set[str]:
    # Modules that are haiku scopes own '{prefix}/...'; name-prefixed functions own '{prefix}...'.
    start = f"{prefix}/" if getattr(module, "_af3_scoped", False) else prefix
    return {k for k in params if k.startswith(start)}


def load_alphafold3_params(
    module: nn.Module, params: Mapping[str, object], prefix: str, *, strict: bool = True
) -> None:
    """Copy official AlphaFold3 parameters into ``module`` (in place).

    params: ``{'{haiku module name}/{param name}': array}`` (numpy or torch) in the official layout;
    prefix: the name (or scope) the official function/module was called with, e.g. ``'p_'`` for
    ``transition_block(..., name='p_')``, ``'transformer'`` or ``'diffusion_head/transformer'`` for the
    diffusion transformer, ``'diffuser/~/diffusion_head'`` for the diffusion module of the released
    checkpoints. With a partial module loaded from a full dump use ``strict=False``. Raises one ``ValueError``
    listing every missing, unexpected (``strict`` only: keys under ``prefix`` we do not use), mis-shaped
    and unusable (not a real number type, or holding NaN / infinite values) key; everything is checked
    before anything is copied, so after an error the module is unchanged.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of name -> array, got {type(params).__name__}")
    entries = _entries(module, prefix)
    ignored = set(getattr(module, "_af3_ignored", lambda p: ())(prefix))
    missing = sorted(k for k in entries if k not in params)
    unexpected = sorted(_candidates(module, params, prefix) - entries.keys() - ignored) if strict else []
    misshaped = sorted(
        f"{k}: expected {e.shape}, got {_shape(params[k])}"
        for k, e in entries.items()
        if k in params and _shape(params[k]) != e.shape
    )
    shaped = [k for k, e in entries.items() if k in params and _shape(params[k]) == e.shape]
    values = {k: checked_tensor(params[k]) for k in shaped}
    unusable = sorted(f"{k}: {v}" for k, v in values.items() if isinstance(v, str))
    if missing or unexpected or misshaped or unusable:
        lines = [f"cannot load AlphaFold3 parameters into {type(module).__name__} (prefix {prefix!r}):"]
        for title, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
            ("unusable", unusable),
        ):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        raise ValueError("\n".join(lines))
    for k, e in entries.items():
        e.write(values[k])


def export_alphafold3_params(module: nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """The inverse of :func:`load_alphafold3_params`: our parameters in the official names and layout.

    Arrays keep the parameter dtype; bf16 becomes float32 (numpy has no bfloat16).
    """
    out = {}
    for k, e in _entries(module, prefix).items():
        t = e.read()
        if t.dtype == torch.bfloat16:
            t = t.float()
        out[k] = t.cpu().numpy().copy()
    return out
