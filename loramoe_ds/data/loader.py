"""One call from a data file and a tokenizer to a resumable per-rank DataLoader.

Batch format (B per-rank micro-batch, S padded length), all ``torch.long``:
``input_ids`` (B, S), ``attention_mask`` (B, S), ``labels`` (B, S) with -100 on
prompt and padding, ``task_type`` (B,) with 1 world knowledge / 0 downstream.

With ``DataConfig.packing`` each of the B sequences is a packed row of several
records (:class:`~loramoe_ds.data.collate.PackedCollator`): ``task_type`` is
then per token (B, S) and the batch adds ``position_ids`` and ``seq_ids``
(B, S); the loader's position counts rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from loramoe_ds.config import DataConfig
from loramoe_ds.data.collate import Collator, PackedCollator, pad_id_for
from loramoe_ds.data.mix import Mix
from loramoe_ds.data.packing import PackedRows, PaddingStats, padding_stats, record_lengths
from loramoe_ds.data.records import DataError, DataStats
from loramoe_ds.data.sampler import PackedDistributedSampler, ResumableDistributedSampler
from loramoe_ds.data.sources import resolve_sources
from loramoe_ds.data.tokenize import load_tokenized


class StatefulLoader:
    """A DataLoader whose state counts the batches actually consumed.

    The sampler's own position runs ahead of training when the DataLoader
    prefetches, so the checkpointable state is kept here: ``position`` is the
    number of samples (packed rows with packing) in batches already yielded to
    the caller. Iterating yields the rest of the current epoch, then moves to
    the next epoch.

    Args:
        dataset: Indexable dataset of tokenised examples.
        sampler: This rank's :class:`ResumableDistributedSampler`.
        batch_size: Per-rank micro-batch size B.
        collate_fn: Builds the batch dict.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        dataset: Any,
        sampler: ResumableDistributedSampler,
        batch_size: int,
        collate_fn: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
        num_workers: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if sampler.per_rank < batch_size:
            raise ValueError(
                f"each rank gets {sampler.per_rank} samples (or packed rows) per epoch, fewer than "
                f"batch_size={batch_size}"
            )
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.num_workers = num_workers
        self.stats: DataStats | None = None
        """Set by :func:`build_dataloader`: what the pipeline read/kept/skipped."""
        self.padding_fn: Callable[[], PaddingStats] | None = None
        """Set by :func:`build_dataloader`: computes :attr:`padding` on first use."""
        self._padding: PaddingStats | None = None
        self._position = 0

    def __len__(self) -> int:
        """Batches in the current epoch (incomplete last batch dropped: equal steps per
        rank; with packing the number of rows, hence of batches, can vary by epoch)."""
        return self.sampler.per_rank // self.batch_size

    @property
    def padding(self) -> PaddingStats | None:
        """Epoch 0's padding fraction, packed vs padded (computed on first access:
        without packing it packs the epoch once, about 4 s per million records)."""
        if self._padding is None and self.padding_fn is not None:
            self._padding = self.padding_fn()
        return self._padding

    @property
    def epoch(self) -> int:
        """The current epoch."""
        return self.sampler.epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.sampler.position = self._position
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            drop_last=True,
        )
        for batch in loader:
            self._position += self.batch_size
            yield batch
        self.sampler.set_epoch(self.sampler.epoch + 1)
        self._position = 0

    def state_dict(self) -> dict[str, Any]:
        """Sampler state with ``position`` = samples (or packed rows) in batches consumed so far
        by this rank, ``global_position`` = by all ranks (the sampler runs ahead when the
        DataLoader prefetches)."""
        return {**self.sampler.state_dict(), "position": self._position,
                "global_position": self._position * self.sampler.world}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resumes at the saved epoch and position (next ``iter`` continues there)."""
        self.sampler.load_state_dict(state)
        self._position = self.sampler.position


def _mix(paths: Any, cfg: DataConfig, stats: DataStats) -> Mix | None:
    """The weighted mix of the datasets (``None`` when no weights are set)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    weights = [s.spec.weight for s in resolve_sources(paths, cfg)]
    if not weights or any(w is None for w in weights):
        return None
    sizes = [d["records"] for d in stats.per_dataset]
    for d in stats.per_dataset:
        if not d["records"]:
            raise DataError(f"{d['name']}: no valid records, but the mix gives it a weight")
    return Mix(tuple(sizes), tuple(float(w) for w in weights))


