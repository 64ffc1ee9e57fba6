"""Exponential moving average of model weights, and the wrapper-free names both EMA and checkpoints use.

Convention (facebookresearch/DiT train.py, ``update_ema``): the average starts equal to the model, then
after every optimizer step

    shadow <- decay * shadow + (1 - decay) * weight,    decay = 0.9999.

We differ in three documented ways: buffers are averaged too (names come from ``state_dict()``, so a
fixed ``pos_embed`` buffer is covered; integer buffers such as BatchNorm's ``num_batches_tracked`` are
copied, not averaged); the shadow is float32 even for bf16/fp16 models (float64 stays float64), since a
0.9999 decay needs more than bf16's 8 mantissa bits; and ``warmup=True`` optionally uses
``min(decay, (1 + n) / (10 + n))`` for the n-th update (n = 0, 1, ...), which lets short runs average over
a window that grows with training instead of being dominated by the initial weights.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

# Components that wrappers insert into parameter names: torch.compile, FSDP, activation checkpointing.
WRAPPER_COMPONENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def canonical_name(name: str) -> str:
    """Drop wrapper components from a state_dict key: leading ``module.`` and any ``_orig_mod.``-like part."""
    parts = name.split(".")
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(p for p in parts if p not in WRAPPER_COMPONENTS)


def canonical_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``state_dict()`` of the unwrapped model with wrapper-free names (tensors share the model's storage)."""
    out: dict[str, Tensor] = {}
    for name, value in unwrap_model(model).state_dict(keep_vars=False).items():
        if not isinstance(value, Tensor):
            continue
        key = canonical_name(name)
        if key in out:
            raise ValueError(f"two state_dict entries map to the same name {key!r} after removing wrappers")
        out[key] = value
    return out


class EMA:
    """float32 moving average of every parameter and buffer of ``model`` (fb DiT's ``update_ema``)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, warmup: bool = False):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be a float in [0, 1], got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self._model = unwrap_model(model)
        with torch.no_grad():
            self.shadow = {name: _shadow_copy(t) for name, t in canonical_state_dict(model).items()}

    def current_decay(self) -> float:
        """Decay used by the next ``update``: ``decay``, or ``min(decay, (1 + n) / (10 + n))`` with warmup."""
        if self.warmup:
            return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step: ``shadow <- decay * shadow + (1 - decay) * weight`` for every floating entry."""
        state = self._matching_state(model, "model")
        weight = 1.0 - self.current_decay()
        floats = [n for n, s in self.shadow.items() if s.is_floating_point()]
        if floats:
            # lerp(s, w, 1 - d) = s + (1 - d)(w - s) = d s + (1 - d) w, fused over the tensor list.
            torch._foreach_lerp_(
                [_local(self.shadow[n]) for n in floats],
                [_local(state[n]).detach().to(self.shadow[n].device, self.shadow[n].dtype) for n in floats],
                weight,
            )
        for name, s in self.shadow.items():
            if not s.is_floating_point():
                _local(s).copy_(_local(state[name]))
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters and buffers with the averages (cast to the model's dtypes)."""
        for name, t in self._matching_state(model, "model").items():
            t.copy_(self.shadow[name])

    def module(self, model: nn.Module | None = None) -> nn.Module:
        """A deep copy of ``model`` (default: the one given at construction) holding the EMA weights, in
        eval mode with gradients off, for sampling."""
        source = self._model if model is None else unwrap_model(model)
        clone = copy.deepcopy(source)
        for p in clone.parameters():
            p.grad = None
        self.copy_to(clone)
        return clone.eval().requires_grad_(False)

    def state_dict(self) -> dict[str, object]:
        """``{"shadow": {name: tensor}, "num_updates": int, "decay": float, "warmup": bool}``."""
        return {
            "shadow": dict(self.shadow),
            "num_updates": self.num_updates,
            "decay": self.decay,
            "warmup": self.warmup,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore the averages and the update count; ``decay``/``warmup`` stay as constructed."""
        shadow = state.get("shadow") if isinstance(state, dict) else None
        if not isinstance(shadow, dict):
            raise TypeError("state must be a dict with a 'shadow' dict of tensors, as returned by state_dict()")
        check_state_dict_match(self.shadow, shadow, what="EMA state")
        for name, t in shadow.items():
            self.shadow[name].copy_(t)
        self.num_updates = int(state.get("num_updates", 0))

    def _matching_state(self, model: nn.Module, arg: str) -> dict[str, Tensor]:
        state = canonical_state_dict(model)
        check_state_dict_match(self.shadow, state, what=f"{arg} (compared with the EMA)")
        return state


def check_state_dict_match(expected: dict[str, Tensor], given: dict[str, Tensor], *, what: str) -> None:
    """Raise ``ValueError`` naming missing / unexpected keys and shape mismatches between two state dicts."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(given[k].shape)}"
        for k in set(expected) & set(given)
        if tuple(expected[k].shape) != tuple(given[k].shape)
    )
    problems = [
        f"{label} {_first(items)}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if items
    ]
    if problems:
        raise ValueError(f"{what} does not match: " + "; ".join(problems))


def _first(items: list[str], n: int = 10) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)})"


def _local(t: Tensor) -> Tensor:
    # FSDP2 shards parameters as DTensors (the tensors with ``to_local``); the shadow is sharded alike, so
    # each rank averages its own shard.
    return t.to_local() if hasattr(t, "to_local") else t


def _shadow_copy(t: Tensor) -> Tensor:
    # Low-precision floats are averaged in float32; float64 and non-float entries keep their dtype.
    dtype = torch.float32 if t.is_floating_point() and t.dtype != torch.float64 else t.dtype
    return t.detach().to(dtype=dtype, copy=True)
