"""The Task protocol: what a job supplies to the engine (training) and to ``adaln sample`` / ``eval``.

A task is a class with a config schema (``config``, a ``RunConfig`` subclass) and

- training: ``__init__(cfg, device, progress)`` loads the data once; ``info()`` the JSON facts of the
  data the model is built for (saved with every checkpoint); ``build_model()``; ``batch(step)`` the
  global batch's data set indices; ``loss(net, step, indices, rank)``;
- inference, on a ``TrainedRun``: ``sample(run, options)`` and ``evaluate(run, options)``, each
  writing its outputs and returning the lines to print. ``sample_options`` / ``eval_options`` name the
  command-line options the task takes; any other given option is an error naming it.

The engine owns the loop, seeding, checkpoints and the run directory; a task never touches them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from adaln.engine.checkpoint import STATE_FILE, CheckpointError, list_checkpoints, load_checkpoint, read_state
from adaln.engine.config import RunConfig, build_config
from adaln.engine.ema import EMA
from adaln.engine.loop import resolve_device
from adaln.engine.seeding import epoch_batch
from adaln.errors import ConfigError

COMMON_OPTIONS = {"sample": ("n", "seed", "device", "no_ema", "output", "steps"), "eval": ("n", "seed", "device", "steps")}


class Task:
    name: ClassVar[str]
    config: ClassVar[type[RunConfig]]
    sample_options: ClassVar[tuple[str, ...]] = ()
    eval_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: RunConfig, device: torch.device, *, progress: bool = True):
        self.cfg, self.device, self.progress = cfg, device, progress

    # ---- training ----------------------------------------------------------------------------------
    num_examples: int

    def info(self) -> dict[str, Any]:
        return {}

    def build_model(self) -> nn.Module:
        return self.model_from(self.cfg, self.info())

    def batch(self, step: int) -> Tensor:
        return epoch_batch(self.num_examples, self.cfg.batch_size, self.cfg.seed, step)

    def loss(self, net: nn.Module, step: int, indices: Tensor, rank: int) -> Tensor:
        raise NotImplementedError

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        """The blocks FSDP2 shards one by one: the members of the model's top-level ModuleLists (DiT's
        ``blocks``, MMDiT's ``joint_blocks``, Flux's double and single blocks, ...)."""
        return [block for child in model.children() if isinstance(child, nn.ModuleList) for block in child]

    # ---- shared by training and inference ---------------------------------------------------------
    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Cross-field checks beyond each field's range (ConfigError naming the key)."""

    @classmethod
    def model_from(cls, cfg: RunConfig, info: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    # ---- inference ---------------------------------------------------------------------------------
    @classmethod
    def sample(cls, run: TrainedRun, options: dict[str, Any]) -> str:
        raise NotImplementedError

    @classmethod
    def evaluate(cls, run: TrainedRun, options: dict[str, Any]) -> str:
        raise NotImplementedError

    @classmethod
    def check_options(cls, options: dict[str, Any], allowed: tuple[str, ...], command: str) -> None:
        """Refuse options that do not apply to this task, naming the flag and what the task takes."""
        known = COMMON_OPTIONS[command] + allowed
        extra = [k for k in options if k not in known]
        if extra:
            flags = ", ".join(_flag(k) for k in known)
            raise ConfigError(f"{_flag(extra[0])} does not apply to a {cls.name} run; adaln {command} "
                              f"takes {flags} for it")


def _flag(key: str) -> str:
    return "-o" if key == "output" else "--" + key.replace("_", "-")


@dataclass
class TrainedRun:
    """A checkpoint ready for inference: the model with EMA (or raw) weights in eval mode on ``device``."""

    task: type[Task]
    cfg: Any
    info: dict[str, Any]
    model: nn.Module
    step: int
    checkpoint: Path
    run_dir: Path  # where outputs go by default: the run directory, never the checkpoint directory
    device: torch.device


def find_checkpoint(path: str | Path) -> Path:
    """``path`` is a checkpoint directory (has state.json) or a run directory (its newest checkpoint)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if not path.exists():
        raise ConfigError(f"run directory or checkpoint not found: {path}")
    found = list_checkpoints(path)
    if not found:
        raise ConfigError(f"no checkpoint in {path} (train first with: adaln train --out {path})")
    return found[-1]


def load_trained_run(path: str | Path, tasks: Any, *, device: str = "auto", use_ema: bool = True) -> TrainedRun:
    """Rebuild the model of a run or checkpoint from its saved config and info, and load its weights.

    ``tasks`` maps a task name to its class (``adaln.tasks.get_task``)."""
    ckpt = find_checkpoint(path)
    state = read_state(ckpt)
    saved = state.get("config") or {}
    task = tasks(saved.get("task", ""), where=str(ckpt / STATE_FILE))
    cfg = build_config(task.config, saved, {}, f"{ckpt / STATE_FILE} config")
    info = state.get("extra") or {}
    try:
        model = task.model_from(cfg, info)
    except KeyError as e:
        raise CheckpointError(f"{ckpt / STATE_FILE}: 'extra' lacks {e} needed to rebuild the model") from None
    ema = EMA(model, decay=cfg.ema_decay) if use_ema else None
    load_checkpoint(ckpt, model=model, ema=ema, rng=False)
    if ema is not None:
        ema.copy_to(model)
    dev = resolve_device(device, cfg.threads)
    model = model.to(dev).eval().requires_grad_(False)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return TrainedRun(task, cfg, info, model, int(state["step"]), ckpt, run_dir, dev)


def replace_config(cfg: Any, section: str, changes: dict[str, Any], label: str) -> Any:
    """``cfg`` with fields of its ``section`` replaced (None values skipped), range-checked again."""
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        return cfg
    merged = dataclasses.asdict(cfg)
    return build_config(type(cfg), merged, {f"{section}.{k}": v for k, v in changes.items()}, label)
