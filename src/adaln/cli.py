"""The ``adaln`` command: train, sample, eval, demo, config and bench, for every task.

A user error (unknown preset or key, bad value, missing data, locked or damaged run, full disk) prints
one line ``adaln: error: ...`` and exits with status 2; ``ADALN_DEBUG=1`` shows the traceback instead.
SIGINT / SIGTERM during training write a checkpoint and exit with 130 / 143. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from adaln.engine.config import parse_overrides, preset_names, to_yaml
from adaln.errors import Interrupted, UserError

DEFAULT_RUN = "runs/digits"


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--set`` items plus the shortcut flags of shared keys (``--steps`` is ``--set steps=...``)."""
    out = parse_overrides(args.set or [])
    for key in ("steps", "batch_size", "seed", "device"):
        value = getattr(args, key)
        if value is not None:
            out[key] = value
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from adaln.engine import fit
    from adaln.tasks import train_config

    task, cfg, run_dir = train_config(args.out, args.config, _overrides(args), args.resume)
    result = fit(task, cfg, run_dir, resume=args.resume, progress=not args.quiet, distributed=args.distributed)
    if result.rank == 0:
        print(f"trained {cfg.name} ({task.name}) to step {result.step} in {result.seconds:.1f} s; final loss "
              f"{result.final_loss:.4f}; run directory {result.run_dir}")
    return 0


SAMPLE_KEYS = ("n", "classes", "prompt", "component", "cfg", "steps", "sampler", "shift", "step_scale", "seed",
               "output", "limit")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The options the user gave (None means not given), as the task's sample/evaluate receive them."""
    out = {k: getattr(args, k) for k in SAMPLE_KEYS if getattr(args, k, None) is not None}
    if getattr(args, "no_ema", False):
        out["no_ema"] = True
    return out


