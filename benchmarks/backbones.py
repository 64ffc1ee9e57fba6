"""DiT (attention) against the AdaLN-Zero Hyena residual network on the digits: the same preset, width,
depth, patch size, budget and seeds; scored by the digits classifier, timed in one process.

For each ``--mixers`` entry: train the digits preset with ``model.mixer=MIXER`` and ``--set`` overrides into
``OUT/MIXER`` (reused when finished), evaluate ``--per-class`` samples of each class at each ``--cfgs``
with the preset's sampler, count parameters, and time one training step (loss, backward, AdamW) and the
sampling of every class, each as a ratio to the first mixer. Writes ``OUT/backbones.md`` and
``OUT/backbones.json``.

    python benchmarks/backbones.py --out runs/backbones [--mixers attention hyena] [--cfgs 1 1.5]
"""

from __future__ import annotations

import argparse
from pathlib import Path


from adaln.bench.training import add_run_arguments, run_overrides, train_preset, train_step_seconds
from adaln.outputs import write_json, write_text
from adaln.tasks import load_run
from adaln.tasks.digits import DigitsTask


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/backbones")
    p.add_argument("--mixers", nargs="+", default=["attention", "hyena"], choices=["attention", "hyena"])
    add_run_arguments(p, default_set=[], set_help="overrides of every run")
    p.add_argument("--cfgs", type=float, nargs="+", default=[1.0, 1.5])
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--reps", type=int, default=7, help="timed training steps per mixer")
    args = p.parse_args(argv)
    out = Path(args.out)
    common = run_overrides(args)
    rows = []
    for mixer in args.mixers:
        ov = {**common, "model.mixer": mixer}
        row = {"mixer": mixer, "train_seconds": round(train_preset("digits", out / mixer, ov), 1)}
        run = load_run(out / mixer, device="cpu")
        row["parameters"] = sum(q.numel() for q in run.model.parameters())
        row["sampling_seconds"] = 0.0
        for w in args.cfgs:
            r = DigitsTask.score(run, {"cfg": w, "n": args.per_class})
            g = r["generated"]
            row[f"accuracy_cfg{w:g}"], row[f"frechet_cfg{w:g}"] = g["conditional_accuracy"], g["frechet_distance"]
            row["sampling_seconds"] += r["sampling_seconds"]
            row["sampler"], row["steps"] = r["sampler"], r["steps"]
        row["step_seconds"] = train_step_seconds("digits", ov, args.reps)
        rows.append(row)
        print(row, flush=True)
    base = rows[0]
    head = " | ".join(f"accuracy / Fréchet CFG {w:g}" for w in args.cfgs)
    lines = [f"| mixer | parameters | {head} | train step | sampling (all CFGs) |",
             "|---|---|" + "---|" * len(args.cfgs) + "---|---|"]
    for r in rows:
        cells = " | ".join(f"{r[f'accuracy_cfg{w:g}']:.3f} / {r[f'frechet_cfg{w:g}']:.2f}" for w in args.cfgs)
        lines.append(f"| {r['mixer']} | {r['parameters']:,} | {cells} | {r['step_seconds'] * 1000:.0f} ms "
                     f"({r['step_seconds'] / base['step_seconds']:.2f}×) | {r['sampling_seconds']:.1f} s "
                     f"({r['sampling_seconds'] / base['sampling_seconds']:.2f}×) |")
    table = "\n".join(lines)
    note = (f"\n\ncommon overrides: {common}; sampler {rows[0]['sampler']} {rows[0]['steps']} steps, "
            f"{args.per_class} samples per class per CFG\n")
    write_text(out / "backbones.md", table + note)
    write_json(out / "backbones.json", {"rows": rows, "overrides": common, "per_class": args.per_class})
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
