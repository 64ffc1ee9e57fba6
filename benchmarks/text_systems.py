"""text-digits with every conditioning architecture: our ConditionalDiT and the converted systems (MMDiT,
Flux, PixArt-alpha, Lumina 2, Z-Image) trained from scratch with the same preset budget, seeds and
objective, scored on held-out phrasings.

For each ``--archs`` entry: train the ``digits-text`` preset with ``model.arch=ARCH`` and ``--set``
overrides (default ``objective=flow``) into ``OUT/ARCH`` (reused when finished); ``dit:pooled`` and
``dit:tokens`` are ConditionalDiT with ``text.variant`` pooled (AdaLN only) or tokens (cross-attention only),
trained into ``OUT/dit-pooled`` / ``OUT/dit-tokens``. Then evaluate at each
``--cfgs`` with ``--solver``/``--steps``, count parameters, and time one training step (forward, loss,
backward, AdamW) of each model in this process on the same batch, as a ratio to the first arch.
Writes ``OUT/text_systems.md`` and ``OUT/text_systems.json``.

    python benchmarks/text_systems.py --out runs/text_systems [--archs dit dit:pooled mmdit flux pixart lumina2 zimage]
"""

from __future__ import annotations

import argparse
from pathlib import Path


from adaln.bench.training import add_run_arguments, run_overrides, train_preset, train_step_seconds
from adaln.outputs import write_json, write_text
from adaln.tasks import load_run
from adaln.tasks.text_digits import score


def arch_overrides(entry: str) -> dict:
    """``ARCH`` or ``dit:VARIANT`` -> the config overrides it names."""
    arch, _, variant = entry.partition(":")
    if variant and arch != "dit":
        raise SystemExit(f"--archs: only dit takes a text variant (dit:pooled, dit:tokens), got {entry!r}")
    return {"model.arch": arch, **({"text.variant": variant} if variant else {})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/text_systems")
    p.add_argument("--archs", nargs="+",
                   default=["dit", "dit:pooled", "dit:tokens", "mmdit", "flux", "pixart", "lumina2", "zimage"])
    add_run_arguments(p, default_set=["objective=flow"], set_help="overrides of every run")
    p.add_argument("--cfgs", type=float, nargs="+", default=[1.0, 1.5])
    p.add_argument("--solver", default="dpm++2m")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--reps", type=int, default=5, help="timed training steps per arch")
    args = p.parse_args(argv)
    out = Path(args.out)
    common = run_overrides(args)
    rows = []
    for arch in args.archs:
        ov = {**common, **arch_overrides(arch)}
        run_dir = out / arch.replace(":", "-")
        trained_s = train_preset("digits-text", run_dir, ov)
        run = load_run(run_dir, device="cpu")
        row = {"arch": arch, "parameters": sum(q.numel() for q in run.model.parameters()),
               "train_seconds": round(trained_s, 1)}
        for w in args.cfgs:
            r = score(run, {"cfg": w, "sampler": args.solver, "steps": args.steps})
            row[f"accuracy_cfg{w:g}"], row[f"frechet_cfg{w:g}"] = r["conditional_accuracy"], r["frechet_distance"]
        row["step_seconds"] = train_step_seconds("digits-text", ov, args.reps)
        rows.append(row)
        print(row, flush=True)
    base = rows[0]["step_seconds"]
    head = " | ".join(f"accuracy / Fréchet CFG {w:g}" for w in args.cfgs)
    lines = [f"| arch | parameters | {head} | train step (ratio to {rows[0]['arch']}) |",
             "|---|---|" + "---|" * len(args.cfgs) + "---|"]
    for r in rows:
        cells = " | ".join(f"{r[f'accuracy_cfg{w:g}']:.3f} / {r[f'frechet_cfg{w:g}']:.2f}" for w in args.cfgs)
        lines.append(f"| {r['arch']} | {r['parameters']:,} | {cells} | {r['step_seconds'] * 1000:.0f} ms "
                     f"({r['step_seconds'] / base:.2f}) |")
    table = "\n".join(lines)
    note = f"\n\ncommon overrides: {common}; sampler {args.solver}, {args.steps} steps\n"
    write_text(out / "text_systems.md", table + note)
    write_json(out / "text_systems.json", {"rows": rows, "overrides": common, "solver": args.solver,
                                          "steps": args.steps})
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
