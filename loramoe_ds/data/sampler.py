"""A deterministic, resumable distributed sampler.

Epoch ``e`` permutes ``range(N)`` with a generator seeded ``seed + e``; rank
``r`` of ``W`` takes ``perm[r:W*M:W]`` where ``M = N // W`` (drop_last: every
rank gets exactly M indices, so all ranks run the same number of steps). The
state is ``(epoch, position)``: resuming from it replays exactly the remaining
indices an uninterrupted run would have produced on that rank.

Topology independence. Rank ``r``'s micro-batch ``k`` (B samples) holds
``perm[W*B*k + r :: W]`` up to ``W*B*(k+1)``, so the W micro-batches of one
micro-step are the contiguous block ``perm[W*B*k : W*B*(k+1)]`` and optimizer
step ``g`` (GAS micro-steps, global batch ``GB = W*B*GAS``) consumes exactly
``perm[g*GB : (g+1)*GB]``, whatever W, B and GAS are. With ``global_batch=GB``
an epoch ends after ``N // GB`` whole steps (``M = (N // GB) * GB / W``), so no
step spans two epochs and the epochs are the same at every topology with that
global batch. The position is also kept as the *global* index
``global_position = position * W`` (samples of the epoch consumed by all
ranks): a state saved at ``W1`` loads at ``W2`` when ``W2`` divides it
(always, at an optimizer-step boundary with the same global batch).

:class:`PackedDistributedSampler` does the same over *rows* of packed records:
the epoch's permutation of records is packed first-fit-decreasing into
``max_length`` rows (:mod:`loramoe_ds.data.packing`), the rows are shuffled with
the same generator, and rank ``r`` takes rows ``r::W`` (``len(rows) // W``
each). Its position counts rows; the topology independence above holds for rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from loramoe_ds.data.mix import Mix
from loramoe_ds.data.packing import PACK_WINDOW, pack_first_fit_decreasing


class ResumableDistributedSampler(Sampler):
    """Seeded per-epoch shuffle, strided across ranks, resumable mid-epoch.

    Args:
        num_samples_total: Dataset length N.
        num_replicas: World size W (data-parallel ranks).
        rank: This rank, ``0 <= rank < W``.
        seed: Base seed; epoch ``e`` shuffles with ``seed + e``.
        shuffle: If False, indices are taken in order.
        drop_last: If True, drop the ``N % W`` tail so ranks get equal counts;
            if False, pad by wrapping around (some samples seen twice).
        global_batch: Samples per optimizer step over all ranks (``W * B * GAS``);
            each epoch is then ``N // global_batch`` whole steps (module docstring).
        mix: Weighted dataset mix (:mod:`loramoe_ds.data.mix`): the epoch's
            order is then the mix's draws (N of them) instead of a permutation.
    """

    def __init__(
        self,
        num_samples_total: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        global_batch: int | None = None,
        mix: Mix | None = None,
    ) -> None:
        if mix is not None and mix.total != num_samples_total:
            raise ValueError(f"mix of {mix.total} records for a dataset of {num_samples_total}")
        self.mix = mix
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if drop_last and num_samples_total < num_replicas:
            raise ValueError(
                f"dataset has {num_samples_total} samples, fewer than {num_replicas} ranks"
            )
        if global_batch is not None and (global_batch < 1 or global_batch % num_replicas):
            raise ValueError(
                f"global_batch={global_batch}: must be a positive multiple of num_replicas="
                f"{num_replicas}"
            )
        if global_batch is not None and not drop_last:
            raise ValueError("global_batch needs drop_last=True")
        self.global_batch = global_batch
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
        """Indices each rank gets in the current epoch."""
        return self.per_rank_in(self.epoch)

    def per_rank_in(self, epoch: int) -> int:
        """Indices each rank gets in ``epoch`` (the same for every epoch here)."""
        return self._per_rank_of(self.n)

    def _per_rank_of(self, total: int) -> int:
        """Items per rank of an epoch of ``total`` items (whole global batches if set)."""
        if self.global_batch is not None:
            return total // self.global_batch * (self.global_batch // self.world)
        return total // self.world if self.drop_last else -(-total // self.world)

    def _permutation(self, epoch: int, g: torch.Generator | None = None) -> list[int]:
        """The epoch's global order of ``range(N)``."""
        if self.mix is not None:
            return self.mix.order(self.seed, epoch, self.shuffle, g)
        if not self.shuffle:
            return list(range(self.n))
        g = g or torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __len__(self) -> int:
        return self.per_rank

    def indices(self, epoch: int) -> list[int]:
        """All of this rank's indices for ``epoch``, in order."""
        perm = self._permutation(epoch)
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
        """``{"epoch", "position", "global_position", "seed", "num_samples_total",
        "num_replicas", "global_batch", "mix"}`` (``mix``: the mix's digest or None)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "global_position": self.position * self.world,
            "seed": self.seed,
            "num_samples_total": self.n,
            "num_replicas": self.world,
            "global_batch": self.global_batch,
            "mix": self.mix.digest if self.mix is not None else None,
        }

    def _identity(self) -> dict[str, Any]:
        """State entries that must match for a resume to reproduce the order."""
        return {
            "num_samples_total": self.n,
            "seed": self.seed,
            "packed": False,
            "global_batch": self.global_batch,
            "mix": self.mix.digest if self.mix is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores epoch and position; the next iteration continues from there.

        The state may come from another world size: this rank continues at
        ``global_position / W`` (module docstring).

        Raises:
            ValueError: If the dataset length, seed or global batch differ from
                the checkpoint (the order would not be reproduced), or the global
                position cannot be split evenly over this run's ranks.
        """
        for key, mine in self._identity().items():
            theirs = state.get(key, {"packed": False, "mix": None}.get(key, mine))
            if theirs != mine:
                raise ValueError(
                    f"sampler state has {key}={theirs} but this run has {mine}; "
                    "resuming would not reproduce the data order"
                )
        epoch = int(state["epoch"])
        saved_world = int(state.get("num_replicas", self.world))
        consumed = int(state.get("global_position", int(state["position"]) * saved_world))
        if consumed % self.world:
            raise ValueError(
                f"sampler state: {consumed} items of epoch {epoch} consumed by {saved_world} "
                f"ranks cannot be split evenly over {self.world} ranks; resume at a step "
                "boundary with the same global batch"
            )
        position = consumed // self.world
        per_rank = self.per_rank_in(epoch)
        if not 0 <= position <= per_rank:
            raise ValueError(f"sampler state position {position} not in [0, {per_rank}]")
        self.epoch = epoch
        self.position = position


