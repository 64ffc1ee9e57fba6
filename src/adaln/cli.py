"""The ``adaln`` command: train, sample, eval and demo (train + sample + eval on the bundled digits).

User errors (unknown preset, missing data, bad class ids, bad checkpoints, ...) print one line
``adaln: error: ...`` and exit with status 2; ``ADALN_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from adaln.train.checkpoint import CheckpointError
from adaln.train.config import ConfigError, load_config, preset_names
from adaln.train.conformers import is_conformer_config, is_conformer_run
from adaln.train.text import (
    evaluate_text_run,
    is_text_config,
    is_text_run,
    load_text_config,
    sample_prompts,
    train_text,
)

DEFAULT_RUN = "runs/digits"


def _parse_classes(text: str | None, num_classes: int) -> list[int]:
    if text is None:
        return list(range(num_classes))
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"--classes must be comma-separated integers, got {text!r}") from None


def cmd_train(args: argparse.Namespace) -> int:
    from adaln.train.loop import train

    overrides = {
        "steps": args.steps, "batch_size": args.batch_size, "device": args.device,
        "seed": args.seed, "data.root": args.data_root, "model.mixer": args.mixer,
    }
    if is_conformer_config(args.config):
        return _train_conformers(args, overrides)
    if is_text_config(args.config):
        if args.distributed != "none":
            raise ConfigError("--distributed is not supported by the text-conditioned job")
        cfg = load_text_config(args.config, overrides)
        result = train_text(cfg, args.out, resume=args.resume, progress=not args.quiet)
        print(f"trained {cfg.name} to step {result.step} in {result.seconds:.1f} s; final loss "
              f"{result.final_loss:.4f}; run directory {result.run_dir}")
        return 0
    cfg = load_config(args.config, overrides)
    result = train(cfg, args.out, resume=args.resume, progress=not args.quiet, distributed=args.distributed)
    if result.rank == 0:
        print(f"trained {cfg.name} to step {result.step} in {result.seconds:.1f} s; final loss "
              f"{result.final_loss:.4f}; run directory {result.run_dir}")
    return 0


def _train_conformers(args: argparse.Namespace, overrides: dict) -> int:
    from adaln.train.conformers import load_conformer_config, train_conformers

    for flag, value in (("--mixer", args.mixer), ("--data-root", args.data_root)):
        if value is not None:
            raise ConfigError(f"{flag} does not apply to the conformer job")
    if args.distributed != "none":
        raise ConfigError("--distributed is not supported by the conformer job")
    keep = {k: v for k, v in overrides.items() if k in ("steps", "batch_size", "device", "seed")}
    cfg = load_conformer_config(args.config, keep)
    result = train_conformers(cfg, args.out, resume=args.resume, progress=not args.quiet)
    print(f"trained {cfg.name} to step {result.step} in {result.seconds:.1f} s; final loss "
          f"{result.final_loss:.4f}; sigma_data {result.sigma_data:.3f} A; run directory {result.run_dir}")
    return 0


def _sample_conformers(args: argparse.Namespace) -> int:
    from adaln.train.conformers import sample_component

    if not args.component:
        raise ConfigError(f"{args.run} holds a conformer model: give --component ID (a CCD id such as ATP)")
    out = args.output or f"{args.component.lower()}.cif"
    r = sample_component(args.run, args.component, n=args.n, seed=args.seed, out=out, device=args.device,
                         use_ema=not args.no_ema, sample={"steps": args.steps, "step_scale": args.step_scale})
    rmsd = ", ".join(f"{x:.2f}" for x in r["rmsd_sym"])
    print(f"wrote {r['cif']} ({args.n} models) and {r['png']}; RMSD to the CCD ideal conformer "
          f"(symmetry-aware, A): {rmsd}; step {r['step']}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from adaln.train.generate import find_checkpoint, generate, load_run, save_grid

    if is_conformer_run(args.run):
        return _sample_conformers(args)
    if args.component or args.step_scale is not None:
        raise ConfigError(
            "--component and --step-scale need a conformer run (adaln train --config ccd-conformers)"
        )
    if args.prompt:
        out = Path(args.output or Path(args.run) / "prompts.png")
        images = sample_prompts(args.run, args.prompt, out, per_prompt=args.per_class, cfg_scale=args.cfg,
                                steps=args.steps, seed=args.seed, device=args.device, use_ema=not args.no_ema)
        print(f"wrote {out} and {out.with_suffix('.npy')}: {len(images)} samples for {len(args.prompt)} prompt(s)")
        return 0
    if is_text_run(find_checkpoint(args.run)):
        raise ConfigError(f"{args.run} holds a text-conditioned model: give --prompt \"...\"")
    run = load_run(args.run, device=args.device, use_ema=not args.no_ema)
    classes = _parse_classes(args.classes, run.num_classes)
    s = run.cfg.sample
    cfg_scale = s.cfg if args.cfg is None else args.cfg
    images, _, nfe = generate(
        run, classes, args.per_class, cfg_scale=cfg_scale, steps=args.steps or s.steps,
        sampler=args.sampler or s.sampler, seed=args.seed,
    )
    out = Path(args.output or Path(args.run if Path(args.run).is_dir() else ".") / "grid.png")
    save_grid(images, len(classes), out)
    np.save(out.with_suffix(".npy"), images.cpu().numpy())
    weights = "raw" if args.no_ema else "EMA"
    print(f"wrote {out} and {out.with_suffix('.npy')}: {len(images)} samples, cfg {cfg_scale:g}, "
          f"{nfe} denoiser calls per sample, step {run.step} {weights} weights")
    return 0


def evaluate_run(run_dir: str | Path, *, cfg_scale: float | None, per_class: int | None, steps: int | None,
                 seed: int = 0, device: str = "auto") -> dict:
    """Sample every class, score with the digits classifier, write eval.json (+ eval_cfg{W}.json)."""
    from adaln.eval import DigitsScorer
    from adaln.train.generate import generate, load_run

    run = load_run(run_dir, device=device)
    if run.cfg.data.name != "digits":
        raise ConfigError("adaln eval scores the digits data set only (its classifier is trained on digits)")
    s = run.cfg.sample
    w = s.cfg if cfg_scale is None else cfg_scale
    t0 = time.perf_counter()
    images, labels, nfe = generate(
        run, list(range(run.num_classes)), per_class or s.per_class, cfg_scale=w,
        steps=steps or s.steps, sampler=s.sampler, seed=seed,
    )
    sample_s = time.perf_counter() - t0
    scorer = DigitsScorer.load_or_fit(run.checkpoint.parent.parent / "digits_classifier")
    result = {
        "cfg": w,
        "generated": scorer.evaluate_samples(images.cpu(), labels.cpu()),
        "real_heldout": scorer.real_heldout_reference(),
        "samples": int(len(images)),
        "nfe": nfe,
        "sampling_seconds": round(sample_s, 2),
        "step": run.step,
    }
    run_path = Path(run_dir) if Path(run_dir).is_dir() and not (Path(run_dir) / "state.json").exists() \
        else run.checkpoint.parent.parent
    text = json.dumps(result, indent=2)
    (run_path / f"eval_cfg{w:g}.json").write_text(text)
    (run_path / "eval.json").write_text(text)
    return result


def _print_eval(rows: list[dict]) -> None:
    print(f"{'':>14} {'cfg':>5} {'cond. accuracy':>15} {'Frechet dist.':>14}")
    for r in rows:
        g = r["generated"]
        print(f"{'generated':>14} {r['cfg']:>5g} {g['conditional_accuracy']:>15.4f} {g['frechet_distance']:>14.4f}")
    h = rows[-1]["real_heldout"]
    print(f"{'real held-out':>14} {'-':>5} {h['conditional_accuracy']:>15.4f} {h['frechet_distance']:>14.4f}")


def cmd_eval(args: argparse.Namespace) -> int:
    from adaln.train.generate import find_checkpoint

    if is_conformer_run(args.run):
        from adaln.train.conformers import evaluate_conformers

        result = evaluate_conformers(args.run, k=args.n, limit=args.limit, seed=args.seed, device=args.device,
                                     sample={"steps": args.steps, "step_scale": args.step_scale})
        print((Path(args.run) / "eval.md").read_text())
        ratio = result["median_best_rmsd_ratio"]
        print(f"median best-of-{result['k']} RMSD ratio (ours / RDKit ETKDGv3): {ratio:.3f}")
        return 0
    if args.n is not None or args.limit is not None or args.step_scale is not None:
        raise ConfigError("--n, --limit and --step-scale apply to conformer runs only")
    ckpt = find_checkpoint(args.run)
    if is_text_run(ckpt):
        result = evaluate_text_run(args.run, per_prompt=args.per_class, cfg_scale=args.cfg, steps=args.steps,
                                   seed=args.seed, device=args.device,
                                   scorer_dir=ckpt.parent.parent / "digits_classifier")
        print(json.dumps(result, indent=2))
        return 0
    result = evaluate_run(args.run, cfg_scale=args.cfg, per_class=args.per_class, steps=args.steps,
                          seed=args.seed, device=args.device)
    _print_eval([result])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Train the digits preset (resuming if the run exists), sample a grid, evaluate at CFG 1 and default."""
    from adaln.train.generate import generate, load_run, save_grid
    from adaln.train.loop import train

    t0 = time.perf_counter()
    cfg = load_config("digits", {"device": args.device})
    result = train(cfg, args.out, resume=True, progress=not args.quiet)
    t_train = time.perf_counter() - t0
    run = load_run(args.out, device=args.device)
    images, _, _ = generate(run, list(range(10)), 10, cfg_scale=cfg.sample.cfg, steps=cfg.sample.steps)
    save_grid(images, 10, Path(args.out) / "grid.png")
    rows = [evaluate_run(args.out, cfg_scale=w, per_class=None, steps=None, device=args.device)
            for w in (1.0, cfg.sample.cfg)]
    total = time.perf_counter() - t0
    _print_eval(rows)
    print(f"train {t_train:.0f} s (to step {result.step}), total {total:.0f} s; grid: {Path(args.out) / 'grid.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaln", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a class-conditional DiT, a text-conditioned DiT or a conformer model")
    t.add_argument("--config", default="digits", help=f"preset ({', '.join(preset_names())}) or FILE.yaml")
    t.add_argument("--out", default=DEFAULT_RUN, help="run directory (default %(default)s)")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int, help="global batch, split evenly over the processes")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"])
    t.add_argument("--seed", type=int)
    t.add_argument("--mixer", choices=["attention", "hyena"], help="denoiser backbone (default: DiT attention)")
    t.add_argument("--data-root", help="image folder (one sub-folder per class) for data.name=image_folder")
    t.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--distributed", choices=["none", "ddp", "fsdp"], default="none",
                   help="one process of a torchrun launch: DistributedDataParallel or FSDP2 (default %(default)s)")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="sample a PNG grid (one row per class) and a .npy array")
    s.add_argument("run", help="run directory or checkpoint directory")
    s.add_argument("--classes", help="comma-separated class ids (default: all)")
    s.add_argument("--prompt", action="append", help="text prompt (text-conditioned runs; repeatable)")
    s.add_argument("--component", help="CCD component id (conformer runs), e.g. ATP")
    s.add_argument("--n", type=int, default=5, help="conformers to generate (conformer runs; default %(default)s)")
    s.add_argument("--step-scale", type=float, help="AF3 sampler step scale (conformer runs; default: the run's)")
    s.add_argument("--per-class", type=int, default=8)
    s.add_argument("--cfg", type=float, help="guidance scale (default: the run's sample.cfg)")
    s.add_argument("--steps", type=int)
    s.add_argument("--sampler", choices=["heun", "euler", "af3", "ddim"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-ema", action="store_true", help="use the raw instead of the EMA weights")
    s.add_argument("--device", default="auto")
    s.add_argument("-o", "--output", help="PNG path (default RUN/grid.png); the .npy goes beside it. Conformer "
                   "runs: mmCIF path (default ID.cif); the PNG picture goes beside it")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", help="score digit samples with a classifier trained on real digits, or "
                       "conformers against RDKit ETKDGv3 on the CCD test split")
    e.add_argument("run")
    e.add_argument("--n", type=int, help="conformers per molecule (conformer runs; default the run's eval_k)")
    e.add_argument("--limit", type=int, help="test molecules (conformer runs; default the run's eval_limit)")
    e.add_argument("--step-scale", type=float, help="AF3 sampler step scale (conformer runs; default: the run's)")
    e.add_argument("--cfg", type=float)
    e.add_argument("--per-class", type=int)
    e.add_argument("--steps", type=int)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="train + sample + evaluate the digits preset")
    d.add_argument("--out", default=DEFAULT_RUN)
    d.add_argument("--device", default="auto")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, ValueError, OSError) as e:
        if os.environ.get("ADALN_DEBUG") == "1":
            raise
        print(f"adaln: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
