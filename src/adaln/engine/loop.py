"""The one training loop: ``fit(task, cfg, run_dir)`` trains any task into a protected run directory.

In order, as nanoGPT's ``train.py`` reads: lock the run, clean what a killed process left, seed, build
the task's data and model, AdamW + EMA, resume from the newest good checkpoint, wrap for DDP/FSDP2,
then per step: the global batch's indices (this process takes every ``world``-th), the learning rate,
the task's loss under bf16 autocast on CUDA, backward + gradient clipping + optimizer step + EMA. The
host waits for the device only at log and checkpoint steps (loss value, finiteness, gradient norm).

SIGINT and SIGTERM finish the current step, write a checkpoint at it and raise ``Interrupted``
(a single process checks after every step; distributed processes agree at log steps).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from torch import Tensor, nn
from tqdm.auto import tqdm

from adaln.checks import trusted_values
from adaln.engine.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
from adaln.engine.config import RunConfig
from adaln.engine.distributed import (
    Topology,
    agree_over_ranks,
    barrier,
    checkpoint_state,
    distribute_training,
    full_tensor,
    launch,
    mean_over_ranks,
)
from adaln.engine.ema import EMA
from adaln.engine.rundir import MetricsLog, clean_stale, run_lock, write_config
from adaln.engine.seeding import Stream, stream_seed
from adaln.errors import ConfigError, Interrupted, RunError, TrainingDiverged


class TrainingTask(Protocol):
    """What ``fit`` needs of a task (``adaln.tasks.Task`` implements it)."""

    def info(self) -> dict[str, Any]:
        """JSON facts of the data the model is built for (classes, widths, sigma_data), saved with it."""

    def build_model(self) -> nn.Module: ...

    def batch(self, step: int) -> Tensor:
        """Data set indices (int64) of the global batch at ``step``: a function of (seed, step) only."""

    def loss(self, net: nn.Module, step: int, indices: Tensor, rank: int) -> Tensor:
        """The scalar training loss of this process's examples ``indices`` at ``step``."""

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        """Submodules FSDP2 shards one by one (the transformer blocks)."""


def resolve_device(name: str, threads: int | None = None) -> torch.device:
    """The torch device for ``name`` (auto, cpu, cuda, cuda:N); on CPU applies ``threads`` when given."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif name == "cpu" or name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {name} was requested but CUDA is not available")
        device = torch.device(name)
    else:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    return device


def learning_rate(cfg: RunConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to ``lr * lr_final_fraction``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    low = cfg.lr * cfg.lr_final_fraction
    return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * t))


def optimizer_step(loss: Tensor, net: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA, grad_clip: float) -> Tensor:
    """Backward, clip the gradient norm to ``grad_clip``, step, update the EMA; returns the norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()
    ema.update(net)
    return grad_norm


