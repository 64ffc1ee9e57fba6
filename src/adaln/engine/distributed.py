"""Training in several processes under torchrun: process group, DDP / FSDP2 wrapping, full-state checkpoints.

``adaln train --distributed ddp|fsdp`` reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and joins a process group: NCCL on CUDA with one GPU per process
(``cuda:LOCAL_RANK``), gloo on CPU. ``batch_size`` is the global batch; each rank takes
``batch_size / world`` samples of it.

- ``ddp``: ``DistributedDataParallel``. Every rank holds the whole model, optimizer state and EMA;
  gradients are averaged by all-reduce, so all replicas stay identical.
- ``fsdp``: FSDP2 ``fully_shard`` on each transformer block, then on the root (embedders, final layer).
  Parameters, gradients and optimizer state are split along dim 0 over the ranks, and so is the EMA:
  each rank averages its own shard, the whole average exists only when a checkpoint gathers it. On CUDA
  the forward/backward computes in bf16 with fp32 gradient reduction; on CPU everything stays fp32.

Checkpoints always hold the full, unsharded state with wrapper-free names (``checkpoint_state``): they
load in a single process and resume under any world size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from adaln.errors import ConfigError
from adaln.engine.ema import EMA, canonical_state_dict

# FSDP2, DTensor and torch.distributed.checkpoint are imported where used: together they take about a
# second to import, and every ``adaln sample`` imports this module through the training loop.
if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

MODES = ("none", "ddp", "fsdp")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Topology:
    """This process's place in the run: ``mode``, ``rank`` of ``world`` processes, and its device."""

    mode: str
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs, shows progress and writes files."""
        return self.rank == 0


def per_rank_batch(batch_size: int, world: int) -> int:
    """Each process's share of the global ``batch_size``; ConfigError unless ``world`` divides it."""
    if batch_size % world:
        raise ConfigError(
            f"batch_size {batch_size} is the global batch and must be divisible by the world size {world} "
            f"(each process takes batch_size / {world} samples)"
        )
    return batch_size // world