def cmd_sample(args: argparse.Namespace) -> int:
    from adaln.tasks import load_run

    run = load_run(args.run, device=args.device, use_ema=not args.no_ema)
    options = _options(args)
    run.task.check_options(options, run.task.sample_options, "sample")
    print(run.task.sample(run, options))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from adaln.tasks import load_run

    run = load_run(args.run, device=args.device)
    options = _options(args)
    run.task.check_options(options, run.task.eval_options, "eval")
    print(run.task.evaluate(run, options))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Train the digits preset (resuming if the run exists), sample a grid, evaluate at CFG 1 and default."""
    from adaln.engine import fit
    from adaln.outputs import save_grid
    from adaln.tasks import load_run, train_config
    from adaln.tasks._images import sampling_options
    from adaln.tasks.digits import DigitsTask, format_eval

    t0 = time.perf_counter()
    resume = (Path(args.out) / "config.json").is_file()
    task, cfg, run_dir = train_config(args.out, None if resume else "digits", {"device": args.device}, resume)
    if task is not DigitsTask:
        raise UserError(f"{run_dir} holds a {task.name} run; adaln demo trains the digits preset: use another --out")
    result = fit(task, cfg, run_dir, resume=resume, progress=not args.quiet)
    t_train = time.perf_counter() - t0
    run = load_run(run_dir, device=args.device)
    images, _, _ = DigitsTask.generate(run, list(range(10)), 10, sampling_options(run.cfg, {}))
    save_grid(images, 10, run_dir / "grid.png")
    rows = [DigitsTask.score(run, {"cfg": w}) for w in (1.0, run.cfg.sample.cfg)]
    print(format_eval(rows))
    print(f"train {t_train:.0f} s (to step {result.step}), total {time.perf_counter() - t0:.0f} s; "
          f"grid: {run_dir / 'grid.png'}")
    return 0


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    """The GPU report (``benchmarks/gpu_report.py``); every argument after ``gpu`` is its own."""
    from adaln.bench.gpu_report import main as gpu_report

    return gpu_report(args.extra)


def cmd_config(args: argparse.Namespace) -> int:
    from adaln.tasks import load_config

    if args.source is None:
        print("presets: " + ", ".join(preset_names()))
        return 0
    task, cfg = load_config(args.source, parse_overrides(args.set or []))
    print(f"# task {task.name}\n" + to_yaml(cfg), end="")
    return 0



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaln", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train any task from a preset or YAML file (or resume a run)")
    t.add_argument("--config", help=f"preset ({', '.join(preset_names())}) or FILE.yaml naming its task "
                   "(default: digits; on --resume: the run's saved config)")
    t.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="override any config key, e.g. --set model.depth=6 sample.cfg=2")
    t.add_argument("--out", default=DEFAULT_RUN, help="run directory (default %(default)s)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out with its saved config")
    t.add_argument("--steps", type=int, help="same as --set steps=N")
    t.add_argument("--batch-size", type=int, help="same as --set batch_size=N (the global batch)")
    t.add_argument("--seed", type=int, help="same as --set seed=N")
    t.add_argument("--device", help="same as --set device=D (auto, cpu, cuda, cuda:N)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--distributed", choices=["none", "ddp", "fsdp"], default="none",
                   help="one process of a torchrun launch: DistributedDataParallel or FSDP2 (default %(default)s)")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="sample a trained run: a PNG grid + .npy (images) or an mmCIF + PNG (molecules)")
    s.add_argument("run", help="run directory or checkpoint directory")
    s.add_argument("--n", type=int, help="samples per condition (class, prompt or component)")
    s.add_argument("--classes", help="digits: comma-separated class ids (default: all)")
    s.add_argument("--prompt", action="append", help="text-digits: a text prompt (repeatable)")
    s.add_argument("--component", help="conformers: a CCD component id such as ATP")
    s.add_argument("--cfg", type=float, help="images: guidance scale (default: the run's sample.cfg)")
    s.add_argument("--steps", type=int, help="sampler steps (default: the run's sample.steps)")
    s.add_argument("--solver", "--sampler", dest="sampler",
                   help="images: heun, euler, dpm++2m, af3 or ddim (flow runs: the first three; default: the run's)")
    s.add_argument("--shift", type=float, help="images, flow runs: static shift of the sampling sigmas")
    s.add_argument("--step-scale", type=float, help="conformers: AF3 sampler step scale (default: the run's)")
    s.add_argument("--seed", type=int)
    s.add_argument("--no-ema", action="store_true", help="use the raw instead of the EMA weights")
    s.add_argument("--device", default="auto")
    s.add_argument("-o", "--output", help="output file (default: grid.png / prompts.png / ID.cif in the run directory)")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", help="score a run: digits classifier metrics, or conformers against RDKit ETKDGv3")
    e.add_argument("run")
    e.add_argument("--n", type=int, help="samples per condition (default: the run's)")
    e.add_argument("--cfg", type=float, help="images: guidance scale")
    e.add_argument("--steps", type=int)
    e.add_argument("--solver", "--sampler", dest="sampler", help="images: as for adaln sample")
    e.add_argument("--shift", type=float, help="images, flow runs: static shift of the sampling sigmas")
    e.add_argument("--step-scale", type=float, help="conformers: AF3 sampler step scale")
    e.add_argument("--limit", type=int, help="conformers: test molecules (default: the run's eval_limit)")
    e.add_argument("--seed", type=int)
    e.add_argument("--device", default="auto")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="train + sample + evaluate the digits preset")
    d.add_argument("--out", default=DEFAULT_RUN)
    d.add_argument("--device", default="auto")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmarks: adaln bench gpu --out DIR [--smoke] (see adaln bench gpu --help)")
    b_sub = b.add_subparsers(dest="bench", required=True)
    g = b_sub.add_parser("gpu", add_help=False, help="check and time every kernel, model and job on one CUDA device")
    g.set_defaults(func=cmd_bench_gpu, takes_extra=True)

    c = sub.add_parser("config", help="print a resolved config: adaln config show PRESET|FILE [--set ...]")
    c_sub = c.add_subparsers(dest="action", required=True)
    show = c_sub.add_parser("show", help="print the resolved config of a preset or file (no argument: list presets)")
    show.add_argument("source", nargs="?")
    show.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE")
    show.set_defaults(func=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.func(args)
    except Interrupted as e:
        print(f"adaln: {e}; continue with: adaln train --out {args.out} --resume", file=sys.stderr)
        return e.exit_status
    except (UserError, OSError) as e:
        if os.environ.get("ADALN_DEBUG") == "1" or (isinstance(e, OSError) and not e.filename):
            raise
        print(f"adaln: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
