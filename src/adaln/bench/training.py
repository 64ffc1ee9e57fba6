"""Training-side helpers of the comparison benchmarks (``benchmarks/flow_vs_edm.py``, ``text_systems.py``,
``backbones.py``): their shared ``--set`` / ``--threads`` arguments, training a preset into a run directory
unless it is finished, and timing one training step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from adaln.engine import fit
from adaln.engine.checkpoint import list_checkpoints
from adaln.engine.config import parse_overrides
from adaln.tasks import load_config


def add_run_arguments(parser: argparse.ArgumentParser, *, default_set: list[str], set_help: str) -> None:
    """``--set KEY=VALUE ...`` (config overrides of every run) and ``--threads N``."""
    parser.add_argument("--set", nargs="*", default=default_set, metavar="KEY=VALUE", help=set_help)
    parser.add_argument("--threads", type=int, help="torch CPU threads for training and sampling (default torch's)")


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The overrides ``add_run_arguments`` parsed; ``--threads`` also sets this process's torch threads (the
    in-process scoring and timing) and travels to the runs as ``threads``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return {**parse_overrides(args.set), **({"threads": args.threads} if args.threads else {})}


def train_preset(preset: str, run_dir: Path, overrides: dict[str, Any]) -> float:
    """Train ``preset`` with ``overrides`` into ``run_dir`` (resuming a cut run); seconds spent, 0.0 when
    ``run_dir`` already holds the final step."""
    task, cfg = load_config(preset, overrides)
    done = list_checkpoints(run_dir)
    if done and int(done[-1].name.split("_")[-1]) >= cfg.steps:
        return 0.0
    t0 = time.perf_counter()
    fit(task, cfg, run_dir, resume=bool(done), progress=False)
    return time.perf_counter() - t0


def train_step_seconds(preset: str, overrides: dict[str, Any], reps: int) -> float:
    """Median wall time of one training step (loss, backward, AdamW) of a fresh model at the preset's
    batch on CPU, over ``reps`` steps after one untimed warm-up step."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    task_cls, cfg = load_config(preset, overrides)
    task = task_cls(cfg, torch.device("cpu"), progress=False)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for step in range(reps + 1):
        t0 = time.perf_counter()
        loss = task.loss(model, step, task.batch(step), 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[reps // 2]