def _realised_shares(stats: DataStats, sampler: ResumableDistributedSampler) -> None:
    """Each dataset's share of the records epoch 0 hands out over all ranks."""
    sizes = [d["records"] for d in stats.per_dataset]
    if len(sizes) < 2:
        return
    if isinstance(sampler, PackedDistributedSampler):
        rows = sampler.rows(0)[: sampler.per_rank_in(0) * sampler.world]
        used = [i for row in rows for i in row]
    else:
        used = sampler._permutation(0)[: sampler.per_rank_in(0) * sampler.world]
    which = np.searchsorted(np.cumsum(sizes), np.asarray(used, dtype=np.int64), side="right")
    counts = np.bincount(which, minlength=len(sizes))
    for d, c in zip(stats.per_dataset, counts):
        d["share"] = int(c) / max(len(used), 1)


def build_dataloader(
    paths: str | os.PathLike[str] | Sequence[Any],
    tokenizer: Any,
    cfg: DataConfig | None = None,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    is_main: bool | None = None,
    barrier: Callable[[], None] | None = None,
    flash_attn_kwargs: bool = False,
    global_batch: int | None = None,
) -> StatefulLoader:
    """Builds this rank's resumable DataLoader from data files and a tokenizer.

    Args:
        paths: The datasets (files, ``save_to_disk`` directories, Hub names), as
            for :func:`~loramoe_ds.data.load_tokenized`; weights from
            ``cfg.datasets`` make a mix (:mod:`loramoe_ds.data.mix`).
        tokenizer: Hugging Face tokenizer (chat template used when present).
        cfg: Data config; defaults to ``DataConfig()``.
        batch_size: Per-rank micro-batch size B.
        rank: Data-parallel rank.
        world_size: Data-parallel world size.
        is_main: Builds the tokenisation cache and logs (default: rank 0 of
            torch.distributed, or True without it).
        barrier: Sync point between cache build and load (default:
            ``dist.barrier`` when initialised, else a no-op).
        flash_attn_kwargs: With packing, add transformers' varlen
            flash-attention kwargs to each batch (set it when the model runs
            ``flash_attention_*``; see :class:`PackedCollator`).
        global_batch: Samples (rows with packing) per optimizer step over all
            ranks; each epoch is then whole steps and the data of every step is
            the same at any world size (:mod:`loramoe_ds.data.sampler`).

    Returns:
        A :class:`StatefulLoader` yielding dicts of LongTensors ``input_ids``
        (B, S), ``attention_mask`` (B, S), ``labels`` (B, S), ``task_type`` (B,)
        or, with ``cfg.packing``, packed rows: ``task_type``, ``position_ids``
        and ``seq_ids`` (B, S) as well. Its ``stats`` attribute holds the
        :class:`DataStats`, its ``padding`` the :class:`PaddingStats` of epoch 0
        (padding fraction packed vs padded).
    """
    cfg = cfg or DataConfig()
    ds, stats = load_tokenized(paths, tokenizer, cfg, is_main=is_main, barrier=barrier)
    ds = ds.select_columns(["input_ids", "prompt_len", "label_spans", "task_type"])
    pad_id = pad_id_for(tokenizer)
    mix = _mix(paths, cfg, stats)

    def packed_sampler() -> PackedDistributedSampler:
        return PackedDistributedSampler(
            record_lengths(ds), cfg.max_length, world_size, rank, seed=cfg.seed,
            shuffle=cfg.shuffle, global_batch=global_batch, mix=mix,
        )  # fmt: skip

    if cfg.packing:
        sampler: ResumableDistributedSampler = packed_sampler()
        dataset: Any = PackedRows(ds)
        collate: Callable[..., dict[str, Any]] = PackedCollator(
            pad_id, cfg.pad_to_multiple_of, flash_attn_kwargs=flash_attn_kwargs
        )
    else:
        sampler = ResumableDistributedSampler(
            len(ds),
            num_replicas=world_size,
            rank=rank,
            seed=cfg.seed,
            shuffle=cfg.shuffle,
            global_batch=global_batch,
            mix=mix,
        )
        dataset, collate = ds, Collator(pad_id, cfg.pad_to_multiple_of)
    loader = StatefulLoader(dataset, sampler, batch_size, collate, num_workers=cfg.num_workers)
    loader.stats = stats
    _realised_shares(stats, sampler)

    def padding() -> PaddingStats:
        packed = sampler if isinstance(sampler, PackedDistributedSampler) else packed_sampler()
        return padding_stats(
            packed.lengths,
            packed.record_order(0),
            packed.rows(0),
            world_size=world_size,
            batch_size=batch_size,
            pad_to_multiple_of=cfg.pad_to_multiple_of,
        )

    loader.padding_fn = padding
    return loader
