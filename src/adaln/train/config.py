"""Run configuration: small dataclasses, filled from a preset or YAML file with OmegaConf.

A preset is ``src/adaln/presets/NAME.yaml``; a file is any YAML with the same keys. Unknown keys are an
error (OmegaConf struct mode), so a typo never silently trains the default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A preset, config file or override that cannot be used."""


@dataclass
class DataConfig:
    name: str = "digits"  # "digits" (scikit-learn's bundled 8x8 digits) or "image_folder"
    root: str | None = None  # image_folder: one sub-folder per class
    image_size: int = 8
    mode: str = "L"  # image_folder: "L" (1 channel) or "RGB"
    heldout_fraction: float = 0.2


@dataclass
class ModelConfig:
    mixer: str = "attention"  # "attention": DiT; "hyena": AdaLN-Zero residual network with Hyena
    patch_size: int = 2
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1


@dataclass
class SampleConfig:
    cfg: float = 1.5  # default classifier-free guidance scale
    steps: int = 32
    sampler: str = "heun"
    per_class: int = 100  # eval: samples per class


@dataclass
class TrainConfig:
    name: str = "digits"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay min(ema_decay, (1+n)/(10+n)): short runs aren't dominated by the init
    sigma_data: float = 0.5  # images scaled to [-1, 1]
    p_mean: float = -1.2  # EDM log-normal training sigmas
    p_std: float = 1.2
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 50
    seed: int = 0
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("adaln.presets").iterdir() if p.name.endswith(".yaml"))


def load_config(source: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Build a ``TrainConfig`` from a preset name or a YAML path, then dotted ``overrides``.

    Raises ``ConfigError`` for an unknown preset, a missing file or an unknown/mistyped key.
    """
    schema = OmegaConf.structured(TrainConfig)
    source = source or "digits"
    if source.endswith((".yaml", ".yml")):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {source}")
        text = path.read_text()
    elif source in preset_names():
        text = resources.files("adaln.presets").joinpath(f"{source}.yaml").read_text()
    else:
        raise ConfigError(f"unknown preset {source!r}; choose one of {preset_names()} or pass a .yaml file")
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(text))
        for key, value in (overrides or {}).items():
            if value is not None:
                OmegaConf.update(merged, key, value, merge=False)
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"invalid config {source!r}: {str(e).splitlines()[0]}") from None


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a ``TrainConfig`` saved with ``to_dict`` (e.g. from a checkpoint's state.json)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), d))
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid saved config: {str(e).splitlines()[0]}") from None
