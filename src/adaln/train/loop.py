"""The training loop of ``adaln train``: EDM denoising loss on a class-conditional DiT.

Randomness is stateless per step: the data order of epoch ``e`` is a permutation seeded by
``(seed, e)`` and each step's sigmas, noise and label dropout come from generators seeded by
``(seed, rank, step)``. A resumed run therefore draws exactly the numbers an uninterrupted run draws,
whatever happened before, and the order is defined for any number of processes.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from adaln.data import load_digits, load_image_folder
from adaln.diffusion import denoising_loss, sample_training_sigmas
from adaln.models.dit import DiT, dit_edm_denoiser
from adaln.train.checkpoint import load_latest_checkpoint, save_checkpoint
from adaln.train.config import ConfigError, TrainConfig
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


def build_model(cfg: TrainConfig, in_channels: int, num_classes: int) -> DiT:
    """A class-conditional DiT without learned-sigma channels (EDM training predicts data only)."""
    m = cfg.model
    return DiT(
        input_size=cfg.data.image_size,
        patch_size=m.patch_size,
        in_channels=in_channels,
        hidden_size=m.hidden_size,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        class_dropout_prob=m.class_dropout_prob,
        num_classes=num_classes,
        learn_sigma=False,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda was requested but CUDA is not available")
    return torch.device(name)


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for one (rank, step): distinct streams, reproducible in any order."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729 + 1) % (2**63 - 1)


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


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train ``cfg`` into ``run_dir`` (checkpoints, metrics.jsonl/csv, loss.png, config.json)."""
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    data = load_dataset(cfg, "train")
    torch.manual_seed(cfg.seed)  # the initial weights depend on the run's seed only
    model = build_model(cfg, data.images.shape[1], data.num_classes).to(device)
    denoiser = dit_edm_denoiser(model, sigma_data=cfg.sigma_data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(model, decay=cfg.ema_decay, warmup=cfg.ema_warmup)

    start = 0
    found = load_latest_checkpoint(run_dir, model=model, optimizer=optimizer, ema=ema) if resume else None
    if found is not None:
        start = int(found[1]["step"])
    elif (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise ConfigError(f"{run_dir} already holds checkpoints: pass --resume or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    images, labels = data.images.to(device), data.labels.to(device)
    log = MetricsLog(run_dir, append=start > 0)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="train")
    t0, last_t, loss_value = time.perf_counter(), time.perf_counter(), float("nan")
    model.train()
    for step in bar:
        idx = batch_indices(len(images), step, cfg.batch_size, cfg.seed).to(device)
        x0, y = images[idx], labels[idx]
        seed = step_seed(cfg.seed, 0, step)
        # Label dropout inside the model draws from the global RNG: seed it from another stream than
        # ``gen`` so the dropped labels are independent of the sigmas drawn below.
        torch.manual_seed(seed ^ 0x5DEECE66D)
        gen = torch.Generator(device=device).manual_seed(seed)
        sigma = sample_training_sigmas(
            len(x0), "edm", p_mean=cfg.p_mean, p_std=cfg.p_std, generator=gen, device=device
        )
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = denoising_loss(denoiser, x0, sigma, sigma_data=cfg.sigma_data, generator=gen, y=y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        ema.update(model)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step}")
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            now = time.perf_counter()
            n_steps = cfg.log_every if done % cfg.log_every == 0 else done % cfg.log_every
            rate = n_steps * cfg.batch_size / max(now - last_t, 1e-9)
            last_t = now
            log.write(dict(step=done, loss=loss_value, lr=lr, grad_norm=float(grad_norm), images_per_s=rate))
            bar.set_postfix(loss=f"{loss_value:.4f}")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(
                run_dir, done, model=model, optimizer=optimizer, ema=ema,
                config=cfg.to_dict(), keep_last=cfg.keep_last,
                extra={"loss": loss_value, "num_classes": data.num_classes, "classes": data.classes,
                       "in_channels": int(images.shape[1])},
            )
    log.close()
    return TrainResult(run_dir, max(start, cfg.steps), loss_value, time.perf_counter() - t0)
