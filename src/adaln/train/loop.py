"""The training loop of ``adaln train``: EDM denoising loss on a class-conditional DiT.

Randomness is stateless per step: the data order of epoch ``e`` is a permutation seeded by
``(seed, e)``; each sample's training sigma and noise come from its own generator seeded by
``(seed, step, sample index in the data set)``, and the label dropout from a generator seeded by
``(seed, rank, step)``. A resumed run therefore draws exactly the numbers an uninterrupted run draws,
whatever happened before. With several processes (``adaln.train.distributed``) the ranks' batches at a
step together are the single-process batch, with the same sigmas and noise; only the dropped labels
differ.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from adaln.data import load_digits, load_image_folder
from adaln.diffusion import EDMPrecond, denoising_loss, sample_training_sigmas
from adaln.models.dit import DiT, EDMTimestep
from adaln.models.residual_denoiser import ResidualDenoiser
from adaln.train.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
from adaln.train.config import ConfigError, TrainConfig
from adaln.train.distributed import (
    Topology,
    agree_over_ranks,
    barrier,
    checkpoint_state,
    distribute_training,
    full_tensor,
    launch,
    mean_over_ranks,
    per_rank_batch,
)
from adaln.train.ema import EMA


@dataclass
class Dataset:
    """Images (N, C, H, W) in [-1, 1] and integer labels (N,), all in memory."""

    images: Tensor
    labels: Tensor
    num_classes: int
    classes: list[str]


def load_dataset(cfg: TrainConfig, split: str = "train") -> Dataset:
    """The configured dataset (``split`` "train" or "heldout" for digits; image folders are all train)."""
    d = cfg.data
    if d.name == "digits":
        if d.image_size != 8:
            raise ConfigError(f"data.image_size must be 8 for the digits data set, got {d.image_size}")
        images, labels = load_digits(split, heldout_fraction=d.heldout_fraction)
        return Dataset(images, labels, 10, [str(i) for i in range(10)])
    if d.name == "image_folder":
        if not d.root:
            raise ConfigError("data.root must name a folder with one sub-folder per class (--data-root)")
        images, labels, classes = load_image_folder(d.root, image_size=d.image_size, mode=d.mode)
        return Dataset(images, labels, len(classes), list(classes))
    raise ConfigError(f"data.name must be 'digits' or 'image_folder', got {d.name!r}")


def build_model(cfg: TrainConfig, in_channels: int, num_classes: int) -> DiT | ResidualDenoiser:
    """The class-conditional denoiser backbone, without learned-sigma channels (EDM predicts data only).

    ``model.mixer="attention"`` is DiT; ``"hyena"`` is an AdaLN-Zero residual network whose sequence
    mixer is Hyena (``ResidualDenoiser``), with the same interface.
    """
    m = cfg.model
    sizes = dict(
        input_size=cfg.data.image_size, patch_size=m.patch_size, in_channels=in_channels,
        hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
        class_dropout_prob=m.class_dropout_prob, num_classes=num_classes,
    )
    if m.mixer == "attention":
        return DiT(**sizes, learn_sigma=False)
    if m.mixer == "hyena":
        return ResidualDenoiser(**sizes, mixer="hyena")
    raise ConfigError(f"model.mixer must be 'attention' or 'hyena', got {m.mixer!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda was requested but CUDA is not available")
    return torch.device(name)


def resume_or_start(run_dir: Path, resume: bool, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    ema: EMA) -> int:
    """The step to start from: that of the newest good checkpoint loaded into ``model``, ``optimizer`` and
    ``ema`` when ``resume``, else 0; a fresh start in a run directory that holds checkpoints raises
    ``ConfigError`` (nothing is overwritten)."""
    found = load_latest_checkpoint(run_dir, model=model, optimizer=optimizer, ema=ema) if resume else None
    if found is not None:
        return int(found[1]["step"])
    if list_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds checkpoints: pass --resume or choose another --out")
    return 0


def optimizer_step(loss: Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA,
                   grad_clip: float) -> Tensor:
    """Backward, clip the gradient norm to ``grad_clip``, step, update the EMA; returns the norm before
    clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    ema.update(model)
    return grad_norm


def require_finite(loss_value: float, step: int) -> float:
    """``loss_value``, or ``FloatingPointError`` naming the step when it is NaN or infinite."""
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"loss became {loss_value} at step {step}")
    return loss_value


SAMPLE_STREAM, LABEL_STREAM = 1, 2  # keys that keep the per-sample and label-dropout seeds apart


def stream_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (splitmix64 finaliser per key): distinct streams in any order."""
    mask, h = (1 << 64) - 1, 0
    for key in keys:
        h = ((h ^ (key & mask)) + 0x9E3779B97F4A7C15) & mask
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & mask
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & mask
        h ^= h >> 31
    return h >> 1


def training_generators(seed: int, step: int, indices: Tensor, device: torch.device) -> list[torch.Generator]:
    """One generator per sample of a batch, seeded by ``(seed, step, data set index)``: a sample draws the
    same sigma and noise whichever rank or batch position it lands in."""
    return [
        torch.Generator(device=device).manual_seed(stream_seed(seed, SAMPLE_STREAM, step, i))
        for i in indices.tolist()
    ]


def batch_indices(n: int, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> Tensor:
    """Indices of this rank's batch at ``step``: epoch permutations sharded round-robin over ranks."""
    per_rank = n // world
    steps_per_epoch = per_rank // batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size {batch_size} x {world} process(es) exceeds the {n} training images"
        )
    epoch, i = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 65_537 + epoch))
    return perm[rank::world][:per_rank][i * batch_size : (i + 1) * batch_size]


