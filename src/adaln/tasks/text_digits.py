"""Task ``text-digits``: a text-conditioned DiT on the 8x8 digits, scored on phrasings never seen in training.

Three variants of ``ConditionalDiT`` see the same captions through different routes: ``pooled`` — the
pooled sentence embedding added to the timestep embedding before AdaLN (SD3); ``tokens`` — the
per-token embeddings through cross-attention (PixArt-alpha); ``both``. Captions come from
``TRAIN_TEMPLATES`` in training and ``HELDOUT_TEMPLATES`` in evaluation, encoded once by
all-MiniLM-L6-v2 (cached). Each training example draws its phrasing, its conditioning noise, whether all
its conditions are dropped, its sigma and its noise from its own (seed, step, index) generator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from adaln.data.digits import load_digits
from adaln.data.text_digits import (
    ENCODER_NAME,
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    EncodedCaptions,
    TextEncoder,
    encode_captions,
    template_captions,
)
from adaln.engine.config import option
from adaln.engine.seeding import Stream, example_generators, generator
from adaln.errors import ConfigError
from adaln.models.conditioning import ConditionalDiT
from adaln.models.systems import is_system
from adaln.outputs import check_output_path, save_array, save_grid
from adaln.tasks._images import (
    ImageDiffusionConfig,
    ImageModelConfig,
    Sampling,
    check_image_model,
    check_objective,
    count_option,
    generate,
    sampling_options,
    training_loss,
)
from adaln.tasks.base import Task, TrainedRun

VARIANTS = ("pooled", "tokens", "both")
# model.arch: our ConditionalDiT ("dit", text.variant picks its routes) or a converted system trained from
# scratch in its own convention; what each system takes of the captions:
SYSTEM_INPUTS = {
    "mmdit": ("context", "pooled"),  # SD3: tokens as the context stream, pooled vector added to t
    "flux": ("context", "pooled"),
    "lumina2": ("context", "context_mask"),
    "zimage": ("context", "context_mask"),
    "pixart": ("context", "context_mask"),
}
ARCHS = ("dit", *SYSTEM_INPUTS)
ROPE_ARCHS = ("flux", "lumina2", "zimage")


@dataclass
class TextModelConfig(ImageModelConfig):
    arch: str = option("dit", choices=ARCHS)


@dataclass
class TextData:
    heldout_fraction: float = option(0.2, gt=0, lt=1)  # digits held out of training (the same split as digits)


@dataclass
class TextSection:
    variant: str = option("both", choices=VARIANTS)  # pooled (AdaLN), tokens (cross-attention) or both
    vec_dropout: float = option(0.1, ge=0, le=1)  # per-conditioner null probabilities (ConditionalDiT)
    token_dropout: float = option(0.1, ge=0, le=1)
    joint_dropout: float = option(0.1, ge=0, le=1)  # every condition nulled at once: guidance's D_u
    cond_noise: float = option(0.0, ge=0)  # training noise on the caption embeddings, relative to their RMS
    cache_dir: str | None = None  # caption-embedding cache; None: $XDG_CACHE_HOME/adaln/text
    per_prompt: int = option(20, ge=1, resumable=True)  # eval: samples per held-out caption


@dataclass
class TextDigitsConfig(ImageDiffusionConfig):
    task: str = "text-digits"
    name: str = "digits-text"
    model: TextModelConfig = field(default_factory=TextModelConfig)
    data: TextData = field(default_factory=TextData)
    text: TextSection = field(default_factory=TextSection)


class TextDigitsTask(Task):
    name = "text-digits"
    config = TextDigitsConfig
    sample_options = ("prompt", "cfg", "sampler", "shift")
    eval_options = ("cfg", "sampler", "shift")

    def __init__(self, cfg: TextDigitsConfig, device: torch.device, *, progress: bool = True,
                 encoder: TextEncoder | None = None):
        super().__init__(cfg, device, progress=progress)
        images, labels = load_digits("train", heldout_fraction=cfg.data.heldout_fraction)
        self.images, self.labels, self.num_examples = images.to(device), labels.to(device), len(images)
        captions, _ = template_captions(TRAIN_TEMPLATES)
        self.encoder_name = ENCODER_NAME if encoder is None else encoder.name
        self.encoded = encode_captions(captions, encoder=encoder, cache_dir=cfg.text.cache_dir).to(device)
        # Conditioning noise relative to the embeddings' RMS over the training captions (real tokens only).
        e = self.encoded
        self.token_std = cfg.text.cond_noise * float(e.tokens[e.mask].square().mean().sqrt())
        self.pooled_std = cfg.text.cond_noise * float(e.pooled.square().mean().sqrt())

    @classmethod
    def check(cls, cfg: TextDigitsConfig) -> None:
        if cfg.model.mixer != "attention":
            raise ConfigError(f"model.mixer must be attention for text-digits (cross-attention needs it), "
                              f"got {cfg.model.mixer!r}")
        check_image_model(cfg.model, 8)
        check_objective(cfg)
        head = cfg.model.hidden_size // cfg.model.num_heads
        if cfg.model.arch in ROPE_ARCHS and head % 2:
            raise ConfigError(f"model.arch {cfg.model.arch} needs an even head width for its RoPE: "
                              f"model.hidden_size / model.num_heads = {head}")

    def info(self) -> dict[str, Any]:
        return {"token_dim": self.encoded.dim, "encoder": self.encoder_name}

    @classmethod
    def model_from(cls, cfg: TextDigitsConfig, info: dict[str, Any]) -> nn.Module:
        m, t, dim = cfg.model, cfg.text, int(info["token_dim"])
        if m.arch != "dit":
            return build_system(m, dim)
        return ConditionalDiT(
            8, m.patch_size, 1, m.hidden_size, m.depth, m.num_heads, m.mlp_ratio,
            vec_dim=dim if t.variant in ("pooled", "both") else None,
            token_dim=dim if t.variant in ("tokens", "both") else None,
            vec_dropout=t.vec_dropout, token_dropout=t.token_dropout, learn_sigma=False,
        )

    def loss(self, net: nn.Module, step: int, indices: Tensor, rank: int) -> Tensor:
        cfg, device = self.cfg, self.device
        gens = example_generators(cfg.seed, step, indices, device)
        idx = indices.to(device)
        x0, y = self.images[idx], self.labels[idx]
        phrasing = torch.cat([torch.randint(len(TRAIN_TEMPLATES), (1,), generator=g, device=device) for g in gens])
        tokens, mask, pooled = self.encoded.select(phrasing * 10 + y)
        if cfg.text.cond_noise > 0:
            tokens, pooled = condition_noise(tokens, mask, pooled, self.token_std, self.pooled_std, gens,
                                             self.encoded.tokens.shape[1])
        # Joint dropout: these examples lose every condition at once (what guidance's D_u sees).
        drop = torch.cat([torch.rand(1, generator=g, device=device) for g in gens]) < cfg.text.joint_dropout
        if is_system(net):
            cond = system_cond(cfg.model.arch, *drop_captions(tokens, mask, pooled, drop))
        else:
            cond = text_cond(unwrap(net), tokens, mask & ~drop[:, None], torch.where(drop[:, None], 0.0, pooled))
        dropout = generator(cfg.seed, Stream.DROPOUT, rank, step, device=device)
        return training_loss(cfg, net, x0, gens, dropout, **cond)

    # ---- inference ---------------------------------------------------------------------------------
    @classmethod
    def sample(cls, run: TrainedRun, options: dict[str, Any]) -> str:
        prompts = options.get("prompt")
        if not prompts:
            raise ConfigError(f"{run.run_dir} holds a text-conditioned model: give --prompt \"...\" (repeatable)")
        out = check_output_path(options.get("output") or run.run_dir / "prompts.png")
        images = sample_prompts(run, prompts, out, options)
        return f"wrote {out} and {out.with_suffix('.npy')}: {len(images)} samples for {len(prompts)} prompt(s)"

    @classmethod
    def evaluate(cls, run: TrainedRun, options: dict[str, Any]) -> str:
        import json

        return json.dumps(score(run, options), indent=2)


def unwrap(net: nn.Module) -> ConditionalDiT:
    return getattr(net, "module", net)


def build_system(m: TextModelConfig, dim: int) -> nn.Module:
    """A converted system at the preset's small size for 8x8 single-channel digits, context and pooled
    widths ``dim`` (the text encoder's)."""
    if m.arch == "mmdit":
        from adaln.models.mmdit import MMDiT

        return MMDiT(sample_size=8, patch_size=m.patch_size, in_channels=1, hidden_size=m.hidden_size,
                     depth=m.depth, num_heads=m.num_heads, context_dim=dim, pooled_dim=dim,
                     pos_embed_max_size=8 // m.patch_size)
    if m.arch == "flux":
        from adaln.models.flux import Flux

        double = max(1, m.depth // 3)  # FLUX.1's 19 double : 38 single blocks, at model.depth blocks in all
        return Flux(sample_size=8, patch_size=m.patch_size, in_channels=1, hidden_size=m.hidden_size, depth=double,
                    depth_single_blocks=max(1, m.depth - double), num_heads=m.num_heads, context_dim=dim,
                    pooled_dim=dim, mlp_ratio=m.mlp_ratio)
    if m.arch == "pixart":
        from adaln.models.pixart import PixArt

        return PixArt(sample_size=8, patch_size=m.patch_size, in_channels=1, hidden_size=m.hidden_size,
                      depth=m.depth, num_heads=m.num_heads, context_dim=dim, mlp_ratio=m.mlp_ratio,
                      learn_sigma=False)
    head = m.hidden_size // m.num_heads
    row = 2 * (3 * head // 16)  # RoPE widths (caption, row, column) near Z-Image's 32:48:48, each even
    axes = (head - 2 * row, row, row)
    if m.arch == "lumina2":
        from adaln.models.lumina2 import Lumina2

        return Lumina2(sample_size=8, patch_size=m.patch_size, in_channels=1, hidden_size=m.hidden_size,
                       depth=m.depth, num_refiner_layers=1, num_heads=m.num_heads,
                       num_kv_heads=max(1, m.num_heads // 2), context_dim=dim, multiple_of=32, axes_dim=axes)
    from adaln.models.zimage import ZImage

    return ZImage(patch_size=m.patch_size, in_channels=1, hidden_size=m.hidden_size, depth=m.depth,
                  num_refiner_layers=1, num_heads=m.num_heads, context_dim=dim, axes_dim=axes)


def drop_captions(tokens: Tensor, mask: Tensor, pooled: Tensor, drop: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Dropped rows become the null caption (``null_caption``): zero tokens, only the first one kept,
    zero pooled vector."""
    null_tokens, null_mask, null_pooled = null_caption(mask.shape[1], tokens.device)
    d = drop[:, None]
    return (torch.where(d[..., None], null_tokens, tokens), torch.where(d, null_mask, mask),
            torch.where(d, null_pooled, pooled))


def null_caption(length: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The systems' null caption, as an empty prompt encodes to one token: zero tokens (L, 1 broadcast),
    a mask keeping the first position only (so masked attention always has a key), zero pooled vector."""
    mask = torch.zeros(length, dtype=torch.bool, device=device)
    mask[0] = True
    zero = torch.zeros((), device=device)
    return zero, mask, zero


def system_cond(arch: str, tokens: Tensor, mask: Tensor, pooled: Tensor) -> dict[str, Tensor]:
    """The keyword arguments of a system for encoded captions (``SYSTEM_INPUTS``); systems without a
    mask see the padding as zero tokens."""
    full = {"context": tokens * mask[..., None], "pooled": pooled, "context_mask": mask}
    return {k: full[k] for k in SYSTEM_INPUTS[arch]}


def system_null_cond(arch: str, length: int, device: torch.device) -> dict[str, object]:
    tokens, mask, pooled = null_caption(length, device)
    return {k: v for k, v in (("context", tokens), ("pooled", pooled), ("context_mask", mask))
            if k in SYSTEM_INPUTS[arch]}


def condition_noise(tokens: Tensor, mask: Tensor, pooled: Tensor, token_std: float, pooled_std: float,
                    gens: list[torch.Generator], max_len: int) -> tuple[Tensor, Tensor]:
    """Conditioning augmentation: Gaussian noise of std ``token_std`` on the real tokens and ``pooled_std``
    on the pooled vectors, so the model learns a neighbourhood of each training caption rather than a
    point (80 captions are otherwise memorised and unseen phrasings fall between them).

    Row ``i`` draws from generator ``i`` only: its pooled noise (D), then noise for ``max_len`` token
    positions (the longest caption of the data set), of which the batch's ``L <= max_len`` are used, so
    what a row draws does not depend on the other captions of the batch.
    tokens (B, L, D), mask (B, L), pooled (B, D)."""
    length, dim = tokens.shape[1:]
    noise_p = torch.stack([torch.randn(pooled.shape[1:], generator=g, dtype=pooled.dtype, device=g.device)
                           for g in gens]).to(pooled.device)
    noise_t = torch.stack([torch.randn((max_len, dim), generator=g, dtype=tokens.dtype, device=g.device)[:length]
                           for g in gens]).to(tokens.device)
    return tokens + token_std * noise_t * mask[..., None], pooled + pooled_std * noise_p


def text_cond(model: ConditionalDiT, tokens: Tensor, mask: Tensor, pooled: Tensor) -> dict[str, Tensor]:
    """The keyword arguments of ``model`` for encoded captions: vec and/or tokens + token_mask."""
    cond = {}
    if model.vec_dim is not None:
        cond["vec"] = pooled
    if model.token_dim is not None:
        cond["tokens"], cond["token_mask"] = tokens, mask
    return cond


def _encode(run: TrainedRun, captions: list[str], encoder: TextEncoder | None) -> EncodedCaptions:
    if run.task is not TextDigitsTask:
        raise ConfigError(f"{run.run_dir} holds a {run.task.name} run, which takes no text: prompts need a "
                          "text-digits run (adaln train --config digits-text)")
    trained_with = run.info.get("encoder", ENCODER_NAME)
    if (encoder.name if encoder is not None else ENCODER_NAME) != trained_with:
        raise ConfigError(f"{run.run_dir} was trained with the text encoder {trained_with!r}; pass that encoder")
    return encode_captions(captions, encoder=encoder, cache_dir=run.cfg.text.cache_dir)


def generate_from_captions(run: TrainedRun, encoded: EncodedCaptions, per_prompt: int, how: Sampling, *,
                           seed: int = 0, chunk: int = 500) -> Tensor:
    """``per_prompt`` samples of each caption, caption-major: (P * per_prompt, 1, 8, 8) in [-1, 1]; sample
    ``k`` of caption ``p`` from the generation generator (seed, p, k)."""
    model, device = run.model, run.device
    which = torch.arange(len(encoded.captions)).repeat_interleave(per_prompt)
    gens = [generator(seed, Stream.GENERATE, p, k, device=device)
            for p in range(len(encoded.captions)) for k in range(per_prompt)]

    system = is_system(model)
    length = encoded.tokens.shape[1]  # every chunk padded to the longest caption: one null shape

    def conds():
        for i in range(0, len(which), chunk):
            idx = which[i : i + chunk]
            if system:
                tokens, mask, pooled = encoded.tokens[idx], encoded.mask[idx], encoded.pooled[idx]
                yield system_cond(run.cfg.model.arch, tokens.to(device), mask.to(device), pooled.to(device))
            else:
                tokens, mask, pooled = encoded.select(idx)
                yield text_cond(model, tokens.to(device), mask.to(device), pooled.to(device))

    null = system_null_cond(run.cfg.model.arch, length, device) if system else model.null_cond()
    images, _ = generate(
        model, (model.in_channels, 8, 8), conds(), gens, how=how, cfg=run.cfg, null_cond=null, chunk=chunk,
        device=device,
    )
    return images


def sample_prompts(run: TrainedRun, prompts: list[str], output: Any, options: dict[str, Any],
                   encoder: TextEncoder | None = None) -> Tensor:
    """Encode the prompts, sample with guidance, write a PNG grid (one row per prompt) and the .npy."""
    if not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError("--prompt must be a non-empty text")
    how = sampling_options(run.cfg, options)
    images = generate_from_captions(run, _encode(run, list(prompts), encoder), count_option(options, 8), how,
                                    seed=options.get("seed", 0))
    save_grid(images, len(prompts), output)
    save_array(output.with_suffix(".npy"), images)
    return images


def score(run: TrainedRun, options: dict[str, Any], *, templates: str = "heldout",
          encoder: TextEncoder | None = None) -> dict[str, Any]:
    """Sample every caption of ``templates`` ("heldout": phrasings never seen in training) and score with
    ``DigitsScorer`` against the digit each caption names; also written to RUN/eval.json."""
    from adaln.eval import DigitsScorer
    from adaln.outputs import write_json

    how = sampling_options(run.cfg, options)
    per_prompt = count_option(options, run.cfg.text.per_prompt)
    captions, labels = template_captions(templates)
    t0 = time.perf_counter()
    images = generate_from_captions(run, _encode(run, captions, encoder), per_prompt, how,
                                    seed=options.get("seed", 0))
    sampling_s = time.perf_counter() - t0
    requested = labels.repeat_interleave(per_prompt)
    scorer = DigitsScorer.load_or_fit(run.run_dir / "digits_classifier")
    scores = scorer.evaluate_samples(images.cpu(), requested)
    correct = (scorer.predict(images.cpu()) == requested).double().view(-1, 10 * per_prompt).mean(dim=1)
    names = HELDOUT_TEMPLATES if templates == "heldout" else TRAIN_TEMPLATES
    result = {
        **scores,
        "per_template_accuracy": {t: round(float(a), 4) for t, a in zip(names, correct)},
        "samples": int(len(images)), "sampling_seconds": round(sampling_s, 2), "cfg": how.scale, "step": run.step,
        "objective": run.cfg.objective, "sampler": how.sampler, "steps": how.steps,
    }
    write_json(run.run_dir / "eval.json", result)
    return result
