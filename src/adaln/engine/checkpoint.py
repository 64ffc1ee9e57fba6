"""Crash-safe training checkpoints without pickle: safetensors for tensors, JSON for everything else.

One directory per checkpoint, ``run_dir/checkpoints/step_{step:08d}/``:

    model.safetensors      model state_dict with wrapper-free names (no ``module.`` / ``_orig_mod.``)
    ema.safetensors        EMA averages (optional); update count etc. as JSON in the file's metadata
    optimizer.safetensors  every tensor of optimizer.state_dict() (optional) ...
    optimizer.json         ... and the rest of it: structure, param_groups, numbers; tensors by key
    rng.safetensors        torch CPU RNG, CUDA RNG of each device (if CUDA is initialised), and the
                           state of each torch.Generator passed in
    rng.json               numpy's global (legacy) and python ``random`` states, generator devices
    state.json             format_version, step, config, extra, every file's sha256 and size, and a
                           checksum of state.json itself

Atomicity: everything is written into ``checkpoints/.tmp-step_XXXXXXXX-<pid>``, each file fsynced, then
the directory fsynced and renamed to ``step_XXXXXXXX`` (rename is atomic on POSIX filesystems), then the
parent fsynced. Checkpoints beyond ``keep_last`` are deleted only after the new one is in place, each
first renamed to ``.trash-*`` so that no half-deleted ``step_*`` directory can exist. A crash leaves
complete checkpoints plus at most ``.tmp-*`` / ``.trash-*`` directories, which ``list_checkpoints``
ignores. Only one process (rank 0 in distributed runs) should call ``save_checkpoint``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from adaln.engine.ema import EMA, canonical_name, canonical_state_dict, check_state_dict_match, unwrap_model
from adaln.errors import UserError

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
STEP_PATTERN = re.compile(r"^step_(\d{8,})$")
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
RNG_FILE = "rng.safetensors"
RNG_JSON = "rng.json"
STATE_FILE = "state.json"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, corrupt, truncated or does not fit the objects it is loaded into."""


#################################################################################
#                                     Saving                                    #
#################################################################################

