"""One seed scheme for every task: each random draw comes from a generator seeded by
``stream_seed(seed, stream, *keys)``.

``stream_seed`` hashes integer (or string) keys with the splitmix64 finaliser, one round per key, so
distinct key tuples give unrelated 63-bit seeds. The streams keep the kinds of randomness apart:

- ``INIT``: the initial weights (``torch.manual_seed`` once, before the model is built);
- ``DATA_ORDER``: the permutation of epoch ``e``, keys ``(e,)``;
- ``EXAMPLE``: everything a training example draws (its noise level, noise, augmentation, caption, ...),
  keys ``(step, index in the data set)``: one generator per example;
- ``DROPOUT``: condition dropout inside a model's forward, keys ``(rank, step)``;
- ``GENERATE``: sampling, keys chosen by the task (e.g. ``(class, k)``): one generator per sample.

A training example's randomness therefore depends on (seed, step, example index) only: a resumed run
draws what an uninterrupted run draws, and the processes of a distributed run together draw what one
process draws for the global batch (only in-model dropout is per process).
"""

from __future__ import annotations

import hashlib
from enum import IntEnum

import torch
from torch import Tensor

from adaln.errors import ConfigError


class Stream(IntEnum):
    INIT = 1
    DATA_ORDER = 2
    EXAMPLE = 3
    DROPOUT = 4
    GENERATE = 5


_MASK = (1 << 64) - 1


def _key(k: int | str) -> int:
    if isinstance(k, str):
        return int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "little")
    return int(k) & _MASK


def stream_seed(*keys: int | str) -> int:
    """A 63-bit seed from integer or string keys (splitmix64 finaliser per key; order matters)."""
    h = 0
    for key in keys:
        h = ((h ^ _key(key)) + 0x9E3779B97F4A7C15) & _MASK
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
        h ^= h >> 31
    return h >> 1


def generator(*keys: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by ``stream_seed(*keys)``."""
    return torch.Generator(device=device).manual_seed(stream_seed(*keys))


def example_generators(seed: int, step: int, indices: Tensor, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per training example of a batch, keyed by (seed, step, data set index)."""
    return [generator(seed, Stream.EXAMPLE, step, i, device=device) for i in indices.tolist()]


def epoch_batch(n: int, batch_size: int, seed: int, step: int) -> Tensor:
    """Data set indices of the global batch at ``step``: consecutive slices of a seeded permutation of
    each epoch (the last partial batch of an epoch is dropped)."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ConfigError(f"batch_size {batch_size} exceeds the {n} training examples")
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=generator(seed, Stream.DATA_ORDER, epoch))
    return perm[i * batch_size : (i + 1) * batch_size]
