"""EDM against flow matching on the digits: the same DiT, training budget and seeds; every solver at
4 / 8 / 16 / 32 model calls per sample, guidance 1 and 1.5, scored by the digits classifier.

Trains (or reuses, when finished) two runs of the digits preset under ``--out``: ``edm`` (the preset) and
``flow`` (``objective=flow`` plus ``--flow-set`` overrides), then evaluates ``--per-class`` samples of each
class per row (1,000 by default). Heun's budget of ``n`` calls is ``n // 2`` steps (``2 steps - 1`` calls).
Writes ``OUT/flow_vs_edm.md`` (the table) and ``OUT/flow_vs_edm.json``.

    python benchmarks/flow_vs_edm.py --out runs/flow_vs_edm [--budgets 4 8 16 32] [--cfgs 1 1.5]
"""

from __future__ import annotations

import argparse
from pathlib import Path


from adaln.bench.training import add_run_arguments, run_overrides, train_preset
from adaln.engine.config import parse_overrides
from adaln.outputs import write_json, write_text
from adaln.tasks import load_run
from adaln.tasks.digits import DigitsTask

SOLVERS = ("euler", "heun", "dpm++2m")


def steps_for(solver: str, budget: int) -> int:
    return max(budget // 2, 1) if solver == "heun" else budget


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/flow_vs_edm")
    p.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--cfgs", type=float, nargs="+", default=[1.0, 1.5])
    p.add_argument("--per-class", type=int, default=100)
    add_run_arguments(p, default_set=[], set_help="overrides of both runs")
    p.add_argument("--flow-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra overrides of the flow run, e.g. flow.shift=2")
    p.add_argument("--shifts", type=float, nargs="+", default=[1.0], help="flow sampling shifts to evaluate")
    args = p.parse_args(argv)
    out = Path(args.out)

    both = run_overrides(args)
    runs = {"edm": both, "flow": {**both, "objective": "flow", **parse_overrides(args.flow_set)}}
    seconds = {name: round(train_preset("digits", out / name, ov), 1) for name, ov in runs.items()}
    rows = []
    for name in runs:
        run = load_run(out / name, device="cpu")
        for solver in SOLVERS:
            for shift in args.shifts if name == "flow" else [1.0]:
                for budget in args.budgets:
                    for w in args.cfgs:
                        opts = {"cfg": w, "sampler": solver, "steps": steps_for(solver, budget), "n": args.per_class}
                        if name == "flow":
                            opts["shift"] = shift
                        r = DigitsTask.score(run, opts)
                        g = r["generated"]
                        rows.append({"objective": name, "solver": solver, "shift": shift, "nfe": r["nfe"], "cfg": w,
                                     "accuracy": g["conditional_accuracy"], "frechet": g["frechet_distance"],
                                     "sampling_seconds": r["sampling_seconds"]})
                        print(f"{name:>4} {solver:>8} shift {shift:g} NFE {r['nfe']:>2} cfg {w:g}: "
                              f"acc {g['conditional_accuracy']:.3f} FD {g['frechet_distance']:.2f}", flush=True)
    lines = ["| objective | solver | shift | model calls | accuracy CFG " + " / ".join(f"{w:g}" for w in args.cfgs)
             + " | Fréchet CFG " + " / ".join(f"{w:g}" for w in args.cfgs) + " |",
             "|---|---|---|---|---|---|"]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["objective"], r["solver"], r["shift"], r["nfe"]), {})[r["cfg"]] = r
    for (obj, solver, shift, nfe), by_cfg in keyed.items():
        acc = " / ".join(f"{by_cfg[w]['accuracy']:.3f}" for w in args.cfgs)
        fd = " / ".join(f"{by_cfg[w]['frechet']:.2f}" for w in args.cfgs)
        lines.append(f"| {obj} | {solver} | {shift:g} | {nfe} | {acc} | {fd} |")
    table = "\n".join(lines)
    write_text(out / "flow_vs_edm.md", table + f"\n\ntraining seconds: {seconds}\n")
    write_json(out / "flow_vs_edm.json", {"rows": rows, "training_seconds": seconds, "flow_overrides": runs["flow"]})
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
