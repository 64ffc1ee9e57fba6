"""State-dict layout checks shared by the converted models (DiT, PixArt, Lumina 2, Z-Image, Flux, MMDiT).

Every converter checks a foreign state dict against the keys and shapes it expects before anything loads,
and reports every problem at once: one ``ValueError`` listing the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor


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
