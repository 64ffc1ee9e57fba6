"""``adaln train --distributed``: two CPU processes (torchrun, gloo) against one process on the same global batch.

Each sample draws its sigma and noise from its own generator, so a 2-process run and a 1-process run see
the same batch with the same random numbers at every step; they differ only in float summation order.
Label dropout is off in TINY because its stream is per rank.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adaln.cli import main
from adaln.diffusion import sample_training_sigmas
from adaln.train.distributed import TORCHRUN_VARIABLES, _state_by_index, _state_by_name
from adaln.train.generate import load_run
from adaln.train.loop import batch_indices, training_generators

TINY = """
name: tiny
model: {patch_size: 2, hidden_size: 32, depth: 2, num_heads: 2, class_dropout_prob: 0.0}
steps: 6
batch_size: 16
lr: 0.003
log_every: 1
checkpoint_every: 1
keep_last: 10
warmup_steps: 1
device: cpu
"""


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tensors(run: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:08d}" / f"{name}.safetensors")


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def optimizer_groups(run: Path) -> list[dict]:
    """The checkpoint's optimizer param_groups; tuples as lists (torch's distributed state dicts make
    AdamW's betas a list)."""
    groups = json.loads((run / "checkpoints" / "step_00000006" / "optimizer.json").read_text())["param_groups"]
    return [{k: v["__tuple__"] if isinstance(v, dict) else v for k, v in g.items()} for g in groups]


def torchrun(*argv) -> str:
    """``torchrun --nproc_per_node=2 -m adaln train ...`` in fresh processes; returns their stdout."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "adaln", "train", *map(str, argv)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def copy_checkpoint(src: Path, step: int, dst: Path) -> None:
    name = f"step_{step:08d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """single: 6 steps in this process; ddp: 6 steps in 2 processes; fsdp: 2 processes resuming single's
    step 3; ddp_then_single: this process resuming ddp's step 3."""
    root = tmp_path_factory.mktemp("dist")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY)
    r = {name: root / name for name in ("single", "ddp", "fsdp", "ddp_then_single")}
    assert main(["train", "--config", str(cfg), "--out", str(r["single"]), "--quiet"]) == 0
    r["ddp_stdout"] = torchrun("--config", cfg, "--out", r["ddp"], "--quiet", "--distributed", "ddp")
    copy_checkpoint(r["single"], 3, r["fsdp"])
    r["fsdp_stdout"] = torchrun("--config", cfg, "--out", r["fsdp"], "--quiet", "--distributed", "fsdp", "--resume")
    copy_checkpoint(r["ddp"], 3, r["ddp_then_single"])
    assert main(["train", "--config", str(cfg), "--out", str(r["ddp_then_single"]), "--quiet", "--resume"]) == 0
    return r


def test_ddp_averages_gradients_like_one_process_on_the_global_batch(runs):
    one, two = metrics(runs["single"]), metrics(runs["ddp"])
    assert [m["step"] for m in two] == [1, 2, 3, 4, 5, 6]
    # The logged loss is the mean over both ranks; the pre-clip gradient norm would double if the ranks'
    # gradients were summed instead of averaged (Adam's first step would hide that in the parameters).
    np.testing.assert_allclose([m["loss"] for m in two], [m["loss"] for m in one], rtol=1e-6)
    np.testing.assert_allclose([m["grad_norm"] for m in two], [m["grad_norm"] for m in one], rtol=1e-6)
    assert max_abs_diff(tensors(runs["ddp"], 1, "model"), tensors(runs["single"], 1, "model")) < 1e-6
    for name in ("model", "ema", "optimizer"):
        assert max_abs_diff(tensors(runs["ddp"], 6, name), tensors(runs["single"], 6, name)) < 2e-6


