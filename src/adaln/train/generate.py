"""Sampling a trained run: load EMA weights, guide with CFG, write a PNG grid and the raw array.

Each sample has its own generator seeded by ``(seed, class, index)``, so a given sample is the same
whatever else is drawn with it (batch size, other classes, ``--per-class``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from adaln.diffusion import ClassifierFreeGuidance, sample_af3, sample_ddim, sample_edm
from adaln.models.dit import DiT, dit_edm_denoiser
from adaln.train.checkpoint import list_checkpoints, load_checkpoint
from adaln.train.config import ConfigError, TrainConfig, config_from_dict
from adaln.train.ema import EMA
from adaln.train.loop import build_model, resolve_device

SAMPLERS = ("heun", "euler", "af3", "ddim")


@dataclass
class LoadedRun:
    cfg: TrainConfig
    model: DiT
    step: int
    checkpoint: Path
    num_classes: int


def find_checkpoint(path: str | Path) -> Path:
    """``path`` is a checkpoint directory (has state.json) or a run directory (newest checkpoint)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    if not path.exists():
        raise ConfigError(f"run directory or checkpoint not found: {path}")
    found = list_checkpoints(path)
    if not found:
        raise ConfigError(f"no checkpoint in {path} (train first with: adaln train --out {path})")
    return found[-1]


def load_run(path: str | Path, *, device: str = "auto", use_ema: bool = True) -> LoadedRun:
    """Rebuild the model of a run from its checkpoint's saved config and load EMA (or raw) weights."""
    ckpt = find_checkpoint(path)
    state = json.loads((ckpt / "state.json").read_text())
    cfg = config_from_dict(state["config"])
    extra = state.get("extra") or {}
    num_classes, in_channels = int(extra["num_classes"]), int(extra["in_channels"])
    model = build_model(cfg, in_channels, num_classes)
    ema = EMA(model, decay=cfg.ema_decay, warmup=cfg.ema_warmup) if use_ema else None
    load_checkpoint(ckpt, model=model, ema=ema, rng=False)
    if ema is not None:
        ema.copy_to(model)
    model.to(resolve_device(device)).eval()
    return LoadedRun(cfg, model, int(state["step"]), ckpt, num_classes)


def sample_generators(seed: int, classes: list[int], per_class: int, device: torch.device) -> list[torch.Generator]:
    return [
        torch.Generator(device=device).manual_seed(seed * 1_000_003 + c * 10_007 + k)
        for c in classes
        for k in range(per_class)
    ]


@torch.no_grad()
def generate(
    run: LoadedRun,
    classes: list[int],
    per_class: int,
    *,
    cfg_scale: float,
    steps: int,
    sampler: str = "heun",
    seed: int = 0,
    chunk: int = 500,
) -> tuple[Tensor, Tensor, int]:
    """Samples (len(classes)*per_class, C, H, W) in [-1, 1], their labels and the NFE per chunk."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler must be one of {SAMPLERS}, got {sampler!r}")
    if cfg_scale < 0:
        raise ConfigError(f"--cfg must be >= 0, got {cfg_scale}")
    if per_class < 1 or steps < 1:
        raise ConfigError("--per-class and --steps must be >= 1")
    bad = [c for c in classes if not 0 <= c < run.num_classes]
    if bad:
        raise ConfigError(f"class ids {bad} out of range [0, {run.num_classes - 1}]")
    device = next(run.model.parameters()).device
    denoiser = dit_edm_denoiser(run.model, sigma_data=run.cfg.sigma_data)
    guided = ClassifierFreeGuidance(
        denoiser, cfg_scale, null_cond={"y": torch.tensor(run.num_classes, device=device)}
    )
    labels = torch.tensor([c for c in classes for _ in range(per_class)], device=device)
    gens = sample_generators(seed, classes, per_class, device)
    size = run.cfg.data.image_size
    channels = run.model.in_channels
    out, nfe = [], 0
    for i in range(0, len(labels), chunk):
        y, g = labels[i : i + chunk], gens[i : i + chunk]
        shape = (len(y), channels, size, size)
        if sampler in ("heun", "euler"):
            res = sample_edm(guided, shape, steps=steps, solver=sampler, generator=g, device=device, y=y)
        elif sampler == "af3":
            res = sample_af3(
                guided, shape, steps=steps, sigma_data=run.cfg.sigma_data, augment=False,
                generator=g, device=device, y=y,
            )
        else:
            res = sample_ddim(guided, shape, steps=steps, generator=g, device=device, y=y)
        out.append(res.samples.clamp(-1, 1))
        nfe = res.nfe
    return torch.cat(out), labels, nfe


def save_grid(images: Tensor, rows: int, path: str | Path, *, scale: int = 4) -> None:
    """A PNG with ``rows`` rows (one per class), images (N, C, H, W) in [-1, 1], 1-pixel gutters."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = n // rows
    arr = ((images.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, dtype=np.uint8)
    for i in range(rows * cols):
        r, k = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + k * (w + 1) : 1 + k * (w + 1) + w] = arr[i].transpose(1, 2, 0)
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
