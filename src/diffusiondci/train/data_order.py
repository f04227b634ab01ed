"""Seeded, resumable data order: which samples each process sees, batch by batch, epoch by epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from diffusiondci.errors import UserInputError
from diffusiondci.runs.seeds import derive_seed


class ResumableSampler(Sampler[int]):
    """Seeded epoch-based sampler that can start in the middle of an epoch.

    Epoch ``e`` uses the permutation ``randperm(n)`` drawn from a generator seeded with
    ``(seed, e)``; like :class:`torch.utils.data.DistributedSampler` (``drop_last=True``) the
    permutation is cut to a multiple of ``world_size`` and rank ``r`` takes ``perm[r::world_size]``;
    the shard is cut to whole batches (training uses ``drop_last``). ``set_epoch(e, start_batch)``
    selects the epoch and the number of batches already consumed, so resuming skips exactly them
    without touching the dataset.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.per_rank = self.num_samples // self.world_size
        self.batches_per_epoch = self.per_rank // self.batch_size
        if self.batches_per_epoch < 1:
            raise UserInputError(
                f"dataset has {self.num_samples} samples, fewer than one batch of {self.batch_size} "
                f"per process x {self.world_size} processes; add data or lower the batch size"
            )
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_per_epoch}]")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def epoch_indices(self, epoch: int) -> list[int]:
        """All indices this rank visits in ``epoch``, in order."""
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            perm = torch.randperm(self.num_samples, generator=g)
        else:
            perm = torch.arange(self.num_samples)
        total = self.per_rank * self.world_size
        shard = perm[:total][self.rank :: self.world_size]
        return shard[: self.batches_per_epoch * self.batch_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch)[self.start_batch * self.batch_size :])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start_batch": self.start_batch, "seed": self.seed}


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch (per-process ``batch_size``, ``drop_last``)."""
    return (num_samples // world_size) // batch_size