class PackedDistributedSampler(ResumableDistributedSampler):
    """Yields rows (lists of record indices) of a packed, seeded, rank-strided epoch.

    Epoch ``e``: a generator seeded ``seed + e`` permutes the N records (the
    same permutation :class:`ResumableDistributedSampler` uses), the order is
    packed by :func:`~loramoe_ds.data.packing.pack_first_fit_decreasing` into
    rows of at most ``max_length`` tokens, and the same generator then shuffles
    the rows. Rank ``r`` of ``W`` takes ``rows[r : W*M : W]`` with
    ``M = len(rows) // W``: every rank the same number of rows; the records of
    the ``len(rows) % W`` tail rows are not seen that epoch. ``position`` counts
    this rank's rows already handed out. ``M`` can differ between epochs.

    Args:
        lengths: ``(N,)`` tokens of every record (``<= max_length``).
        max_length: Row capacity in tokens.
        num_replicas: World size W.
        rank: This rank.
        seed: Base seed.
        shuffle: If False, records are packed in index order and rows not shuffled.
        window: Records per first-fit-decreasing window.
        global_batch: Rows per optimizer step over all ranks (each epoch whole steps).
        mix: Weighted dataset mix (the records packed are then the mix's draws).
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        max_length: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        window: int = PACK_WINDOW,
        global_batch: int | None = None,
        mix: Mix | None = None,
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        super().__init__(len(self.lengths), num_replicas, rank, seed, shuffle, drop_last=True,
                         global_batch=global_batch, mix=mix)  # fmt: skip
        self.max_length = int(max_length)
        self.window = int(window)
        self._cache: tuple[int, list[list[int]]] | None = None
        self.lengths_digest = hashlib.blake2b(self.lengths.tobytes(), digest_size=8).hexdigest()
        n_rows = len(self.rows(0))
        if n_rows < num_replicas:
            raise ValueError(
                f"{self.n} records pack into {n_rows} rows of max_length={max_length}, fewer than "
                f"{num_replicas} ranks"
            )

    def rows(self, epoch: int) -> list[list[int]]:
        """Every row of ``epoch`` (all ranks), in order; cached for the last epoch asked."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = self._permutation(epoch, g)
        rows = pack_first_fit_decreasing(order, self.lengths, self.max_length, self.window)
        if self.shuffle:
            rows = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
        self._cache = (epoch, rows)
        return rows

    def record_order(self, epoch: int) -> list[int]:
        """The epoch's record permutation (what the unpacked sampler would use)."""
        return self._permutation(epoch)

    def per_rank_in(self, epoch: int) -> int:
        """Rows each rank gets in ``epoch``."""
        return self._per_rank_of(len(self.rows(epoch)))

    def indices(self, epoch: int) -> list[list[int]]:
        """This rank's rows for ``epoch``, in order."""
        rows = self.rows(epoch)
        return rows[self.rank : self.per_rank_in(epoch) * self.world : self.world]

    def state_dict(self) -> dict[str, Any]:
        """The unpacked sampler's state plus the packing's identity (position counts rows)."""
        return {**super().state_dict(), **self._identity()}

    def _identity(self) -> dict[str, Any]:
        return {
            **super()._identity(),
            "packed": True,
            "max_length": self.max_length,
            "window": self.window,
            "lengths_digest": self.lengths_digest,
        }
