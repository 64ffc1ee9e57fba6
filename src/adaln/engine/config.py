"""One config schema and loader for every task: dataclasses with range-checked fields, read with OmegaConf.

A config is a preset (``src/adaln/presets/NAME.yaml``) or a YAML file; its ``task:`` key chooses the
task, whose dataclass (a subclass of ``RunConfig``) is the schema. ``key=value`` overrides (``--set``)
address any field by its dotted path. Unknown keys, wrong types and out-of-range values are a
``ConfigError`` naming the key. The top-level keys of ``RunConfig`` mean the same for every task.

Ranges live beside each field (``option(default, ge=1)``), so one validator checks every task's config.
Fields marked ``resumable`` (and every field under a resumable section) may change when a run resumes;
any other change on resume is refused, because it would make the resumed run a different run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from adaln.errors import ConfigError


def option(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | None = None,
    resumable: bool = False,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its allowed range (None values skip the range) and resume rule."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices).items() if v is not None}
    meta["resumable"] = resumable
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """The keys every task shares (the engine reads these; each task adds its own sections)."""

    task: str = ""
    name: str = ""
    steps: int = option(1000, ge=1, resumable=True)  # optimizer steps of the whole run
    batch_size: int = option(128, ge=1)  # global batch (split over the processes when distributed)
    lr: float = option(1e-3, gt=0)
    lr_schedule: str = option("constant", choices=("constant", "cosine"))
    lr_final_fraction: float = option(0.1, ge=0, le=1)  # cosine: decays to lr * this at `steps`
    warmup_steps: int = option(100, ge=0)  # linear warm-up from lr / warmup_steps
    weight_decay: float = option(0.0, ge=0)
    grad_clip: float = option(1.0, gt=0)  # max gradient norm
    ema_decay: float = option(0.999, ge=0, le=1)
    ema_warmup: bool = True  # decay min(ema_decay, (1+n)/(10+n)): short runs aren't dominated by the init
    checkpoint_every: int = option(1000, ge=1, resumable=True)
    keep_last: int = option(3, ge=1, resumable=True)
    log_every: int = option(50, ge=1, resumable=True)
    seed: int = option(0, ge=0)
    device: str = option("auto", resumable=True)  # auto, cpu, cuda or cuda:N
    threads: int | None = option(None, ge=1, resumable=True)  # torch CPU threads (None: torch's default)


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("adaln.presets").iterdir() if p.name.endswith(".yaml"))


def read_source(source: str) -> tuple[dict[str, Any], str]:
    """The mapping of a preset name or a ``.yaml`` file, and how to name it in messages."""
    if not isinstance(source, str) or not source:
        raise ConfigError(f"--config must be a preset ({', '.join(preset_names())}) or a .yaml file, got {source!r}")
    if source.endswith((".yaml", ".yml")):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {source}")
        text, label = path.read_text(), str(path)
    elif source in preset_names():
        text, label = resources.files("adaln.presets").joinpath(f"{source}.yaml").read_text(), f"preset {source}"
    else:
        raise ConfigError(f"unknown preset {source!r}; choose one of {preset_names()} or pass a .yaml file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{label} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        raise ConfigError(f"{label} is empty: a config needs at least `task:` (see adaln config show PRESET)")
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must be a YAML mapping of keys, got {type(data).__name__}")
    return data, label


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}``; values are parsed as YAML (numbers, null, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set takes key=value (e.g. --set steps=200), got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            out[key.strip()] = text
    return out


def build_config(schema: type, data: Mapping[str, Any], overrides: Mapping[str, Any], label: str) -> Any:
    """``schema`` filled from ``data`` then dotted ``overrides``, type-checked and range-checked."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), dict(data))
        for key, value in overrides.items():
            OmegaConf.update(merged, key, value, merge=False)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        message = str(e).splitlines()[0]
        if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and " not in " in message:
            raise ConfigError(f"{label}: unknown key {key!r} (adaln config show PRESET lists the keys)") from None
        raise ConfigError(f"{label}: {key + ': ' if key else ''}{message}") from None
    validate(cfg, label)
    return cfg


def validate(cfg: Any, label: str = "config", prefix: str = "") -> None:
    """Check every field of a config dataclass against its ``option`` range; ConfigError naming the key."""
    for f in fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if is_dataclass(value):
            validate(value, label, key + ".")
            continue
        if value is None or isinstance(value, (bool, str)):
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                raise ConfigError(f"{label}: {key} must be one of {f.metadata['choices']}, got {value!r}")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{label}: {key} must be finite, got {value}")
        m = f.metadata
        for bound, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                                ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
            if bound in m and isinstance(value, (int, float)) and not ok(value, m[bound]):
                raise ConfigError(f"{label}: {key} must be {word} {m[bound]:g}, got {value}")
        if "choices" in m and value not in m["choices"]:
            raise ConfigError(f"{label}: {key} must be one of {m['choices']}, got {value!r}")


def resumable_keys(schema: type, prefix: str = "", inherited: bool = False) -> set[str]:
    """Dotted keys that may change on resume (a resumable section makes all its fields resumable)."""
    out = set()
    for f in fields(schema):
        free = inherited or f.metadata.get("resumable", False)
        kind = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if isinstance(kind, type) and is_dataclass(kind):
            out |= resumable_keys(kind, prefix + f.name + ".", free)
        elif free:
            out.add(prefix + f.name)
    return out


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(schema: type, saved: Any, wanted: Any) -> list[str]:
    """Dotted keys whose value differs between two configs of ``schema`` and may not change on resume."""
    a, b = flatten(dataclasses.asdict(saved)), flatten(dataclasses.asdict(wanted))
    free = resumable_keys(schema)
    return [k for k in a if a[k] != b.get(k) and k not in free]


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (what ``adaln config show`` prints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

