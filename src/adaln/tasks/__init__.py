"""adaln.tasks: each job is one module behind the ``Task`` protocol (base.py).

- ``digits``: a class-conditional DiT (or Hyena residual denoiser) on the bundled 8x8 digits or on an
  image folder, EDM;
- ``text-digits``: a text-conditioned DiT on the digits, captions encoded by all-MiniLM-L6-v2;
- ``conformers``: AlphaFold 3-style diffusion of CCD molecule conformers.

A preset names its task (``task: digits``); this module turns a preset or a run directory into the
task class and its config, including the rules of what may change when a run resumes.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

from adaln.engine.checkpoint import list_checkpoints, read_state
from adaln.engine.config import build_config, changed_keys, read_source, resumable_keys
from adaln.engine.rundir import read_config, run_path
from adaln.errors import ConfigError
from adaln.tasks.base import Task, TrainedRun, find_checkpoint, load_trained_run

TASKS = {
    "digits": "adaln.tasks.digits:DigitsTask",
    "text-digits": "adaln.tasks.text_digits:TextDigitsTask",
    "conformers": "adaln.tasks.conformers:ConformerTask",
}


def get_task(name: str, where: str = "config") -> type[Task]:
    """The task class named ``name``; ConfigError naming ``where`` when there is none."""
    if name not in TASKS:
        raise ConfigError(f"{where}: task must be one of {tuple(TASKS)}, got {name!r}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_config(source: str, overrides: dict[str, Any] | None = None) -> tuple[type[Task], Any]:
    """The task and its validated config from a preset name or YAML file, then dotted ``overrides``."""
    data, label = read_source(source)
    if "task" not in data:
        raise ConfigError(f"{label} names no task: add a line `task: NAME` with NAME one of {tuple(TASKS)}")
    overrides = dict(overrides or {})
    if "task" in overrides:
        raise ConfigError("--set task=... is not allowed: the task is chosen by the config (--config)")
    task = get_task(data["task"], label)
    cfg = build_config(task.config, data, overrides, label)
    task.check(cfg)
    return task, cfg


def train_config(out: str, source: str | None, overrides: dict[str, Any], resume: bool) -> tuple[type[Task], Any, Path]:
    """What ``adaln train`` runs: a new run from ``source`` (default the digits preset), or with
    ``resume`` the run's saved config, changed only where that is safe (``RunConfig`` fields marked
    resumable, e.g. ``steps``); ``source`` given on resume must agree with the saved config likewise."""
    run_dir = run_path(out)
    if not resume:
        task, cfg = load_config(source or "digits", overrides)
        return task, cfg, run_dir
    saved, label = (read_config(run_dir), str(run_dir / "config.json")) if run_dir.is_dir() else (None, "")
    if saved is None and list_checkpoints(run_dir):  # config.json lost: the newest checkpoint's config
        newest = list_checkpoints(run_dir)[-1]
        saved, label = read_state(newest).get("config"), str(newest / "state.json")
    if not saved:
        raise ConfigError(f"--resume: {run_dir} holds no run (no config.json or checkpoint); drop --resume to "
                          "start one there")
    task = get_task(saved["task"], label)
    before = build_config(task.config, saved, {}, label)
    if source is not None:
        task_given, given = load_config(source)
        if task_given is not task:
            raise ConfigError(f"--config {source} is a {task_given.name} config but {run_dir} is a {task.name} run")
        base = asdict(given)
    else:
        base = saved
    if "task" in overrides:
        raise ConfigError("--set task=... is not allowed: the task is chosen by the config (--config)")
    after = build_config(task.config, base, overrides, label)
    task.check(after)
    bad = changed_keys(task.config, before, after)
    if bad:
        key = bad[0]
        old, new = _get(before, key), _get(after, key)
        free = ", ".join(sorted(k for k in resumable_keys(task.config) if "." not in k))
        raise ConfigError(f"cannot change {key} on resume ({old!r} -> {new!r}): {run_dir} was trained with "
                          f"{key}={old!r}; start a new run with another --out (safe to change: {free}, sample.*)")
    return task, after, run_dir


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def load_run(path: str | Path, *, device: str = "auto", use_ema: bool = True) -> TrainedRun:
    """A run directory or checkpoint directory ready for sampling, whatever its task."""
    return load_trained_run(path, get_task, device=device, use_ema=use_ema)


__all__ = ["TASKS", "Task", "TrainedRun", "find_checkpoint", "get_task", "load_config", "load_run",
           "train_config"]