def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model: nn.Module | Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None = None,
    ema: EMA | Mapping[str, Any] | None = None,
    config: Any = None,
    extra: Any = None,
    generators: Mapping[str, torch.Generator] | None = None,
    keep_last: int | None = 3,
) -> Path:
    """Atomically write ``run_dir/checkpoints/step_{step:08d}`` and keep the newest ``keep_last``.

    ``config`` (dict, dataclass or OmegaConf) and ``extra`` (e.g. metrics) must be JSON-serialisable.
    ``model``, ``optimizer`` and ``ema`` may also be given as what their ``state_dict()`` returns (e.g. the
    full state gathered from a sharded model, ``adaln.engine.distributed.checkpoint_state``).
    Saving a step that already exists replaces it. Returns the checkpoint directory.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive int or None (keep all), got {keep_last!r}")
    if not isinstance(model, (nn.Module, Mapping)):
        raise TypeError(f"model must be a torch.nn.Module or its state_dict, got {type(model).__name__}")
    _check_targets(*(None if isinstance(x, Mapping) else x for x in (model, optimizer, ema)))
    generators = _check_generators(generators)
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "config": _jsonable(config, "config"),
        "extra": _jsonable(extra, "extra"),
        "torch_version": torch.__version__,
    }

    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        files: dict[str, dict[str, Any]] = {}
        model_state = canonical_state_dict(model) if isinstance(model, nn.Module) else model
        model_tensors = {k: _cpu_copy(v) for k, v in model_state.items()}
        files[MODEL_FILE] = _write_tensors(tmp / MODEL_FILE, model_tensors, {"format": "pt"})
        if ema is not None:
            ema_state = dict(ema.state_dict() if isinstance(ema, EMA) else ema)
            shadow = {k: _cpu_copy(v) for k, v in ema_state.pop("shadow").items()}
            files[EMA_FILE] = _write_tensors(tmp / EMA_FILE, shadow, {"ema_state": json.dumps(ema_state)})
        if optimizer is not None:
            opt_tensors: dict[str, Tensor] = {}
            opt_state = optimizer if isinstance(optimizer, Mapping) else optimizer.state_dict()
            tree = _encode(opt_state, "", opt_tensors)
            files[OPTIMIZER_FILE] = _write_tensors(tmp / OPTIMIZER_FILE, opt_tensors)
            files[OPTIMIZER_JSON] = _write_json(tmp / OPTIMIZER_JSON, tree)
        rng_tensors, rng_meta = _capture_rng(generators)
        files[RNG_FILE] = _write_tensors(tmp / RNG_FILE, rng_tensors)
        files[RNG_JSON] = _write_json(tmp / RNG_JSON, rng_meta)
        state["files"] = files
        state["checksum"] = _state_checksum(state)
        _write_json(tmp / STATE_FILE, state)
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        older = [p for p in list_checkpoints(run_dir) if p != final]
        for path in older[: max(0, len(older) + 1 - keep_last)]:
            _discard_dir(path)
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (``step_*`` directories with a state.json) sorted by step, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        match = STEP_PATTERN.match(p.name)
        if match and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(match.group(1)), p))
    return [p for _, p in sorted(found)]


#################################################################################
#                                     Loading                                   #
#################################################################################

def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    ema: EMA | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
    rng: bool = True,
) -> dict[str, Any]:
    """Verify a checkpoint and load it into the given objects; returns the content of state.json.

    Every file's sha256 is checked and every part is decoded and matched against its target before
    anything is modified. ``strict=False`` tolerates missing / unexpected model keys (never shape
    mismatches). ``rng=True`` restores the global torch / CUDA / numpy / python RNG states; the
    ``generators`` given are always restored. Raises ``CheckpointError`` naming the file or keys at fault.
    """
    path = Path(path)
    _check_targets(model, optimizer, ema)
    generators = _check_generators(generators)
    state = _read_verified(path)
    listed = state["files"]
    apply: list[Callable[[], None]] = []

    if model is not None:
        tensors, _ = _read_tensors(path, MODEL_FILE, listed, map_location)
        apply.append(_model_loader(unwrap_model(model), tensors, strict, path / MODEL_FILE))
    if ema is not None:
        shadow, meta = _read_tensors(path, EMA_FILE, listed, map_location)
        try:
            check_state_dict_match(ema.shadow, shadow, what=f"{path / EMA_FILE}")
            ema_state = {**json.loads(meta["ema_state"]), "shadow": shadow}
        except (ValueError, KeyError) as err:
            raise CheckpointError(str(err)) from err
        apply.append(lambda: ema.load_state_dict(ema_state))
    if optimizer is not None:
        opt_state = _read_optimizer(path, listed, map_location)
        _check_optimizer_fits(optimizer, opt_state, path)
        apply.append(lambda: optimizer.load_state_dict(opt_state))
    if rng or generators:
        apply.append(_rng_loader(path, listed, generators, global_rng=rng))

    for load in apply:
        try:
            load()
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: loading failed: {err}") from err
    return state


def load_latest_checkpoint(run_dir: str | os.PathLike, **kwargs: Any) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest loadable checkpoint (same keywords as ``load_checkpoint``); None when there is none.

    A corrupt newest checkpoint is skipped with a warning naming it and the reason. When checkpoints
    exist but none loads, raises ``CheckpointError`` rather than letting a run silently restart.
    """
    candidates = list_checkpoints(run_dir)
    reasons = []
    for path in reversed(candidates):
        try:
            return path, load_checkpoint(path, **kwargs)
        except CheckpointError as err:
            warnings.warn(f"skipping checkpoint {path}: {err}", stacklevel=2)
            reasons.append(f"{path.name}: {err}")
    if candidates:
        raise CheckpointError(f"no loadable checkpoint in {Path(run_dir) / CHECKPOINTS_DIR}: " + " | ".join(reasons))
    return None


def restore_rng(path: str | os.PathLike, *, generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Restore torch CPU/CUDA, numpy, python and the given generators' RNG states from a checkpoint."""
    path = Path(path)
    state = _read_verified(path)
    _rng_loader(path, state["files"], _check_generators(generators), global_rng=True)()


#################################################################################
#                           Files: writing and verifying                        #
#################################################################################

def _seal_file(path: Path) -> dict[str, Any]:
    """fsync ``path`` and return its sha256 and size (read back from disk)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
        os.fsync(f.fileno())
    return {"sha256": digest.hexdigest(), "bytes": size}


def _write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> dict:
    save_file(tensors, str(path), metadata=metadata)
    return _seal_file(path)


def _write_json(path: Path, obj: Any) -> dict:
    path.write_text(json.dumps(obj, indent=1) + "\n")
    return _seal_file(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and deleted afterwards."""
    if not final.exists():
        os.rename(tmp, final)
        return
    old = _trash_name(final)
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old)