class StopRequest:
    """Set by SIGINT / SIGTERM while ``stop_requests`` is active: the signal number, else 0."""

    signum = 0


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Turn SIGINT and SIGTERM into a request to stop after the current step (handlers restored on exit)."""
    request = StopRequest()

    def handler(signum: int, frame: object) -> None:
        request.signum = signum

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: signals stay with the caller
        pass
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass
class FitResult:
    run_dir: Path
    step: int
    final_loss: float
    seconds: float
    rank: int = 0  # only rank 0 reports
    info: dict[str, Any] | None = None


def fit(make_task: Any, cfg: RunConfig, run_dir: Path, *, resume: bool, progress: bool = True,
        distributed: str = "none") -> FitResult:
    """Train ``make_task(cfg, device, progress)`` (a ``TrainingTask``) into ``run_dir``.

    ``resume`` continues from the newest good checkpoint; without it, a directory that already holds
    checkpoints is refused. ``distributed`` "ddp" or "fsdp" runs as one of torchrun's processes;
    ``cfg.batch_size`` is then the global batch.
    """
    threads = torch.get_num_threads()
    try:
        device = resolve_device(cfg.device, cfg.threads)
        return _launch(make_task, cfg, run_dir, device, resume=resume, progress=progress, distributed=distributed)
    finally:
        torch.set_num_threads(threads)  # cfg.threads applies to this run only


def _launch(make_task: Any, cfg: RunConfig, run_dir: Path, device: torch.device, *, resume: bool, progress: bool,
            distributed: str) -> FitResult:
    with launch(distributed, device, cfg.batch_size) as topo:
        with run_lock(run_dir) if topo.is_main else nullcontext(), stop_requests() as stop:
            if topo.is_main:
                clean_stale(run_dir)
            return _fit(make_task, cfg, run_dir, topo, stop, resume=resume, progress=progress)


def _fit(make_task: Any, cfg: RunConfig, run_dir: Path, topo: Topology, stop: StopRequest, *, resume: bool,
         progress: bool) -> FitResult:
    device, main = topo.device, topo.is_main
    task: TrainingTask = make_task(cfg, device, progress=progress and main)
    info = task.info()
    torch.manual_seed(stream_seed(cfg.seed, Stream.INIT))  # the initial weights depend on the seed only
    model = task.build_model().to(device)
    ema = EMA(model, decay=cfg.ema_decay, warmup=cfg.ema_warmup)

    def make_optimizer(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    optimizer = make_optimizer(model.parameters())
    found = load_latest_checkpoint(run_dir, model=model, optimizer=optimizer, ema=ema) if resume else None
    if found is None and list_checkpoints(run_dir):
        raise RunError(f"{run_dir} already holds checkpoints: pass --resume or choose another --out")
    start = int(found[1]["step"]) if found else 0
    low, high = agree_over_ranks(start, topo)
    if low != high:
        raise RunError(f"the processes resumed from different steps ({low} and {high}): "
                       "--out must be a directory that every process sees")
    net, optimizer = distribute_training(model, optimizer, ema, topo, make_optimizer, task.fsdp_units(model))
    log = None
    if main:
        write_config(run_dir, asdict(cfg))
        log = MetricsLog(run_dir, start)
        if topo.mode != "none":
            print(f"{topo.mode}: {topo.world} processes, global batch {cfg.batch_size} = "
                  f"{cfg.batch_size // topo.world} per process x {topo.world}", flush=True)

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not (progress and main), desc="train")
    t0 = last_t = time.perf_counter()
    last_logged = last_checked = start
    loss_value = float("nan")
    finite = torch.ones((), dtype=torch.bool, device=device)
    net.train()
    try:
        for step in bar:
            indices = task.batch(step)[topo.rank :: topo.world]
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # The task made the labels and noise levels itself: no value checks, so no wait for the device.
            with trusted_values():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = task.loss(net, step, indices, topo.rank)
                grad_norm = optimizer_step(loss, net, optimizer, ema, cfg.grad_clip)
            finite &= torch.isfinite(loss.detach())  # checked on the host only at log steps
            done = step + 1
            log_now = done % cfg.log_every == 0 or done == cfg.steps
            checkpoint_now = done % cfg.checkpoint_every == 0 or done == cfg.steps
            signum = stop.signum if topo.mode == "none" else (agree_over_ranks(stop.signum, topo)[1] if log_now else 0)
            if log_now or checkpoint_now or signum:
                loss_value = mean_over_ranks(loss.detach(), topo)
                if not bool(finite) or not math.isfinite(loss_value):
                    raise TrainingDiverged(
                        f"the training loss became non-finite between steps {last_checked} and {done} "
                        f"(last value {loss_value}): lower lr or grad_clip; the checkpoints in {run_dir} "
                        "before that are intact")
                last_checked = done
            if log_now:
                norm = float(full_tensor(grad_norm))  # FSDP: the norm over all shards
                now = time.perf_counter()
                rate = (done - last_logged) * cfg.batch_size / max(now - last_t, 1e-9)
                last_t, last_logged = now, done
                if main:
                    log.write(dict(step=done, loss=loss_value, lr=lr, grad_norm=norm, examples_per_s=rate))
                    bar.set_postfix(loss=f"{loss_value:.4f}")
            if checkpoint_now or signum:
                path = _save(run_dir, done, net, optimizer, ema, topo, cfg, {**info, "loss": loss_value})
                if main:
                    log.write_derived()
                if signum:
                    raise Interrupted(signum, done, str(path))
    finally:
        bar.close()
        if log is not None:
            log.close()
    return FitResult(run_dir, max(start, cfg.steps), loss_value, time.perf_counter() - t0, topo.rank, info)


def _save(run_dir: Path, step: int, net: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA, topo: Topology,
          cfg: RunConfig, extra: dict[str, Any]) -> Path | None:
    """Write the checkpoint of ``step`` (every rank takes part: FSDP gathers shards); RunError on a full disk."""
    state = checkpoint_state(net, optimizer, ema, topo)
    path = None
    if state is not None:
        try:
            path = save_checkpoint(run_dir, step, **state, config=asdict(cfg), keep_last=cfg.keep_last, extra=extra)
        except (OSError, SafetensorError) as e:
            raise RunError(f"could not write the checkpoint of step {step} in {run_dir}: {e} "
                           "(is the disk full?); the previous checkpoints are intact") from e
    barrier(topo)  # no rank runs ahead of (or exits before) the checkpoint on disk
    return path
