"""A deterministic, resumable distributed sampler.

Epoch ``e`` permutes ``range(N)`` with a generator seeded ``seed + e``; rank
``r`` of ``W`` takes ``perm[r:W*M:W]`` where ``M = N // W`` (drop_last: every
rank gets exactly M indices, so all ranks run the same number of steps). The
state is ``(epoch, position)``: resuming from it replays exactly the remaining
indices an uninterrupted run would have produced on that rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    """Seeded per-epoch shuffle, strided across ranks, resumable mid-epoch.

    Args:
        num_samples_total: Dataset length N.
        num_replicas: World size W (data-parallel ranks).
        rank: This rank, ``0 <= rank < W``.
        seed: Base seed; epoch ``e`` shuffles with ``seed + e``.
        shuffle: If False, indices are taken in order.
        drop_last: If True, drop the ``N % W`` tail so ranks get equal counts;
            if False, pad by wrapping around (some samples seen twice).
    """

    def __init__(
        self,
        num_samples_total: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if drop_last and num_samples_total < num_replicas:
            raise ValueError(
                f"dataset has {num_samples_total} samples, fewer than {num_replicas} ranks"
            )
        self.n = num_samples_total
        self.world = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        """Indices of this epoch already handed out by this rank's iterator."""

    @property
    def per_rank(self) -> int:
        """Indices each rank gets per epoch."""
        return self.n // self.world if self.drop_last else -(-self.n // self.world)

    def __len__(self) -> int:
        return self.per_rank

    def indices(self, epoch: int) -> list[int]:
        """All of this rank's indices for ``epoch``, in order."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        total = self.per_rank * self.world
        if total > self.n:  # not drop_last: wrap around
            perm = (perm * (-(-total // self.n)))[:total]
        return perm[self.rank : total : self.world]

    def set_epoch(self, epoch: int) -> None:
        """Starts ``epoch`` from its beginning."""
        self.epoch = epoch
        self.position = 0

    def __iter__(self) -> Iterator[int]:
        idx = self.indices(self.epoch)
        while self.position < len(idx):
            i = idx[self.position]
            self.position += 1
            yield i

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "position", "seed", "num_samples_total", "num_replicas"}``."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples_total": self.n,
            "num_replicas": self.world,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores epoch and position; the next iteration continues from there.

        Raises:
            ValueError: If the dataset length, world size or seed differ from
                the checkpoint (the order would not be reproduced).
        """
        for key, mine in (
            ("num_samples_total", self.n),
            ("num_replicas", self.world),
            ("seed", self.seed),
        ):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this run has {mine}; "
                    "resuming would not reproduce the data order"
                )
        position = int(state["position"])
        if not 0 <= position <= self.per_rank:
            raise ValueError(f"sampler state position {position} not in [0, {self.per_rank}]")
        self.epoch = int(state["epoch"])
        self.position = position
