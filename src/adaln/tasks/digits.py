"""Task ``digits``: a class-conditional DiT (or the Hyena residual denoiser) trained with EDM or flow matching on the
bundled 8x8 digits or on an image folder (one sub-folder per class); sampled with guidance; scored by
the digits classifier (conditional accuracy, Frechet distance).

Randomness (``adaln.engine.seeding``): an example's sigma and noise come from its own generator
(seed, step, index); label dropout inside the model from the (seed, rank, step) dropout stream; sample
``k`` of class ``c`` from the generator (seed, c, k) of the generation stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from adaln.data import load_digits, load_image_folder
from adaln.engine.config import option
from adaln.engine.seeding import Stream, example_generators, generator
from adaln.errors import ConfigError
from adaln.models.dit import DiT
from adaln.models.residual_denoiser import ResidualDenoiser
from adaln.outputs import check_output_path, save_array, save_grid, write_json
from adaln.tasks._images import (
    ImageDiffusionConfig,
    Sampling,
    check_image_model,
    check_objective,
    count_option,
    generate,
    sampling_options,
    training_loss,
)
from adaln.tasks.base import Task, TrainedRun


@dataclass
class DigitsData:
    name: str = option("digits", choices=("digits", "image_folder"))  # scikit-learn's 8x8 digits, or a folder
    root: str | None = None  # image_folder: one sub-folder per class
    image_size: int = option(8, ge=1)
    mode: str = option("L", choices=("L", "RGB"))  # image_folder: 1 or 3 channels
    heldout_fraction: float = option(0.2, gt=0, lt=1)


@dataclass
class DigitsConfig(ImageDiffusionConfig):
    task: str = "digits"
    name: str = "digits"
    data: DigitsData = field(default_factory=DigitsData)


class DigitsTask(Task):
    name = "digits"
    config = DigitsConfig
    sample_options = ("classes", "cfg", "sampler", "shift")
    eval_options = ("cfg", "sampler", "shift")

    def __init__(self, cfg: DigitsConfig, device: torch.device, *, progress: bool = True):
        super().__init__(cfg, device, progress=progress)
        d = cfg.data
        if d.name == "digits":
            images, labels = load_digits("train", heldout_fraction=d.heldout_fraction)
            self.classes = [str(i) for i in range(10)]
        else:
            images, labels, self.classes = load_image_folder(d.root, image_size=d.image_size, mode=d.mode)
        self.images, self.labels = images.to(device), labels.to(device)
        self.num_examples = len(images)

    @classmethod
    def check(cls, cfg: DigitsConfig) -> None:
        d = cfg.data
        if d.name == "digits" and d.image_size != 8:
            raise ConfigError(f"data.image_size must be 8 for the digits data set, got {d.image_size}")
        if d.name == "image_folder" and not d.root:
            raise ConfigError("data.root must name a folder with one sub-folder per class (--set data.root=PATH)")
        check_image_model(cfg.model, d.image_size)
        check_objective(cfg)

    def info(self) -> dict[str, Any]:
        return {"num_classes": len(self.classes), "classes": list(self.classes),
                "in_channels": int(self.images.shape[1])}

    @classmethod
    def model_from(cls, cfg: DigitsConfig, info: dict[str, Any]) -> nn.Module:
        """DiT (``model.mixer`` attention) or the Hyena ``ResidualDenoiser``, without learned-sigma
        channels (the EDM denoiser predicts data, the flow model a velocity)."""
        m = cfg.model
        sizes = dict(
            input_size=cfg.data.image_size, patch_size=m.patch_size, in_channels=int(info["in_channels"]),
            hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
            class_dropout_prob=m.class_dropout_prob, num_classes=int(info["num_classes"]),
        )
        if m.mixer == "attention":
            return DiT(**sizes, learn_sigma=False)
        return ResidualDenoiser(**sizes, mixer="hyena")

    def loss(self, net: nn.Module, step: int, indices: Tensor, rank: int) -> Tensor:
        cfg = self.cfg
        gens = example_generators(cfg.seed, step, indices, self.device)
        idx = indices.to(self.device)
        x0, y = self.images[idx], self.labels[idx]
        dropout = generator(cfg.seed, Stream.DROPOUT, rank, step, device=self.device)
        return training_loss(cfg, net, x0, gens, dropout, y=y)

    # ---- inference ---------------------------------------------------------------------------------
    @classmethod
    def generate(cls, run: TrainedRun, classes: list[int], per_class: int, how: Sampling, *, seed: int = 0,
                 chunk: int = 500) -> tuple[Tensor, Tensor, int]:
        """``per_class`` samples of each class (class-major): images (N, C, H, W) in [-1, 1], labels, NFE."""
        num_classes = int(run.info["num_classes"])
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ConfigError(f"--classes {bad} out of range [0, {num_classes - 1}]")
        device, model = run.device, run.model
        labels = torch.tensor([c for c in classes for _ in range(per_class)], device=device)
        gens = [generator(seed, Stream.GENERATE, c, k, device=device) for c in classes for k in range(per_class)]
        conds = ({"y": labels[i : i + chunk]} for i in range(0, len(labels), chunk))
        images, nfe = generate(
            model, (model.in_channels, *model.input_size), conds, gens, how=how, cfg=run.cfg,
            null_cond={"y": torch.tensor(num_classes, device=device)}, chunk=chunk, device=device,
        )
        return images, labels, nfe

    @classmethod
    def sample(cls, run: TrainedRun, options: dict[str, Any]) -> str:
        classes = _parse_classes(options.get("classes"), int(run.info["num_classes"]))
        n = count_option(options, 8)
        how = sampling_options(run.cfg, options)
        out = check_output_path(options.get("output") or run.run_dir / "grid.png")
        images, _, nfe = cls.generate(run, classes, n, how, seed=options.get("seed", 0))
        save_grid(images, len(classes), out)
        save_array(out.with_suffix(".npy"), images)
        weights = "raw" if options.get("no_ema") else "EMA"
        return (f"wrote {out} and {out.with_suffix('.npy')}: {len(images)} samples, cfg {how.scale:g}, "
                f"{how.sampler}, {nfe} model calls per sample, step {run.step} {weights} weights")

    @classmethod
    def evaluate(cls, run: TrainedRun, options: dict[str, Any]) -> str:
        return format_eval([cls.score(run, options)])

    @classmethod
    def score(cls, run: TrainedRun, options: dict[str, Any]) -> dict[str, Any]:
        """Sample every class, score with the digits classifier; writes eval.json and eval_cfg{W}.json."""
        from adaln.eval import DigitsScorer

        if run.cfg.data.name != "digits":
            raise ConfigError("adaln eval scores the digits data set only (its classifier is trained on digits)")
        how = sampling_options(run.cfg, options)
        scale = how.scale
        n = count_option(options, run.cfg.sample.per_class)
        t0 = time.perf_counter()
        images, labels, nfe = cls.generate(run, list(range(int(run.info["num_classes"]))), n, how,
                                           seed=options.get("seed", 0))
        sample_s = time.perf_counter() - t0
        scorer = DigitsScorer.load_or_fit(run.run_dir / "digits_classifier")
        result = {
            "cfg": scale, "generated": scorer.evaluate_samples(images.cpu(), labels.cpu()),
            "real_heldout": scorer.real_heldout_reference(), "samples": int(len(images)), "nfe": nfe,
            "objective": run.cfg.objective, "sampler": how.sampler, "steps": how.steps,
            "sampling_seconds": round(sample_s, 2), "step": run.step,
        }
        write_json(run.run_dir / f"eval_cfg{scale:g}.json", result)
        write_json(run.run_dir / "eval.json", result)
        return result


def _parse_classes(text: str | None, num_classes: int) -> list[int]:
    if text is None:
        return list(range(num_classes))
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--classes must be comma-separated integers, got {text!r}") from None
    if not classes:
        raise ConfigError(f"--classes must name at least one class id in [0, {num_classes - 1}], got {text!r}")
    return classes


def format_eval(rows: list[dict[str, Any]]) -> str:
    """The evaluation table: one row per guidance scale, then the real held-out digits."""
    lines = [f"{'':>14} {'cfg':>5} {'cond. accuracy':>15} {'Frechet dist.':>14}"]
    for r in rows:
        g = r["generated"]
        lines.append(f"{'generated':>14} {r['cfg']:>5g} {g['conditional_accuracy']:>15.4f} {g['frechet_distance']:>14.4f}")
    h = rows[-1]["real_heldout"]
    lines.append(f"{'real held-out':>14} {'-':>5} {h['conditional_accuracy']:>15.4f} {h['frechet_distance']:>14.4f}")
    return "\n".join(lines)