class MetricsLog:
    """Appends one JSON line and one CSV row per logged step; draws the loss curve on ``close``."""

    def __init__(self, run_dir: Path, append: bool):
        mode = "a" if append else "w"
        self.jsonl = open(run_dir / "metrics.jsonl", mode)
        new_csv = not append or not (run_dir / "metrics.csv").exists()
        self.csv_file = open(run_dir / "metrics.csv", mode, newline="")
        self.csv = csv.writer(self.csv_file)
        if new_csv:
            self.csv.writerow(["step", "loss", "lr", "grad_norm", "images_per_s"])
        self.run_dir = run_dir

    def write(self, row: dict) -> None:
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        self.csv.writerow([row["step"], row["loss"], row["lr"], row["grad_norm"], row["images_per_s"]])
        self.csv_file.flush()

    def close(self) -> None:
        self.jsonl.close()
        self.csv_file.close()
        plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")


def plot_loss_curve(metrics_path: Path, out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("EDM loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_loss: float
    seconds: float
    rank: int = 0  # only rank 0 reports


def train(
    cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True, distributed: str = "none"
) -> TrainResult:
    """Train ``cfg`` into ``run_dir`` (checkpoints, metrics.jsonl/csv, loss.png, config.json).

    ``distributed`` "ddp" or "fsdp" runs as one of the processes torchrun started (see
    ``adaln.train.distributed``); ``cfg.batch_size`` is then the global batch.
    """
    with launch(distributed, resolve_device(cfg.device), cfg.batch_size) as topo:
        return _train(cfg, Path(run_dir), topo, resume=resume, progress=progress)


def _train(cfg: TrainConfig, run_dir: Path, topo: Topology, *, resume: bool, progress: bool) -> TrainResult:
    device, main = topo.device, topo.is_main
    batch = per_rank_batch(cfg.batch_size, topo.world)
    data = load_dataset(cfg, "train")
    torch.manual_seed(cfg.seed)  # the initial weights depend on the run's seed only
    model = build_model(cfg, data.images.shape[1], data.num_classes).to(device)
    ema = EMA(model, decay=cfg.ema_decay, warmup=cfg.ema_warmup)

    def make_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    optimizer = make_optimizer(model.parameters())
    start = resume_or_start(run_dir, resume, model=model, optimizer=optimizer, ema=ema)
    low, high = agree_over_ranks(start, topo)
    if low != high:
        raise ConfigError(f"the processes resumed from different steps ({low} and {high}): "
                          "--out must be a directory that every node sees")
    net, optimizer = distribute_training(model, optimizer, ema, topo, make_optimizer)
    denoiser = EDMPrecond(net, cfg.sigma_data, noise_input=EDMTimestep())  # dit_edm_denoiser around the wrapper
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if topo.mode != "none":
            print(f"{topo.mode}: {topo.world} processes, global batch {cfg.batch_size} = {batch} per process "
                  f"x {topo.world}", flush=True)

    images, labels = data.images.to(device), data.labels.to(device)
    log = MetricsLog(run_dir, append=start > 0) if main else None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not (progress and main), desc="train")
    t0, last_t, loss_value = time.perf_counter(), time.perf_counter(), float("nan")
    net.train()
    for step in bar:
        idx = batch_indices(len(images), step, batch, cfg.seed, topo.rank, topo.world)
        gens = training_generators(cfg.seed, step, idx, device)
        idx = idx.to(device)
        x0, y = images[idx], labels[idx]
        # Label dropout inside the DiT draws from its own stream, independent of the sigmas and noise.
        label_gen = torch.Generator(device=device).manual_seed(stream_seed(cfg.seed, LABEL_STREAM, topo.rank, step))
        sigma = sample_training_sigmas(
            len(x0), "edm", p_mean=cfg.p_mean, p_std=cfg.p_std, generator=gens, device=device
        )
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = denoising_loss(
                partial(denoiser, generator=label_gen), x0, sigma, sigma_data=cfg.sigma_data, generator=gens, y=y
            )
        grad_norm = optimizer_step(loss, net, optimizer, ema, cfg.grad_clip)
        loss_value = require_finite(mean_over_ranks(loss, topo), step)  # the global batch's loss, on every rank
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            norm = float(full_tensor(grad_norm))  # FSDP: the norm over all shards
            now = time.perf_counter()
            n_steps = cfg.log_every if done % cfg.log_every == 0 else done % cfg.log_every
            rate = n_steps * cfg.batch_size / max(now - last_t, 1e-9)
            last_t = now
            if main:
                log.write(dict(step=done, loss=loss_value, lr=lr, grad_norm=norm, images_per_s=rate))
                bar.set_postfix(loss=f"{loss_value:.4f}")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            state = checkpoint_state(net, optimizer, ema, topo)  # gathers FSDP shards: every rank calls it
            if state is not None:
                save_checkpoint(
                    run_dir, done, **state, config=cfg.to_dict(), keep_last=cfg.keep_last,
                    extra={"loss": loss_value, "num_classes": data.num_classes, "classes": data.classes,
                           "in_channels": int(images.shape[1])},
                )
            barrier(topo)  # no rank runs ahead of (or exits before) the checkpoint on disk
    if main:
        log.close()
    return TrainResult(run_dir, max(start, cfg.steps), loss_value, time.perf_counter() - t0, topo.rank)