def _discard_dir(path: Path) -> None:
    """Delete a checkpoint: first an atomic rename out of the ``step_*`` namespace, then the files."""
    trash = _trash_name(path)
    os.rename(path, trash)
    shutil.rmtree(trash)


def _trash_name(path: Path) -> Path:
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    if trash.exists():
        shutil.rmtree(trash)
    return trash


def _state_checksum(state: dict[str, Any]) -> str:
    body = {k: v for k, v in state.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The verified state.json of a checkpoint directory (CheckpointError naming the file otherwise)."""
    return _read_verified(Path(path))


def _read_verified(path: Path) -> dict[str, Any]:
    """Parse state.json, check its own checksum, its fields, and every listed file's size and sha256."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: missing {STATE_FILE}") from err
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable or truncated JSON ({err})") from err
    if not isinstance(state, dict) or state.get("checksum") != _state_checksum(state):
        raise CheckpointError(f"{path / STATE_FILE}: checksum mismatch (corrupt file)")
    if not isinstance(state.get("files"), dict):
        raise CheckpointError(f"{path / STATE_FILE}: no 'files' table")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path / STATE_FILE}: 'step' must be a non-negative integer, got {step!r}")
    for key in ("config", "extra"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            raise CheckpointError(f"{path / STATE_FILE}: {key!r} must be a mapping, got {type(state[key]).__name__}")
    for name, info in state["files"].items():
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)):
            raise CheckpointError(f"{path / STATE_FILE}: entry {name!r} of 'files' needs 'bytes' and 'sha256'")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path / STATE_FILE}: format_version {state.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    match = STEP_PATTERN.match(path.name)
    if match and int(match.group(1)) != state.get("step"):
        raise CheckpointError(f"{path / STATE_FILE}: step {state.get('step')!r} does not match the directory name")
    for name, info in state["files"].items():
        file = path / name
        if Path(name).name != name:
            raise CheckpointError(f"{path / STATE_FILE}: invalid file name {name!r}")
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        actual = _seal_file(file)
        if actual["bytes"] != info["bytes"]:
            raise CheckpointError(f"{file}: truncated or resized ({actual['bytes']} bytes, expected {info['bytes']})")
        if actual["sha256"] != info["sha256"]:
            raise CheckpointError(f"{file}: sha256 mismatch (corrupt file)")
    return state


def _read_tensors(
    path: Path, name: str, listed: dict, map_location: str | torch.device
) -> tuple[dict[str, Tensor], dict[str, str]]:
    if name not in listed:
        raise CheckpointError(f"{path}: the checkpoint has no {name}")
    try:
        with safe_open(str(path / name), framework="pt", device=str(map_location)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"{path / name}: cannot be decoded ({err})") from err


#################################################################################
#                             Model and optimizer state                         #
#################################################################################

def _model_loader(target: nn.Module, saved: dict[str, Tensor], strict: bool, file: Path) -> Callable[[], None]:
    """Match saved (wrapper-free) names to ``target``'s own names and check shapes; return the loader."""
    actual_names = {canonical_name(k): k for k in target.state_dict()}
    expected = canonical_state_dict(target)
    common = {k: v for k, v in saved.items() if k in expected}
    try:
        check_state_dict_match({k: expected[k] for k in common}, common, what=str(file))
        if strict:
            check_state_dict_match(expected, saved, what=f"{file} (strict=True)")
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    to_load = {actual_names[k]: v for k, v in common.items()}
    return lambda: target.load_state_dict(to_load, strict=strict)


def _read_optimizer(path: Path, listed: dict, map_location: str | torch.device) -> dict[str, Any]:
    tensors, _ = _read_tensors(path, OPTIMIZER_FILE, listed, map_location)
    if OPTIMIZER_JSON not in listed:
        raise CheckpointError(f"{path}: the checkpoint has no {OPTIMIZER_JSON}")
    try:
        return _decode(json.loads((path / OPTIMIZER_JSON).read_text()), tensors)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path / OPTIMIZER_JSON}: cannot be decoded ({err})") from err


def _check_optimizer_fits(optimizer: torch.optim.Optimizer, saved: dict[str, Any], path: Path) -> None:
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list):
        raise CheckpointError(f"{path / OPTIMIZER_JSON}: no param_groups list")
    want = [len(g["params"]) for g in optimizer.param_groups]
    have = [len(g.get("params", [])) for g in groups]
    if want != have:
        raise CheckpointError(
            f"{path / OPTIMIZER_JSON}: parameter groups have sizes {have}, the optimizer's have {want}"
        )