def test_ddp_run_has_one_writer_and_a_falling_loss(runs):
    run, out = runs["ddp"], runs["ddp_stdout"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{s:08d}" for s in range(1, 7)]
    assert len((run / "metrics.csv").read_text().splitlines()) == 1 + 6  # header + one row per step
    assert out.count("global batch 16 = 8 per process x 2") == 1 and out.count("trained tiny") == 1
    losses = [m["loss"] for m in metrics(run)]
    assert all(np.isfinite(losses)) and np.mean(losses[3:]) < np.mean(losses[:3])


def test_fsdp_resumes_a_one_process_checkpoint_and_saves_a_full_state(runs):
    run = runs["fsdp"]
    assert "fsdp: 2 processes" in runs["fsdp_stdout"]
    assert [m["step"] for m in metrics(run)] == [4, 5, 6]
    np.testing.assert_allclose([m["loss"] for m in metrics(run)], [m["loss"] for m in metrics(runs["single"])[3:]],
                               rtol=1e-6)
    for name in ("model", "ema", "optimizer"):  # gathered from the shards, names without wrapper prefixes
        assert max_abs_diff(tensors(run, 6, name), tensors(runs["single"], 6, name)) < 2e-6
    groups = [optimizer_groups(r) for r in (run, runs["single"])]
    assert groups[0] == groups[1]
    loaded = load_run(run, device="cpu")  # a single process reads it
    assert loaded.step == 6


def test_ddp_checkpoint_resumes_in_one_process(runs):
    run = runs["ddp_then_single"]
    np.testing.assert_allclose([m["loss"] for m in metrics(run)], [m["loss"] for m in metrics(runs["single"])[3:]],
                               rtol=1e-6)
    assert max_abs_diff(tensors(run, 6, "model"), tensors(runs["single"], 6, "model")) < 2e-6


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_batches_together_are_the_single_process_batch(world):
    n, per_rank = 103, 4
    for step in (0, 5, 8, 9, 30):  # within and across epochs
        single = batch_indices(n, step, per_rank * world, seed=7)
        ranks = [batch_indices(n, step, per_rank, seed=7, rank=r, world=world) for r in range(world)]
        assert sorted(torch.cat(ranks).tolist()) == sorted(single.tolist())
        assert len(set(torch.cat(ranks).tolist())) == per_rank * world


def test_sample_draws_depend_on_seed_step_and_index_only():
    def sigmas(seed, step, idx):
        idx = torch.tensor(idx)
        return dict(zip(idx.tolist(), sample_training_sigmas(len(idx), generator=training_generators(
            seed, step, idx, torch.device("cpu"))).tolist()))

    a, b = sigmas(0, 2, [3, 7, 11]), sigmas(0, 2, [11, 3])
    assert a[3] == b[3] and a[11] == b[11]
    assert len({a[3], a[7], a[11], sigmas(0, 3, [3])[3], sigmas(1, 2, [3])[3]}) == 5


def test_optimizer_state_by_name_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).square().sum().backward()
    opt.step()
    names = [n for n, _ in model.named_parameters()]
    by_name = _state_by_name(opt.state_dict(), names)
    assert list(by_name["state"]) == names and by_name["param_groups"][0]["params"] == names
    back = _state_by_index(by_name)
    assert back["param_groups"] == opt.state_dict()["param_groups"]
    assert all(back["state"][i]["exp_avg"] is s["exp_avg"] for i, s in opt.state_dict()["state"].items())


def expect_error(capsys, argv, match: str) -> None:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adaln: error:") and "\n" not in err and match in err, err


def test_launch_errors_are_one_line(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    train = ["train", "--config", cfg, "--out", tmp_path / "run", "--quiet"]
    for var in TORCHRUN_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    expect_error(capsys, [*train, "--distributed", "ddp"], match="torchrun")
    expect_error(capsys, [*train, "--distributed", "fsdp"], match="RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR")
    env = dict(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    expect_error(capsys, [*train, "--distributed", "ddp"], match="divisible by the world size 3")
    expect_error(capsys, [*train, "--distributed", "none"], match="WORLD_SIZE=3")
    assert not (tmp_path / "run").exists()
