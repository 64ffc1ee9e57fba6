"""State-dict layout checks shared by the converted models (DiT, PixArt, Lumina 2, Z-Image, Flux, MMDiT).

Every converter checks a foreign state dict against the keys and shapes it expects before anything loads,
and reports every problem at once: one ``ValueError`` listing the missing, unexpected and mis-shaped keys.
``build_empty`` builds the model a converter is about to fill without initialising (or even allocating in
float32) the parameters it will overwrite. A layout given as a table of ``Row``s (Lumina 2, Z-Image)
converts both ways with ``export_layout`` and ``import_layout``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def check_state_dict(sd: object) -> None:
    """``TypeError`` unless ``sd`` is a mapping of names to tensors."""
    if not isinstance(sd, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(sd).__name__}")
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"state_dict values must be tensors; not tensors: {bad}")


def check_layout(
    sd: object,
    expected: Mapping[str, Tensor | Sequence[int]],
    source: str,
    *,
    target: str = "this model",
    rename: Callable[[str], str] | None = None,
    summary: Callable[[Mapping[str, Tensor]], str] | None = None,
) -> None:
    """One ValueError naming every missing, unexpected and mis-shaped key of ``sd``.

    ``expected``: key -> tensor (or shape); ``source`` names the layout (``"diffusers SD3Transformer2DModel"``),
    ``target`` what it must fit (``"this MMDiT"``); ``rename`` maps the keys to the names shown (default: as
    they are); ``summary``, when given, adds the sizes it reads from ``sd`` and from the expected tensors.
    """
    check_state_dict(sd)
    name = rename or (lambda k: k)
    shape = {k: tuple(v.shape) if isinstance(v, Tensor) else tuple(v) for k, v in expected.items()}
    missing = [name(k) for k in expected if k not in sd]
    unexpected = [name(k) for k in sd if k not in expected]
    shapes = [
        f"{name(k)}: got {tuple(v.shape)}, expected {shape[k]}"
        for k, v in sd.items()
        if k in shape and tuple(v.shape) != shape[k]
    ]
    if missing or unexpected or shapes:
        found = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        lines = [f"state dict: {summary(sd)}", f"model:      {summary(expected)}"] if summary else []
        lines += [f"{what} ({len(items)}): {items}" for what, items in found if items]
        raise ValueError(f"{source} state dict does not fit {target}:\n  " + "\n  ".join(lines))


def rename_key(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    """``key`` after each ``(pattern, replacement)`` regex substitution of ``rules``, in order."""
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key



def block_count(sd: Mapping[str, object], prefix: str, *, minimum: int = 0) -> int:
    """How many blocks ``prefix.N.*`` the keys of ``sd`` name; ``ValueError`` unless the indices run
    0..N-1 with N >= ``minimum``."""
    found = {int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    if len(found) < minimum or found != set(range(len(found))):
        at_least = f" (N >= {minimum})" if minimum else ""
        raise ValueError(f"{prefix} indices must run 0..N-1{at_least}, got {sorted(found)}")
    return len(found)

# A row: (our key, their key(s), split sizes). Several keys: our tensor is theirs concatenated along dim 0
# with those sizes (a fused qkv <-> to_q / to_k / to_v).
Row = tuple[str, tuple[str, ...], tuple[int, ...]]


def linear_rows(ours: str, theirs: str) -> list[Row]:
    """The weight and bias rows of one Linear named ``ours`` here and ``theirs`` in the other layout."""
    return [(f"{ours}.{s}", (f"{theirs}.{s}",), ()) for s in ("weight", "bias")]


def export_layout(sd: Mapping[str, Tensor], rows: list[Row], source: str) -> dict[str, Tensor]:
    """Our state dict -> the rows' layout; every key of ``sd`` must be covered by a row."""
    out: dict[str, Tensor] = {}
    for ours, theirs, split in rows:
        if ours not in sd:
            raise ValueError(f"{source} state dict lacks {ours!r}")
        parts = sd[ours].split(list(split), dim=0) if len(theirs) > 1 else (sd[ours],)
        out.update(zip(theirs, parts))
    unused = sorted(set(sd) - {ours for ours, _, _ in rows})
    if unused:
        raise ValueError(f"{source} state dict has keys no layout row covers: {unused}")
    return out


def import_layout(sd: Mapping[str, Tensor], rows: list[Row]) -> dict[str, Tensor]:
    """The rows' layout -> our state dict (keys and shapes already checked by ``check_layout``)."""
    return {ours: sd[theirs[0]] if len(theirs) == 1 else torch.cat([sd[k] for k in theirs]) for ours, theirs, _ in rows}


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Inside: every parameter a module registers lands on the meta device (no memory, and the init that
    follows is a no-op); buffers are built as usual. Not thread-safe (it patches ``nn.Module``)."""
    register = nn.Module.register_parameter

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_empty(factory: Callable[[], nn.Module], like: Tensor) -> nn.Module:
    """``factory()`` with uninitialised parameters in ``like``'s dtype on its device, for a converter that
    loads every parameter next (strictly). Buffers are computed as usual (float32, as ``factory`` makes
    them) and then cast and moved like the parameters, so a model converted in bfloat16 never holds a
    float32 copy of its weights and skips their random init; a parameter shared by two modules stays shared.
    """
    with _parameters_on_meta():
        model = factory()
    model.to(like.dtype)  # floating buffers are cast; the meta parameters change dtype for free
    empty: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                if id(param) not in empty:
                    data = torch.empty_like(param, device=like.device)
                    empty[id(param)] = nn.Parameter(data, requires_grad=param.requires_grad)
                module._parameters[name] = empty[id(param)]
    return model.to(like.device)
