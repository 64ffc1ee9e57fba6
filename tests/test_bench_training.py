"""The comparison benchmarks' training helpers: a finished run is reused, a step is timed."""

import pytest

from adaln.bench.training import train_preset, train_step_seconds
from adaln.engine.checkpoint import list_checkpoints

TINY = {"steps": 2, "batch_size": 8, "model.hidden_size": 32, "model.depth": 1, "model.num_heads": 2}


def test_train_preset_trains_once_then_reuses_the_finished_run(tmp_path):
    first = train_preset("digits", tmp_path / "run", TINY)
    assert first > 0 and list_checkpoints(tmp_path / "run")
    assert train_preset("digits", tmp_path / "run", TINY) == 0.0
    assert train_preset("digits", tmp_path / "run", {**TINY, "steps": 3}) > 0  # a longer budget resumes
    assert int(list_checkpoints(tmp_path / "run")[-1].name.split("_")[-1]) == 3


def test_train_step_seconds_times_a_step():
    assert 0 < train_step_seconds("digits", TINY, reps=2) < 60
    with pytest.raises(ValueError, match="reps must be >= 1"):
        train_step_seconds("digits", TINY, reps=0)


def test_run_arguments_give_the_overrides_and_set_the_threads():
    import argparse

    import torch

    from adaln.bench.training import add_run_arguments, run_overrides

    p = argparse.ArgumentParser()
    add_run_arguments(p, default_set=["objective=flow"], set_help="every run")
    assert run_overrides(p.parse_args([])) == {"objective": "flow"}
    before = torch.get_num_threads()
    try:
        args = p.parse_args(["--set", "steps=5", "model.depth=2", "--threads", "1"])
        assert run_overrides(args) == {"steps": 5, "model.depth": 2, "threads": 1}
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
