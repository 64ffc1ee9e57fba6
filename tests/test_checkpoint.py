"""EMA maths vs float64, and crash-safe pickle-free checkpoints: resume, keep_last, corruption, SIGKILL."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from adaln.engine import (
    EMA,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    restore_rng,
    save_checkpoint,
)


@pytest.fixture(autouse=True)
def _keep_global_rngs():
    """These tests reseed numpy and python RNGs; give other tests their state back."""
    np_state, py_state = np.random.get_state(), random.getstate()
    yield
    np.random.set_state(np_state)
    random.setstate(py_state)


class TinyNet(nn.Module):
    """Linear -> LayerNorm -> dropout -> linear, with a fixed buffer like DiT's pos_embed."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.norm = nn.LayerNorm(16)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(16, 1)
        self.register_buffer("pos_embed", torch.randn(16))

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.norm(self.inp(x) + self.pos_embed))))


def _randomise(model):
    """Non-zero random values everywhere, LayerNorm included (its init of ones/zeros hides errors)."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    return model


# ------------------------------------------------------------------------------------------------- EMA


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_matches_float64_reference(warmup):
    model = _randomise(TinyNet())
    decay = 0.9
    ema = EMA(model, decay, warmup=warmup)
    ref = {k: v.double().clone() for k, v in model.state_dict().items()}
    for n in range(7):
        with torch.no_grad():
            for t in model.state_dict().values():
                t.add_(torch.randn_like(t))
        ema.update(model)
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        for k, v in model.state_dict().items():
            ref[k] = d * ref[k] + (1 - d) * v.double()
    err = max((ema.shadow[k].double() - ref[k]).abs().max().item() for k in ref)
    assert err < 5e-6  # float32 shadow of values up to ~10: a few float32 ulps
    assert ema.num_updates == 7 and set(ema.shadow) == set(ref)


def test_ema_float32_shadow_for_bf16_copies_int_buffers_and_module():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).to(torch.bfloat16)
    ema = EMA(model, 0.5)
    assert ema.shadow["0.weight"].dtype == torch.float32
    assert ema.shadow["1.num_batches_tracked"].dtype == torch.int64
    model.train()(torch.randn(5, 3, dtype=torch.bfloat16))
    ema.update(model)
    assert ema.shadow["1.num_batches_tracked"].item() == 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = ema.module()
    assert not copy.training and not any(p.requires_grad for p in copy.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the training model is untouched
        assert torch.equal(copy.state_dict()[k], ema.shadow[k].to(v.dtype))
    ema.copy_to(model)
    assert torch.equal(model.state_dict()["0.weight"], ema.shadow["0.weight"].to(torch.bfloat16))


def test_ema_unwraps_dataparallel_and_compiled_names():
    model = _randomise(TinyNet())
    ema = EMA(nn.DataParallel(model), 0.5)
    assert "inp.weight" in ema.shadow and not any(k.startswith("module.") for k in ema.shadow)
    compiled = torch.compile(model)
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    with torch.no_grad():
        model.inp.weight.add_(1.0)
    ema.update(compiled)
    assert torch.allclose(ema.shadow["inp.weight"], model.inp.weight - 0.5)


def test_ema_state_dict_round_trip_and_errors():
    model = _randomise(TinyNet())
    ema = EMA(model, 0.9)
    ema.update(_randomise(model))
    other = EMA(_randomise(TinyNet()), 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(ValueError, match=r"missing keys \[inp.bias, inp.weight"):
        ema.update(nn.Sequential())  # nothing matches: every key named as missing
    wrong = nn.Linear(4, 16)
    with pytest.raises(ValueError, match="decay"):
        EMA(wrong, 1.5)
    bad = EMA(wrong, 0.9)
    with pytest.raises(ValueError, match=r"weight: expected \(16, 4\), got \(3, 4\)"):
        bad.update(nn.Linear(4, 3))


# ------------------------------------------------------------------------------------ resume round trip


def _setup(seed):
    torch.manual_seed(seed)
    model = _randomise(TinyNet())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, optimizer, EMA(model, 0.8, warmup=True)


def _train_step(model, optimizer, ema, gen):
    """Draws from every RNG a training loop may use: a generator, torch global (dropout), numpy, python."""
    x = torch.randn(8, 4, generator=gen)
    target = torch.from_numpy(np.random.randn(8, 1).astype(np.float32)) * random.random()
    loss = ((model(x) - target) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    ema.update(model)
    return loss.detach()


def test_resume_continues_bit_identically(tmp_path):
    model, optimizer, ema = _setup(0)
    gen = torch.Generator().manual_seed(123)
    np.random.seed(1)
    random.seed(2)
    reference = [_train_step(model, optimizer, ema, gen) for _ in range(6)]

    model2, optimizer2, ema2 = _setup(0)
    gen2 = torch.Generator().manual_seed(123)
    np.random.seed(1)
    random.seed(2)
    first = [_train_step(model2, optimizer2, ema2, gen2) for _ in range(3)]
    save_checkpoint(tmp_path, 3, model=model2, optimizer=optimizer2, ema=ema2, generators={"data": gen2},
                    config={"lr": 1e-2}, extra={"loss": float(first[-1])})

    # A fresh process state: different weights, optimizer moments, EMA and RNG states.
    model3, optimizer3, ema3 = _setup(99)
    gen3 = torch.Generator().manual_seed(7)
    np.random.seed(5)
    random.seed(6)
    path, state = load_latest_checkpoint(tmp_path, model=model3, optimizer=optimizer3, ema=ema3,
                                         generators={"data": gen3})
    assert path.name == "step_00000003" and state["step"] == 3 and state["config"] == {"lr": 1e-2}
    assert state["extra"]["loss"] == float(first[-1])
    resumed = first + [_train_step(model3, optimizer3, ema3, gen3) for _ in range(3)]
    for a, b in zip(reference, resumed):
        assert torch.equal(a, b)
    for k, v in model.state_dict().items():
        assert torch.equal(v, model3.state_dict()[k]), k
        assert torch.equal(ema.shadow[k], ema3.shadow[k]), k
    assert ema3.num_updates == ema.num_updates == 6


def test_restore_rng_replays_every_generator(tmp_path):
    gen = torch.Generator().manual_seed(3)
    model, _, _ = _setup(0)
    path = save_checkpoint(tmp_path, 0, model=model, generators={"g": gen})

    def draw():
        return (torch.rand(3), torch.rand(3, generator=gen), np.random.rand(3), random.random())

    first = draw()
    restore_rng(path, generators={"g": gen})
    second = draw()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert np.array_equal(first[2], second[2]) and first[3] == second[3]
    with pytest.raises(CheckpointError, match="no state for generator 'other'"):
        load_checkpoint(path, generators={"other": gen})


def test_optimizer_json_holds_structure_and_tensors_hold_state(tmp_path):
    model, optimizer, ema = _setup(0)
    gen = torch.Generator().manual_seed(0)
    _train_step(model, optimizer, ema, gen)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer)
    tree = json.loads((path / "optimizer.json").read_text())
    assert tree["param_groups"][0]["betas"] == {"__tuple__": [0.9, 0.999]}
    tensors = load_file(path / "optimizer.safetensors")
    exp_avg = optimizer.state[model.inp.weight]["exp_avg"]
    assert torch.equal(tensors["state.0.exp_avg"], exp_avg)
    model2, optimizer2, _ = _setup(1)
    load_checkpoint(path, optimizer=optimizer2)
    assert optimizer2.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]


# ----------------------------------------------------------------------------------- layout, keep_last


def test_layout_hashes_and_prefix_free_names(tmp_path):
    model, optimizer, ema = _setup(0)
    path = save_checkpoint(tmp_path, 12, model=nn.DataParallel(model), optimizer=optimizer, ema=ema)
    assert path == tmp_path / "checkpoints" / "step_00000012"
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted(["model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json",
                            "rng.safetensors", "rng.json", "state.json"])
    state = json.loads((path / "state.json").read_text())
    assert state["format_version"] == 1 and state["step"] == 12 and len(state["files"]) == 6
    saved = load_file(path / "model.safetensors")
    assert set(saved) == set(model.state_dict())
    compiled_path = save_checkpoint(tmp_path, 13, model=torch.compile(model))
    assert set(load_file(compiled_path / "model.safetensors")) == set(model.state_dict())
    target = nn.DataParallel(_randomise(TinyNet()))
    load_checkpoint(compiled_path, model=target)
    for k, v in model.state_dict().items():
        assert torch.equal(target.module.state_dict()[k], v)
    # A compiled submodule puts `_orig_mod` in the middle of names; saved and loaded without it.
    nested = _randomise(TinyNet())
    nested.inp = torch.compile(nested.inp)
    assert "inp._orig_mod.weight" in nested.state_dict()
    nested_path = save_checkpoint(tmp_path, 14, model=nested, ema=EMA(nested))
    assert set(load_file(nested_path / "model.safetensors")) == set(model.state_dict())
    assert set(load_file(nested_path / "ema.safetensors")) == set(model.state_dict())
    load_checkpoint(nested_path, model=target)
    assert torch.equal(target.module.inp.weight, nested.inp.weight)
    load_checkpoint(compiled_path, model=nested)
    assert torch.equal(nested.inp.weight, model.inp.weight)
    assert not list(tmp_path.glob("checkpoints/.tmp-*"))


def test_keep_last_and_replacing_a_step(tmp_path):
    model, _, _ = _setup(0)
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model=model, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    with torch.no_grad():
        model.out.bias.fill_(42.0)
    save_checkpoint(tmp_path, 5, model=model, keep_last=2)
    assert load_file(tmp_path / "checkpoints" / "step_00000005" / "model.safetensors")["out.bias"].item() == 42.0
    assert len(list_checkpoints(tmp_path)) == 2 and not list((tmp_path / "checkpoints").glob(".*"))
    save_checkpoint(tmp_path, 6, model=model, keep_last=None)
    assert len(list_checkpoints(tmp_path)) == 3
    assert load_latest_checkpoint(tmp_path / "empty", model=model) is None


# ------------------------------------------------------------------------------------------ corruption


def _two_checkpoints(tmp_path):
    model, optimizer, ema = _setup(0)
    first = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, ema=ema)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    _randomise(model)
    second = save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, ema=ema)
    return first, second, good


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "state_json"])
def test_corrupt_newest_warns_and_falls_back(tmp_path, damage):
    first, second, good = _two_checkpoints(tmp_path)
    target = second / ("state.json" if damage == "state_json" else "model.safetensors")
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
        reason = "truncated"
    elif damage in ("flip", "state_json"):
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
        reason = "sha256 mismatch" if damage == "flip" else "state.json"
    else:
        target.unlink()
        reason = "missing"
    with pytest.raises(CheckpointError, match=reason):
        load_checkpoint(second, model=TinyNet())
    model = _randomise(TinyNet())
    with pytest.warns(UserWarning, match=rf"step_00000002.*{reason}"):
        path, state = load_latest_checkpoint(tmp_path, model=model)
    assert path == first and state["step"] == 1
    for k, v in good.items():
        assert torch.equal(model.state_dict()[k], v)


def test_all_corrupt_raises_instead_of_restarting(tmp_path):
    first, second, _ = _two_checkpoints(tmp_path)
    for p in (first, second):
        (p / "model.safetensors").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no loadable checkpoint"):
        load_latest_checkpoint(tmp_path, model=TinyNet())


def test_mismatches_name_the_keys_and_leave_the_model_untouched(tmp_path):
    model, optimizer, ema = _setup(0)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, ema=ema)

    class Wider(TinyNet):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)

    class Taller(TinyNet):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(16, 2)

    for net, strict, message in [
        (Wider(), True, r"missing keys \[extra.bias, extra.weight\]"),
        (Taller(), False, r"out.weight: expected \(2, 16\), got \(1, 16\)"),
    ]:
        before = {k: v.clone() for k, v in _randomise(net).state_dict().items()}
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path, model=net, strict=strict)
        assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    partial = nn.Sequential()
    partial.inp = nn.Linear(4, 16)
    load_checkpoint(path, model=partial, strict=False)  # unexpected keys tolerated
    assert torch.equal(partial.inp.weight, model.inp.weight)
    with pytest.raises(CheckpointError, match="parameter groups have sizes"):
        load_checkpoint(path, optimizer=torch.optim.AdamW(partial.parameters()))
    with pytest.raises(CheckpointError, match="no ema.safetensors"):
        load_checkpoint(save_checkpoint(tmp_path, 2, model=model), ema=ema)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nope", model=model)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"step": -1}, ValueError, "step"),
        ({"keep_last": 0}, ValueError, "keep_last"),
        ({"model": "model"}, TypeError, "model"),
        ({"optimizer": object()}, TypeError, "optimizer"),
        ({"config": {"f": object()}}, TypeError, "config"),
        ({"generators": [torch.Generator()]}, TypeError, "generators"),
    ],
)
def test_save_bad_arguments(tmp_path, kwargs, error, match):
    args = {"step": 1, "model": TinyNet(), **kwargs}
    with pytest.raises(error, match=match):
        save_checkpoint(tmp_path, **args)
    assert list_checkpoints(tmp_path) == []


# ----------------------------------------------------------------------------------------------- pickle


def test_no_pickle_anywhere(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("dump", "dumps", "load", "loads"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(pickle, "Pickler", forbidden)
    monkeypatch.setattr(torch, "save", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model, optimizer, ema = _setup(0)
    _train_step(model, optimizer, ema, torch.Generator().manual_seed(0))
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, ema=ema,
                           generators={"g": torch.Generator()}, config={"a": [1, 2]})
    load_checkpoint(path, model=model, optimizer=optimizer, ema=ema, generators={"g": torch.Generator()})
    suffixes = {p.suffix for p in path.iterdir()}
    assert suffixes == {".safetensors", ".json"}


# ---------------------------------------------------------------------------------------------- SIGKILL

_WRITER = textwrap.dedent(
    """
    import sys, time
    import torch
    import adaln.engine.checkpoint as ckpt

    run, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])  # ~4 MB per save
    with torch.no_grad():
        model[0].bias.fill_(1)  # every checkpoint's first bias equals its step
    ckpt.save_checkpoint(run, 1, model=model)
    print("first saved", flush=True)
    if mode == "sleep":
        seal = ckpt._seal_file

        def slow_seal(path):
            out = seal(path)
            time.sleep(120)  # killed here, with model.safetensors written inside the temporary directory
            return out

        ckpt._seal_file = slow_seal
        ckpt.save_checkpoint(run, 2, model=model)
    else:
        step = 2
        while True:
            with torch.no_grad():
                model[0].bias.fill_(step)
            ckpt.save_checkpoint(run, step, model=model, keep_last=2)
            step += 1
    """
)


def _start_writer(tmp_path, mode):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(run), mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first saved"
    return proc, run


def _kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_inside_a_write_leaves_previous_checkpoint(tmp_path):
    proc, run = _start_writer(tmp_path, "sleep")
    deadline = time.monotonic() + 60
    while not list(run.glob("checkpoints/.tmp-step_00000002-*/model.safetensors")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    _kill(proc)
    assert list(run.glob("checkpoints/.tmp-step_00000002-*"))  # the partial write is still there ...
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001"]  # ... and ignored
    assert not (run / "checkpoints" / "step_00000002").exists()
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stale temporary directory must not even cause a warning
        path, state = load_latest_checkpoint(run, model=model, rng=False)
    assert state["step"] == 1 and model[0].bias[0].item() == 1
    save_checkpoint(run, 2, model=model)  # a new writer is not disturbed by the stale directory
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001", "step_00000002"]


def test_sigkill_at_a_random_moment_of_a_save_loop(tmp_path):
    proc, run = _start_writer(tmp_path, "loop")
    deadline = time.monotonic() + 60
    while max([int(p.name[5:]) for p in list_checkpoints(run)], default=0) < 4:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    time.sleep(float(np.random.default_rng(0).uniform(0.0, 0.3)))
    _kill(proc)
    complete = list_checkpoints(run)
    assert 2 <= len(complete) <= 3  # keep_last=2, plus the newest if killed before pruning
    assert sorted(run.glob("checkpoints/step_*")) == complete  # no step_ directory without state.json
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])
    for path in complete:  # every complete checkpoint verifies and loads
        state = load_checkpoint(path, model=model, rng=False)
        assert model[0].bias[0].item() == state["step"]
