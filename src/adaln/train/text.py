"""The text-conditioned digits job: train, sample from prompts, and score on held-out phrasings.

Three variants of ``ConditionalDiT`` see the same captions through different routes (seed 002):
``pooled`` -- the pooled sentence embedding added to the timestep embedding before AdaLN (SD3);
``tokens`` -- the per-token embeddings through cross-attention (PixArt-alpha); ``both``.
Captions come from ``TRAIN_TEMPLATES`` in training and from ``HELDOUT_TEMPLATES`` in evaluation, so the
score measures phrasings the model never saw. Randomness per step is stateless as in
``adaln.train.loop``: generators seeded by (seed, step) draw the captions, sigmas, noise and dropout.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor
from tqdm.auto import tqdm

from adaln.data.digits import load_digits
from adaln.data.text_digits import (
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    EncodedCaptions,
    TextEncoder,
    encode_captions,
    template_captions,
)
from adaln.diffusion import ClassifierFreeGuidance, denoising_loss, sample_edm, sample_training_sigmas
from adaln.models.conditioning import ConditionalDiT, conditional_dit_edm_denoiser, drop_samples
from adaln.train.checkpoint import load_checkpoint, save_checkpoint
from adaln.train.config import ConfigError, TrainConfig, preset_names
from adaln.train.ema import EMA
from adaln.train.generate import find_checkpoint, save_grid
from adaln.train.loop import (
    MetricsLog, batch_indices, optimizer_step, require_finite, resolve_device, resume_or_start, stream_seed,
)

VARIANTS = ("pooled", "tokens", "both")
TEXT_PRESET = "digits-text"


#################################################################################
#                                 Configuration                                 #
#################################################################################


@dataclass
class TextConfig:
    variant: str = "both"  # "pooled" (AdaLN), "tokens" (cross-attention) or "both"
    vec_dropout: float = 0.1  # per-conditioner null probabilities (ConditionalDiT)
    token_dropout: float = 0.1
    joint_dropout: float = 0.1  # probability of nulling every condition of a sample: guidance's D_u
    cond_noise: float = 0.0  # training noise on the caption embeddings, relative to their RMS
    cache_dir: str | None = None  # caption-embedding cache; None: $XDG_CACHE_HOME/adaln/text
    per_prompt: int = 20  # eval: samples per held-out caption


@dataclass
class TextTrainConfig(TrainConfig):
    text: TextConfig = field(default_factory=TextConfig)


def is_text_config(source: str | None) -> bool:
    """Whether a preset name or YAML file configures the text job (has a top-level ``text`` section)."""
    if not source:
        return False
    if source.endswith((".yaml", ".yml")):
        path = Path(source)
        text = path.read_text() if path.is_file() else ""
    elif source in preset_names():
        text = resources.files("adaln.presets").joinpath(f"{source}.yaml").read_text()
    else:
        return False
    try:
        return isinstance(data := yaml.safe_load(text), dict) and "text" in data
    except yaml.YAMLError:
        return False


def load_text_config(source: str = TEXT_PRESET, overrides: dict[str, Any] | None = None) -> TextTrainConfig:
    """``TextTrainConfig`` from a preset name or YAML path, then dotted ``overrides`` (None values skipped)."""
    if source.endswith((".yaml", ".yml")):
        if not Path(source).is_file():
            raise ConfigError(f"config file not found: {source}")
        text = Path(source).read_text()
    elif source in preset_names():
        text = resources.files("adaln.presets").joinpath(f"{source}.yaml").read_text()
    else:
        raise ConfigError(f"unknown preset {source!r}; choose one of {preset_names()} or pass a .yaml file")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TextTrainConfig), OmegaConf.create(text))
        for key, value in (overrides or {}).items():
            if value is not None:
                OmegaConf.update(merged, key, value, merge=False)
        cfg = OmegaConf.to_object(merged)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"invalid config {source!r}: {str(e).splitlines()[0]}") from None
    _check_text_config(cfg)
    return cfg


def text_config_from_dict(d: dict[str, Any]) -> TextTrainConfig:
    """Rebuild a ``TextTrainConfig`` saved with ``to_dict`` (a checkpoint's state.json)."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TextTrainConfig), d))
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid saved text config: {str(e).splitlines()[0]}") from None
    _check_text_config(cfg)
    return cfg


def _check_text_config(cfg: TextTrainConfig) -> None:
    t = cfg.text
    if t.variant not in VARIANTS:
        raise ConfigError(f"text.variant must be one of {VARIANTS}, got {t.variant!r}")
    if t.cond_noise < 0:
        raise ConfigError(f"text.cond_noise must be >= 0, got {t.cond_noise}")
    for name in ("vec_dropout", "token_dropout", "joint_dropout"):
        if not 0.0 <= getattr(t, name) <= 1.0:
            raise ConfigError(f"text.{name} must be in [0, 1], got {getattr(t, name)}")
    if getattr(cfg.model, "mixer", "attention") != "attention":
        raise ConfigError(f"the text job's DiT mixes tokens with attention; got model.mixer={cfg.model.mixer!r}")
    if cfg.data.name != "digits" or cfg.data.image_size != 8:
        raise ConfigError("the text job trains on the 8x8 digits only (data.name digits, image_size 8)")


#################################################################################
#                                 Model and data                                #
#################################################################################


def build_text_model(cfg: TextTrainConfig, token_dim: int) -> ConditionalDiT:
    """The ``ConditionalDiT`` of ``cfg.text.variant`` for a text encoder of width ``token_dim``."""
    m, t = cfg.model, cfg.text
    return ConditionalDiT(
        cfg.data.image_size, m.patch_size, 1, m.hidden_size, m.depth, m.num_heads, m.mlp_ratio,
        vec_dim=token_dim if t.variant in ("pooled", "both") else None,
        token_dim=token_dim if t.variant in ("tokens", "both") else None,
        vec_dropout=t.vec_dropout, token_dropout=t.token_dropout, learn_sigma=False,
    )


def text_cond(model: ConditionalDiT, tokens: Tensor, mask: Tensor, pooled: Tensor) -> dict[str, Tensor]:
    """The keyword arguments of ``model`` for encoded captions: vec and/or tokens + token_mask."""
    cond = {}
    if model.vec_dim is not None:
        cond["vec"] = pooled
    if model.token_dim is not None:
        cond["tokens"], cond["token_mask"] = tokens, mask
    return cond


def condition_noise(
    tokens: Tensor, mask: Tensor, pooled: Tensor, token_std: float, pooled_std: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Conditioning augmentation: Gaussian noise of std ``token_std`` on the real tokens and ``pooled_std``
    on the pooled vectors, so the model learns a neighbourhood of each training caption rather than a
    point (80 captions are otherwise memorised and unseen phrasings fall between them)."""
    def noise(like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    return tokens + token_std * noise(tokens) * mask[..., None], pooled + pooled_std * noise(pooled)


_DATA_STREAM, _DROPOUT_STREAM, _SAMPLE_STREAM = 11, 12, 13


#################################################################################
#                                    Training                                   #
#################################################################################


@dataclass
class TextTrainResult:
    run_dir: Path
    step: int
    final_loss: float
    seconds: float


def train_text(
    cfg: TextTrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
    encoder: TextEncoder | None = None,
) -> TextTrainResult:
    """Train ``cfg`` into ``run_dir`` (checkpoints, metrics.jsonl/csv, loss.png, config.json).

    Each step draws, per image, one training phrasing of its class; captions were encoded once
    (``encode_captions``, cached). ``encoder`` None loads all-MiniLM-L6-v2 unless the cache has them.
    """
    _check_text_config(cfg)
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    images, labels = load_digits("train", heldout_fraction=cfg.data.heldout_fraction)
    captions, _ = template_captions(TRAIN_TEMPLATES)
    encoded = encode_captions(captions, encoder=encoder, cache_dir=cfg.text.cache_dir).to(device)
    torch.manual_seed(cfg.seed)  # the initial weights depend on the run's seed only
    model = build_text_model(cfg, encoded.dim).to(device)
    denoiser = conditional_dit_edm_denoiser(model, sigma_data=cfg.sigma_data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(model, decay=cfg.ema_decay, warmup=cfg.ema_warmup)

    start = resume_or_start(run_dir, resume, model=model, optimizer=optimizer, ema=ema)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    images, labels = images.to(device), labels.to(device)
    n_templates = len(TRAIN_TEMPLATES)
    # Noise relative to the embeddings' RMS over the training captions (real tokens only).
    token_std = cfg.text.cond_noise * float(encoded.tokens[encoded.mask].square().mean().sqrt())
    pooled_std = cfg.text.cond_noise * float(encoded.pooled.square().mean().sqrt())
    log = MetricsLog(run_dir, append=start > 0)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="train")
    t0 = last_t = time.perf_counter()
    loss_value = float("nan")
    model.train()
    for step in bar:
        idx = batch_indices(len(images), step, cfg.batch_size, cfg.seed).to(device)
        x0, y = images[idx], labels[idx]
        gen = torch.Generator(device=device).manual_seed(stream_seed(cfg.seed, _DATA_STREAM, step))
        drop_gen = torch.Generator(device=device).manual_seed(stream_seed(cfg.seed, _DROPOUT_STREAM, step))
        phrasing = torch.randint(n_templates, (len(idx),), generator=gen, device=device)
        tokens, mask, pooled = encoded.select(phrasing * 10 + y)
        if cfg.text.cond_noise > 0:
            tokens, pooled = condition_noise(tokens, mask, pooled, token_std, pooled_std, gen)
        # Joint dropout: these samples lose every condition at once (what guidance's D_u sees).
        drop = drop_samples(len(idx), cfg.text.joint_dropout, drop_gen, device)
        cond = text_cond(model, tokens, mask & ~drop[:, None], torch.where(drop[:, None], 0.0, pooled))
        sigma = sample_training_sigmas(len(x0), "edm", p_mean=cfg.p_mean, p_std=cfg.p_std, generator=gen,
                                       device=device)
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = denoising_loss(partial(denoiser, generator=drop_gen), x0, sigma, sigma_data=cfg.sigma_data,
                                  generator=gen, **cond)
        grad_norm = optimizer_step(loss, model, optimizer, ema, cfg.grad_clip)
        loss_value = require_finite(loss.item(), step)
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
                run_dir, done, model=model, optimizer=optimizer, ema=ema, config=cfg.to_dict(),
                keep_last=cfg.keep_last,
                extra={"loss": loss_value, "in_channels": 1, "token_dim": encoded.dim, "text": True},
            )
    log.close()
    return TextTrainResult(run_dir, max(start, cfg.steps), loss_value, time.perf_counter() - t0)


#################################################################################
#                                Loading a run                                  #
#################################################################################


@dataclass
class TextRun:
    cfg: TextTrainConfig
    model: ConditionalDiT
    step: int
    checkpoint: Path


def is_text_run(path: str | Path) -> bool:
    """Whether the run (or checkpoint) directory ``path`` holds a text-conditioned model."""
    state = json.loads((find_checkpoint(path) / "state.json").read_text())
    return isinstance(state.get("config"), dict) and "text" in state["config"]


def require_text_run(path: str | Path) -> None:
    """Raise ``ConfigError`` unless ``path`` is a text-conditioned run (for ``adaln sample --prompt``)."""
    if not is_text_run(path):
        raise ConfigError(
            f"{path} holds a class-conditional model, which takes no text: --prompt needs a run trained "
            f"with --config {TEXT_PRESET}; sample this one with --classes"
        )


def load_text_run(path: str | Path, *, device: str = "auto", use_ema: bool = True) -> TextRun:
    """Rebuild a text run's model from its checkpoint's config and load EMA (or raw) weights."""
    require_text_run(path)
    ckpt = find_checkpoint(path)
    state = json.loads((ckpt / "state.json").read_text())
    cfg = text_config_from_dict(state["config"])
    model = build_text_model(cfg, int(state["extra"]["token_dim"]))
    ema = EMA(model, decay=cfg.ema_decay, warmup=cfg.ema_warmup) if use_ema else None
    load_checkpoint(ckpt, model=model, ema=ema, rng=False)
    if ema is not None:
        ema.copy_to(model)
    model.to(resolve_device(device)).eval()
    return TextRun(cfg, model, int(state["step"]), ckpt)


#################################################################################
#                                   Sampling                                    #
#################################################################################


@torch.no_grad()
def generate_from_captions(
    run: TextRun, encoded: EncodedCaptions, per_prompt: int, *, cfg_scale: float, steps: int,
    seed: int = 0, chunk: int = 500,
) -> Tensor:
    """``per_prompt`` samples of each encoded caption, caption-major: (P * per_prompt, 1, 8, 8) in [-1, 1].

    Heun (EDM) sampling guided by ``ClassifierFreeGuidance`` with ``model.null_cond()``; sample ``k`` of
    caption ``p`` starts from a generator seeded by (seed, p, k), so it does not depend on the batch.
    """
    if cfg_scale < 0:
        raise ConfigError(f"--cfg must be >= 0, got {cfg_scale}")
    if per_prompt < 1 or steps < 1:
        raise ConfigError("--per-prompt and --steps must be >= 1")
    model = run.model
    device = next(model.parameters()).device
    denoiser = conditional_dit_edm_denoiser(model, sigma_data=run.cfg.sigma_data)
    guided = ClassifierFreeGuidance(denoiser, cfg_scale, null_cond=model.null_cond())
    which = torch.arange(len(encoded.captions)).repeat_interleave(per_prompt)
    gens = [torch.Generator(device=device).manual_seed(stream_seed(seed, _SAMPLE_STREAM, int(p), k))
            for p in range(len(encoded.captions)) for k in range(per_prompt)]
    out = []
    for i in range(0, len(which), chunk):
        tokens, mask, pooled = encoded.select(which[i : i + chunk])
        cond = text_cond(model, tokens.to(device), mask.to(device), pooled.to(device))
        shape = (len(tokens), model.in_channels, *model.input_size)
        res = sample_edm(guided, shape, steps=steps, generator=gens[i : i + chunk], device=device, **cond)
        out.append(res.samples.clamp(-1, 1))
    return torch.cat(out)


def sample_prompts(
    run_path: str | Path, prompts: list[str], output: str | Path, *, per_prompt: int = 8,
    cfg_scale: float | None = None, steps: int | None = None, seed: int = 0, device: str = "auto",
    use_ema: bool = True, encoder: TextEncoder | None = None,
) -> Tensor:
    """``adaln sample RUN --prompt TEXT``: encode the prompts, sample with CFG, write a PNG grid (one row
    per prompt) and the raw array beside it (.npy). Returns the samples (P * per_prompt, 1, 8, 8).
    Raises ``ConfigError`` for a class-conditional run."""
    import numpy as np

    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError("--prompt must be a non-empty text")
    run = load_text_run(run_path, device=device, use_ema=use_ema)
    s = run.cfg.sample
    encoded = encode_captions(list(prompts), encoder=encoder, cache_dir=run.cfg.text.cache_dir)
    images = generate_from_captions(
        run, encoded, per_prompt, cfg_scale=s.cfg if cfg_scale is None else cfg_scale,
        steps=steps or s.steps, seed=seed,
    )
    output = Path(output)
    save_grid(images, len(prompts), output)
    np.save(output.with_suffix(".npy"), images.cpu().numpy())
    return images


#################################################################################
#                                  Evaluation                                   #
#################################################################################


def evaluate_text_run(
    run_path: str | Path, *, templates: str = "heldout", per_prompt: int | None = None,
    cfg_scale: float | None = None, steps: int | None = None, seed: int = 0, device: str = "auto",
    scorer_dir: str | Path | None = None, encoder: TextEncoder | None = None,
) -> dict[str, Any]:
    """Sample every caption of ``templates`` ("heldout": phrasings never seen in training) and score the
    samples with ``DigitsScorer`` against the digit each caption names.

    Returns ``{"conditional_accuracy", "frechet_distance", "per_template_accuracy", "samples",
    "sampling_seconds", "cfg", "step"}``.
    """
    from adaln.eval import DigitsScorer

    run = load_text_run(run_path, device=device)
    s = run.cfg.sample
    per_prompt = per_prompt or run.cfg.text.per_prompt
    w = s.cfg if cfg_scale is None else cfg_scale
    captions, labels = template_captions(templates)
    encoded = encode_captions(captions, encoder=encoder, cache_dir=run.cfg.text.cache_dir)
    t0 = time.perf_counter()
    images = generate_from_captions(run, encoded, per_prompt, cfg_scale=w, steps=steps or s.steps, seed=seed)
    sampling_s = time.perf_counter() - t0
    requested = labels.repeat_interleave(per_prompt)
    scorer = DigitsScorer.load_or_fit(scorer_dir)
    scores = scorer.evaluate_samples(images.cpu(), requested)
    correct = (scorer.predict(images.cpu()) == requested).double().view(-1, 10 * per_prompt).mean(dim=1)
    names = HELDOUT_TEMPLATES if templates == "heldout" else TRAIN_TEMPLATES
    return {
        **scores,
        "per_template_accuracy": {t: round(float(a), 4) for t, a in zip(names, correct)},
        "samples": int(len(images)),
        "sampling_seconds": round(sampling_s, 2),
        "cfg": w,
        "step": run.step,
    }


UNSEEN_PROMPTS = ("a hand-drawn three", "someone wrote the numeral 7", "a scribbled five on paper",
                  "digit: zero", "the figure 8, written by hand")


def compare_variants(
    out_dir: str | Path, *, variants: tuple[str, ...] = VARIANTS, overrides: dict[str, Any] | None = None,
    progress: bool = False, encoder: TextEncoder | None = None,
) -> list[dict[str, Any]]:
    """Train each variant with the same preset and steps, score it on held-out phrasings, and write
    ``results.md`` (variant, accuracy, Frechet distance, train time), ``results.json`` and one grid
    ``grid_{variant}.png`` of ``UNSEEN_PROMPTS`` (one row per prompt)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in variants:
        cfg = load_text_config(TEXT_PRESET, {**(overrides or {}), "text.variant": variant})
        run_dir = out_dir / variant
        result = train_text(cfg, run_dir, resume=True, progress=progress, encoder=encoder)
        scores = evaluate_text_run(run_dir, scorer_dir=out_dir / "digits_classifier", encoder=encoder)
        sample_prompts(run_dir, list(UNSEEN_PROMPTS), out_dir / f"grid_{variant}.png", encoder=encoder)
        rows.append({"variant": variant, "train_seconds": round(result.seconds, 1), "steps": result.step,
                     "final_loss": result.final_loss, **scores})
        (out_dir / "results.json").write_text(json.dumps({"config": asdict(cfg), "rows": rows}, indent=2))
    (out_dir / "results.md").write_text(results_table(rows))
    return rows


def results_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: variant, held-out-phrasing accuracy, Frechet distance, train time."""
    routes = {"pooled": "pooled -> AdaLN", "tokens": "tokens -> cross-attention", "both": "both"}
    lines = ["| variant | held-out-phrasing accuracy | Frechet distance | train time (s) | steps |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {routes.get(r['variant'], r['variant'])} | {r['conditional_accuracy']:.3f} | "
                     f"{r['frechet_distance']:.2f} | {r['train_seconds']:.0f} | {r['steps']} |")
    return "\n".join(lines) + "\n"
