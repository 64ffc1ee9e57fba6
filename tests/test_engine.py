"""The engine's pieces on their own: config schema and resume rules, seeding, learning rate, the run
directory's lock and metrics, atomic outputs, divergence, and full disks (a small tmpfs, root only)."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaln.cli import main
from adaln.engine import fit, learning_rate
from adaln.engine.config import RunConfig, build_config, changed_keys, parse_overrides, resumable_keys
from adaln.engine.rundir import MetricsLog, clean_stale, read_metrics, run_lock
from adaln.engine.seeding import Stream, epoch_batch, example_generators, stream_seed
from adaln.errors import ConfigError, RunError, TrainingDiverged
from adaln.outputs import atomic_output, save_grid
from adaln.tasks import load_config
from adaln.tasks.digits import DigitsConfig, DigitsTask

TINY = {"model.hidden_size": 32, "model.depth": 1, "model.num_heads": 2, "batch_size": 16, "log_every": 1,
        "warmup_steps": 2, "device": "cpu"}


# ---- config -----------------------------------------------------------------------------------------

def test_overrides_are_typed_and_checked_against_the_schema():
    assert parse_overrides(["steps=7", "sample.cfg=2.5", "data.root=null", "name=x=y"]) == {
        "steps": 7, "sample.cfg": 2.5, "data.root": None, "name": "x=y"}
    cfg = build_config(DigitsConfig, {"task": "digits"}, {"steps": "12", "lr": "1e-3"}, "test")
    assert cfg.steps == 12 and cfg.lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match=r"test: sample\.steps must be >= 1, got 0"):
        build_config(DigitsConfig, {"task": "digits"}, {"sample.steps": 0}, "test")
    with pytest.raises(ConfigError, match=r"test: data\.heldout_fraction must be < 1, got 1\.0"):
        build_config(DigitsConfig, {"task": "digits"}, {"data.heldout_fraction": 1}, "test")
    with pytest.raises(ConfigError, match="lr must be finite, got nan"):
        build_config(DigitsConfig, {"task": "digits"}, {"lr": float("nan")}, "test")


def test_resumable_keys_are_the_schedule_and_output_knobs_only():
    free = resumable_keys(DigitsConfig)
    assert {"steps", "log_every", "checkpoint_every", "keep_last", "device", "threads", "sample.cfg",
            "sample.steps"} <= free
    assert not free & {"seed", "batch_size", "lr", "model.depth", "data.name", "p_std", "ema_decay"}
    a = build_config(DigitsConfig, {"task": "digits"}, {}, "a")
    b = build_config(DigitsConfig, {"task": "digits"}, {"steps": 9, "sample.cfg": 3.0, "seed": 4}, "b")
    assert changed_keys(DigitsConfig, a, b) == ["seed"]


def test_every_preset_loads_and_names_its_task():
    for preset, task in (("digits", "digits"), ("digits-text", "text-digits"), ("ccd-conformers", "conformers"),
                         ("image-folder", "digits")):
        cls, cfg = load_config(preset, {"data.root": "x"} if preset == "image-folder" else {})
        assert cls.name == task == cfg.task and isinstance(cfg, RunConfig)


# ---- seeding and schedules --------------------------------------------------------------------------

def test_stream_seeds_are_distinct_and_order_sensitive():
    seeds = {stream_seed(s, k, i) for s in range(3) for k in Stream for i in range(50)}
    assert len(seeds) == 3 * len(Stream) * 50
    assert stream_seed(1, 2) != stream_seed(2, 1) and stream_seed("ATP") != stream_seed("ADP")
    assert 0 <= stream_seed(2**70, -1) < 2**63


def test_an_example_draws_the_same_numbers_wherever_it_sits_in_a_batch():
    a = example_generators(3, 10, torch.tensor([5, 9, 2]))
    b = example_generators(3, 10, torch.tensor([2, 5]))
    assert torch.equal(torch.randn(4, generator=a[2]), torch.randn(4, generator=b[0]))
    assert not torch.equal(torch.randn(4, generator=example_generators(3, 11, torch.tensor([2]))[0]),
                           torch.randn(4, generator=example_generators(3, 10, torch.tensor([2]))[0]))


def test_epoch_batches_cover_each_epoch_once():
    n, b = 50, 8
    per_epoch = n // b
    for epoch in range(2):
        seen = torch.cat([epoch_batch(n, b, 0, epoch * per_epoch + i) for i in range(per_epoch)])
        assert len(seen) == len(set(seen.tolist())) == per_epoch * b
    assert not torch.equal(epoch_batch(n, b, 0, 0), epoch_batch(n, b, 0, per_epoch))
    with pytest.raises(ConfigError, match="batch_size 64 exceeds the 50 training examples"):
        epoch_batch(n, 64, 0, 0)


def test_learning_rate_warmup_then_constant_or_cosine():
    cfg = RunConfig(lr=1.0, warmup_steps=4, steps=14, lr_final_fraction=0.1)
    assert [learning_rate(cfg, s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = RunConfig(lr=1.0, warmup_steps=4, steps=14, lr_final_fraction=0.1, lr_schedule="cosine")
    assert learning_rate(cos, 4) == 1.0
    assert learning_rate(cos, 9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(cos, 14) == pytest.approx(0.1)
    assert learning_rate(RunConfig(lr=2.0, warmup_steps=0), 0) == 2.0


# ---- run directory ----------------------------------------------------------------------------------

def test_metrics_are_cut_back_to_the_resumed_step_and_survive_cut_lines(tmp_path):
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 11)]
    text = "\n".join(rows[:5]) + "\n" + rows[2] + "\n" + "\n".join(rows[5:]) + "\nnot json\n" + rows[0][:12]
    (tmp_path / "metrics.jsonl").write_text(text)  # a duplicate step 3, a garbage line and a cut last line
    log = MetricsLog(tmp_path, start=6)
    assert [r["step"] for r in log.rows] == [1, 2, 3, 4, 5, 6]
    log.write({"step": 7, "loss": 0.5})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 8))


def test_a_second_holder_of_the_lock_is_refused_by_name(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunError, match=rf"in use by another training process \(pid {os.getpid()} on "):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released on exit
        pass


def test_a_dead_holder_leaves_no_stale_lock(tmp_path):
    code = ("import sys, time; from pathlib import Path; from adaln.engine.rundir import run_lock\n"
            "with run_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(RunError, match=f"pid {proc.pid}"):
        with run_lock(tmp_path):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with run_lock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()


def test_stale_temporary_and_trash_directories_are_removed(tmp_path):
    for p in ("checkpoints/.tmp-step_00000002-999", "checkpoints/.trash-step_00000001-1", "checkpoints/step_00000003"):
        (tmp_path / p).mkdir(parents=True)
    (tmp_path / ".tmp-grid.png-77").write_bytes(b"half")
    removed = clean_stale(tmp_path)
    assert len(removed) == 3 and sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003"]
    assert not (tmp_path / ".tmp-grid.png-77").exists()


def test_a_failed_output_leaves_the_previous_file(tmp_path):
    out = tmp_path / "report.json"
    out.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_output(out) as tmp:
            tmp.write_text("half")
            1 / 0
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


class DivergingDigits(DigitsTask):
    """Digits whose loss becomes NaN from step 3 on."""

    def loss(self, net, step, indices, rank):
        loss = super().loss(net, step, indices, rank)
        return loss * float("nan") if step >= 3 else loss


def test_divergence_is_a_user_error_and_keeps_the_good_checkpoints(tmp_path):
    _, cfg = load_config("digits", {**TINY, "steps": 8, "checkpoint_every": 2, "log_every": 4})
    with pytest.raises(TrainingDiverged, match="non-finite between steps 2 and 4"):
        fit(DivergingDigits, cfg, tmp_path, resume=False, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]


# ---- full disks -------------------------------------------------------------------------------------

@pytest.fixture()
def small_disk(tmp_path):
    """A 4 MiB tmpfs (skipped where it cannot be mounted, e.g. not root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` until about ``leave`` bytes are free."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    while os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize > leave + 4096:
        with open(disk / "filler", "ab") as f:
            f.write(b"\0" * 4096)


def test_full_disk_metrics_rows_are_whole_or_absent(small_disk):
    log = MetricsLog(small_disk, start=0)
    fill(small_disk, 0)
    with pytest.raises(RunError, match=f"could not append to {small_disk / 'metrics.jsonl'}"):
        for step in range(1, 100_000):
            log.write({"step": step, "loss": 0.123456789, "pad": "x" * 200})
    log.close()
    text = (small_disk / "metrics.jsonl").read_text()
    assert text == "" or text.endswith("\n")
    assert all(json.loads(line) for line in text.splitlines())


def test_full_disk_outputs_keep_the_previous_file(small_disk):
    grid = small_disk / "grid.png"
    save_grid(torch.zeros(4, 1, 8, 8), 2, grid)
    before = grid.read_bytes()
    fill(small_disk, 0)
    with pytest.raises(RunError, match=f"could not write {grid}"):
        save_grid(torch.rand(64, 3, 32, 32) * 2 - 1, 8, grid)
    assert grid.read_bytes() == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "grid.png"]


def test_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_one(small_disk, capsys):
    run = small_disk / "run"
    args = ["train", "--config", "digits", "--out", str(run), "--quiet", "--set", "model.hidden_size=32",
            "model.depth=1", "model.num_heads=2", "batch_size=16", "checkpoint_every=2", "log_every=1",
            "keep_last=5", "device=cpu"]
    assert main(args + ["--steps", "2"]) == 0
    fill(small_disk, 20_000)  # room for metrics rows, not for another checkpoint
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adaln: error: could not write the checkpoint of step 4") and "\n" not in err, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
    os.remove(small_disk / "filler")
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--quiet"]) == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]


class CountingDigits(DigitsTask):
    """Digits that count the host syncs (``Tensor.__bool__`` / ``.item()``) its training steps make."""

    syncs: list[int] = []

    def loss(self, net, step, indices, rank):
        import torch as t

        counts = {"n": 0}
        originals = t.Tensor.__bool__, t.Tensor.item

        def counting(original):
            def wrapper(self, *args):
                counts["n"] += 1
                return original(self, *args)
            return wrapper

        t.Tensor.__bool__, t.Tensor.item = counting(originals[0]), counting(originals[1])
        try:
            loss = super().loss(net, step, indices, rank)
            loss.backward(retain_graph=True)
        finally:
            t.Tensor.__bool__, t.Tensor.item = originals
        CountingDigits.syncs.append(counts["n"])
        return loss


def test_a_training_step_does_not_wait_for_the_device(tmp_path):
    _, cfg = load_config("digits", {**TINY, "steps": 3, "log_every": 3})
    CountingDigits.syncs = []
    fit(CountingDigits, cfg, tmp_path, resume=False, progress=False)
    assert CountingDigits.syncs == [0, 0, 0]  # forward and backward: no value checks inside the loop
    from adaln.diffusion._utils import as_sigma

    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):  # outside the loop they run
        as_sigma(torch.tensor([-1.0]), 1, dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_runs_under_bf16_autocast(tmp_path):
    _, cfg = load_config("digits", {**TINY, "steps": 3, "device": "cuda"})
    result = fit(DigitsTask, cfg, tmp_path, resume=False, progress=False)
    assert math.isfinite(result.final_loss)


def test_signal_handlers_are_restored_after_training(tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    _, cfg = load_config("digits", {**TINY, "steps": 1})
    fit(DigitsTask, cfg, tmp_path, resume=False, progress=False)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