def torchrun_environment(mode: str, env: Mapping[str, str] = os.environ) -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` from torchrun's variables; ConfigError when missing or inconsistent."""
    missing = [v for v in TORCHRUN_VARIABLES if not env.get(v)]
    if missing:
        raise ConfigError(
            f"--distributed {mode} needs the torchrun environment ({', '.join(missing)} not set): "
            f"launch with torchrun --nproc_per_node=N -m adaln train ... --distributed {mode}"
        )
    try:
        rank, world, local_rank = (int(env[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None
    if not 0 <= rank < world or local_rank < 0:
        raise ConfigError(f"RANK {rank} / WORLD_SIZE {world} / LOCAL_RANK {local_rank} are inconsistent")
    return rank, world, local_rank


@contextmanager
def launch(mode: str, device: torch.device, batch_size: int) -> Iterator[Topology]:
    """Check the launch, join the process group for ``mode`` ddp/fsdp (leaving it on exit) and pick the
    device (``cuda:LOCAL_RANK`` when ``device`` is CUDA). A group that already exists is used as is."""
    if mode not in MODES:
        raise ConfigError(f"distributed must be one of {MODES}, got {mode!r}")
    if mode == "none":
        world = os.environ.get("WORLD_SIZE", "1")
        if world != "1":
            raise ConfigError(
                f"launched in {world} processes (WORLD_SIZE={world}) but --distributed is none: "
                "pass --distributed ddp or fsdp, or start a single process"
            )
        yield Topology("none", 0, 1, 0, device)
        return
    rank, world, local_rank = torchrun_environment(mode)
    per_rank_batch(batch_size, world)
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {visible} CUDA device(s) are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    try:
        if (dist.get_rank(), dist.get_world_size()) != (rank, world):
            raise ConfigError(f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
                              f"the environment says {rank} of {world}")
        yield Topology(mode, rank, world, local_rank, device)
    finally:
        if created:
            dist.destroy_process_group()


def barrier(topo: Topology) -> None:
    """Wait for every rank (no-op in a single process)."""
    if topo.mode != "none":
        dist.barrier()


def mean_over_ranks(value: Tensor, topo: Topology) -> float:
    """The mean of a scalar over all ranks (e.g. the global batch's loss from each rank's share)."""
    if topo.world == 1:
        return value.item()
    total = value.detach().float().clone()
    dist.all_reduce(total)  # SUM: gloo has no AVG
    return total.item() / topo.world


def agree_over_ranks(value: int, topo: Topology) -> tuple[int, int]:
    """``(min, max)`` of an integer over all ranks, e.g. to check that all resumed the same step."""
    if topo.world == 1:
        return value, value
    both = torch.tensor([value, -value], dtype=torch.int64, device=topo.device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return -int(both[1]), int(both[0])


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor behind a DTensor (a collective when sharded); plain tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


#################################################################################
#                        Wrapping the model, optimizer and EMA                  #
#################################################################################

def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    """FSDP2 policy: bf16 parameters in compute with fp32 gradient reduction on CUDA, fp32 on CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, units: Iterable[nn.Module], device: torch.device) -> nn.Module:
    """FSDP2: ``fully_shard`` each unit (a transformer block), then the root; returns ``model`` (sharded in place)."""
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision(device)
    for block in units:
        fully_shard(block, mp_policy=policy)
    # The root keeps its inputs' dtype: bf16 would round a DiT timestep (|t| up to ~1.5e3) to steps of 4-8.
    fully_shard(model, mp_policy=replace(policy, cast_forward_inputs=False))
    return model


def distribute_training(
    model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA, topo: Topology, make_optimizer: OptimizerFactory,
    units: Iterable[nn.Module] = (),
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``(net, optimizer)`` for ``topo``: ``net`` is the module whose backward synchronises gradients.

    ``model``, ``optimizer`` (made by ``make_optimizer(model.parameters())``) and ``ema`` hold the full,
    possibly resumed state. DDP keeps the parameters, so ``optimizer`` is returned as it is. FSDP2 replaces
    every parameter by its shard (each of ``units`` sharded on its own, then the root): the EMA averages are split the same way and a new optimizer from
    ``make_optimizer`` receives the full optimizer state, which ``set_optimizer_state_dict`` shards.
    """
    if topo.mode == "none":
        return model, optimizer
    if topo.mode == "ddp":
        ids = [topo.device.index] if topo.device.type == "cuda" else None
        # Buffers (DiT's pos_embed, RBF centres) are constants: nothing to broadcast each step.
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False), optimizer
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _optimizer_param_names(model, optimizer)
    full_optimizer_state = optimizer.state_dict()
    shard_model(model, units, topo.device)
    sharded = canonical_state_dict(model)
    ema.shadow = {name: _shard_like(t, sharded[name]) for name, t in ema.shadow.items()}
    optimizer = make_optimizer(model.parameters())
    if full_optimizer_state["state"]:
        set_optimizer_state_dict(
            model, optimizer, _state_by_name(full_optimizer_state, names),
            options=StateDictOptions(full_state_dict=True),
        )
    return model, optimizer


def checkpoint_state(
    net: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA, topo: Topology
) -> dict[str, Any] | None:
    """``{"model", "optimizer", "ema"}`` full state dicts for ``save_checkpoint`` on rank 0, None elsewhere.

    Names carry no wrapper prefix and the optimizer state is indexed like a single process's
    ``optimizer.state_dict()``. Under FSDP this gathers the shards, a collective: call it on every rank.
    """
    if topo.mode != "fsdp":
        if not topo.is_main:
            return None
        return dict(model=canonical_state_dict(net), optimizer=optimizer.state_dict(), ema=ema.state_dict())
    from torch.distributed.checkpoint import state_dict as dcp

    options = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = dcp.get_model_state_dict(net, options=options)
    optimizer_state = dcp.get_optimizer_state_dict(net, optimizer, options=options)
    ema_state = ema.state_dict()
    shadow = {}
    for name, t in ema_state["shadow"].items():
        whole = full_tensor(t)  # a collective on every rank; then one tensor at a time onto rank 0's CPU
        if topo.is_main:
            shadow[name] = whole.cpu()
    if not topo.is_main:
        return None
    return dict(model=model_state, optimizer=_state_by_index(optimizer_state), ema={**ema_state, "shadow": shadow})


def _shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` split like the DTensor ``like`` (every rank holds ``full``: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def _optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter name of each index of ``optimizer.state_dict()``."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _state_by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An index-keyed ``optimizer.state_dict()`` keyed by parameter names (``set_optimizer_state_dict``'s form)."""
    return {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def _state_by_index(state: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``_state_by_name``: index ``i`` is the ``i``-th name listed by the parameter groups, which
    ``get_optimizer_state_dict`` lists in the optimizer's order."""
    index = {n: i for i, n in enumerate(n for g in state["param_groups"] for n in g["params"])}
    return {
        "state": {index[n]: s for n, s in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    }