def _encode(obj: Any, where: str, tensors: dict[str, Tensor]) -> Any:
    """JSON tree of ``obj`` with every tensor moved into ``tensors`` and replaced by {"__tensor__": key}."""
    if isinstance(obj, Tensor):
        key = where.lstrip(".") or "tensor"
        while key in tensors:
            key += "'"
        tensors[key] = _cpu_copy(obj)
        return {"__tensor__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{where}.{i}", tensors) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"__tuple__": items}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{where}.{k}", tensors) for k, v in obj.items()}
        for k in obj:
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"cannot store the key {k!r} at {where or 'the top level'} in JSON")
        return {"__items__": [[k, _encode(v, f"{where}.{k}", tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} at {where or 'the top level'} without pickle")


def _decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of ``_encode``."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if obj.keys() == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if obj.keys() == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if obj.keys() == {"__items__"}:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


#################################################################################
#                                   RNG state                                   #
#################################################################################

def _capture_rng(generators: dict[str, torch.Generator]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"torch.cpu": torch.get_rng_state()}
    # Only when CUDA is already in use: querying it would otherwise initialise CUDA as a side effect.
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    for i, s in enumerate(cuda_states):
        tensors[f"torch.cuda.{i}"] = s
    for name, g in generators.items():
        tensors[f"generator.{name}"] = g.get_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    meta = {
        "cuda_devices": len(cuda_states),
        "generators": {name: g.device.type for name, g in generators.items()},
        "numpy": {"bit_generator": kind, "keys": keys.tolist(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    return tensors, meta


def _rng_loader(
    path: Path, listed: dict, generators: dict[str, torch.Generator], *, global_rng: bool
) -> Callable[[], None]:
    tensors, _ = _read_tensors(path, RNG_FILE, listed, "cpu")
    if RNG_JSON not in listed:
        raise CheckpointError(f"{path}: the checkpoint has no {RNG_JSON}")
    try:
        meta = json.loads((path / RNG_JSON).read_text())
        saved_devices = meta["generators"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{path / RNG_JSON}: cannot be decoded ({err})") from err
    for name, g in generators.items():
        if name not in saved_devices:
            raise CheckpointError(f"{path / RNG_FILE}: no state for generator {name!r} (saved: {sorted(saved_devices)})")
        if saved_devices[name] != g.device.type:
            raise CheckpointError(
                f"{path / RNG_FILE}: generator {name!r} was saved on {saved_devices[name]}, "
                f"the one given is on {g.device.type}"
            )

    def restore() -> None:
        for name, g in generators.items():
            g.set_state(tensors[f"generator.{name}"])
        if not global_rng:
            return
        torch.set_rng_state(tensors["torch.cpu"])
        n_cuda = meta["cuda_devices"]
        if n_cuda and torch.cuda.is_available() and torch.cuda.device_count() == n_cuda:
            torch.cuda.set_rng_state_all([tensors[f"torch.cuda.{i}"] for i in range(n_cuda)])
        elif n_cuda:
            warnings.warn(
                f"{path}: CUDA RNG states of {n_cuda} device(s) not restored "
                f"(this process sees {torch.cuda.device_count() if torch.cuda.is_available() else 0})",
                stacklevel=3,
            )
        np_state = meta["numpy"]
        np.random.set_state((np_state["bit_generator"], np.asarray(np_state["keys"], dtype=np.uint32),
                             np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
        py = meta["python"]
        random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))

    return restore


#################################################################################
#                                    Helpers                                    #
#################################################################################

def _check_targets(model: object, optimizer: object, ema: object) -> None:
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if ema is not None and not isinstance(ema, EMA):
        raise TypeError(f"ema must be an adaln.engine.EMA or None, got {type(ema).__name__}")


def _check_generators(generators: object) -> dict[str, torch.Generator]:
    if generators is None:
        return {}
    if not isinstance(generators, Mapping) or not all(
        isinstance(k, str) and isinstance(g, torch.Generator) for k, g in generators.items()
    ):
        raise TypeError("generators must be a mapping from names to torch.Generator, e.g. {'data': g}")
    return dict(generators)


def _cpu_copy(t: Tensor) -> Tensor:
    # A private contiguous copy: safetensors refuses tensors that share storage (tied weights, views).
    return t.detach().to("cpu", copy=True).contiguous()


def _jsonable(value: Any, name: str) -> Any:
    """Plain JSON data from a dict / dataclass / OmegaConf config; TypeError naming ``name`` otherwise."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        value = OmegaConf.to_container(value, resolve=True)
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be JSON-serialisable (dict of numbers, strings, lists): {err}") from err
