"""Sequence packing: several tokenised records per ``max_length`` row.

Shape legend: N records, R rows, W records per packing window.

:func:`pack_first_fit_decreasing` turns an ordered list of records into rows:
the order is cut into consecutive windows of ``window`` records; inside each
window the records are sorted by length, longest first (ties keep their order),
and each goes into the first (lowest-numbered) row of that window with room
for it, a new row being opened when none has. A row never exceeds ``max_length``
tokens and a window's rows are closed before the next window starts, so the
result depends only on the order and the lengths: given the sampler's seeded
per-epoch order, an epoch is a fixed list of rows (no record lost or
duplicated). The window bounds the work (``O(N * R_window)`` vectorised) and
keeps the epoch's record order at a coarse scale.

:class:`PackedRows` makes an indexable dataset return a row (a list of
examples) for a list of indices; :class:`~loramoe_ds.data.collate.PackedCollator`
turns rows into a batch. :func:`padding_stats` compares the padding of packed
and padded batching of one epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

PACK_WINDOW = 1024
"""Default records per first-fit-decreasing window."""


def pack_first_fit_decreasing(
    order: Sequence[int],
    lengths: Sequence[int] | np.ndarray,
    max_length: int,
    window: int = PACK_WINDOW,
) -> list[list[int]]:
    """Packs records into rows of at most ``max_length`` tokens.

    Args:
        order: Record indices in epoch order (an index may repeat: weighted mixes).
        lengths: ``lengths[i]`` = tokens of record ``i`` (``1 <= length <= max_length``).
        max_length: Row capacity in tokens.
        window: Records per first-fit-decreasing window (``>= 1``); 1 gives one
            record per row, ``len(order)`` a global first-fit-decreasing.

    Returns:
        Rows in window order, each a list of record indices (longest first
        within the row); the rows of a window in the order they were opened.

    Raises:
        ValueError: If a length is outside ``[1, max_length]`` or ``window < 1``.
    """
    if window < 1:
        raise ValueError(f"packing window must be >= 1, got {window}")
    order_N = np.asarray(order, dtype=np.int64)
    len_all = np.asarray(lengths, dtype=np.int64)
    if order_N.size == 0:
        return []
    len_N = len_all[order_N]
    bad = (len_N < 1) | (len_N > max_length)
    if bad.any():
        j = int(bad.argmax())
        raise ValueError(
            f"record {int(order_N[j])} has {int(len_N[j])} tokens; packing needs "
            f"1 <= length <= max_length={max_length}"
        )
    rows: list[list[int]] = []
    for start in range(0, order_N.size, window):
        ids_W = order_N[start : start + window]
        len_W = len_N[start : start + window]
        by_len = np.argsort(-len_W, kind="stable")
        free_W = np.empty(ids_W.size, dtype=np.int64)  # room left in each open row
        win_rows: list[list[int]] = []
        for j in by_len:
            n = len_W[j]
            fits = free_W[: len(win_rows)] >= n
            r = int(fits.argmax()) if len(win_rows) and fits.any() else -1
            if r < 0:
                r = len(win_rows)
                win_rows.append([])
                free_W[r] = max_length
            win_rows[r].append(int(ids_W[j]))
            free_W[r] -= n
        rows.extend(win_rows)
    return rows


def record_lengths(dataset: Any) -> np.ndarray:
    """Token count of every record, ``(N,)`` int64, without loading the token ids.

    A ``datasets.Dataset`` is read column-wise from Arrow (list lengths only);
    any other indexable dataset through ``len(dataset[i]["input_ids"])``.
    """
    try:
        import datasets
    except ImportError:  # pragma: no cover
        datasets = None
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        import pyarrow.compute as pc

        parts = [
            pc.list_value_length(batch["input_ids"]).to_numpy(zero_copy_only=False)
            for batch in dataset.select_columns(["input_ids"])
            .with_format("arrow")
            .iter(batch_size=1 << 16)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return np.asarray([len(dataset[i]["input_ids"]) for i in range(len(dataset))], np.int64)


class PackedRows:
    """Indexable view of a dataset whose items are rows: ``view[[i, j, k]]`` = 3 examples.

    Used with :class:`~loramoe_ds.data.sampler.PackedDistributedSampler`, whose
    items are lists of record indices. No ``__getitems__`` on purpose: the
    DataLoader must fetch row by row.

    Args:
        dataset: Indexable dataset of tokenised examples.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: Sequence[int]) -> list[dict[str, Any]]:
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems is not None:
            return list(getitems(list(row)))
        return [self.dataset[i] for i in row]


@dataclass
class PaddingStats:
    """Padding of one epoch's batches, packed vs padded (every rank's batches together).

    A batch of B sequences padded to its longest (S) holds ``B * S`` positions;
    the padding fraction is ``1 - tokens / positions`` over the epoch's batches.
    """

    records: int
    """Records in the epoch's batches of the padded layout."""
    tokens: int
    """Tokens of those records."""
    padded_positions: int
    """``sum B*S`` of the padded (one record per sequence) batches."""
    packed_rows: int
    """Rows of the packed epoch (before dropping the tail not divisible by ranks)."""
    packed_records: int
    """Records in the packed epoch's batches."""
    packed_tokens: int
    """Tokens of those records."""
    packed_positions: int
    """``sum B*S`` of the packed batches."""

    @property
    def padded_fraction(self) -> float:
        """Padding fraction of the padded layout."""
        return 1.0 - self.tokens / max(self.padded_positions, 1)

    @property
    def packed_fraction(self) -> float:
        """Padding fraction of the packed layout."""
        return 1.0 - self.packed_tokens / max(self.packed_positions, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy, the two fractions included."""
        return {
            **asdict(self),
            "padded_fraction": self.padded_fraction,
            "packed_fraction": self.packed_fraction,
        }

    def summary(self) -> str:
        """One log line."""
        return (
            f"padding {100 * self.padded_fraction:.1f}% padded "
            f"({self.records} records in {self.padded_positions} positions) vs "
            f"{100 * self.packed_fraction:.1f}% packed ({self.packed_records} records in "
            f"{self.packed_rows} rows, {self.packed_positions} positions)"
        )


def _batched_positions(seq_lens: np.ndarray, per_rank: int, world: int, batch: int, m: int | None):
    """``(sum B*S, sum tokens)`` of rank-strided, drop-last batches of ``seq_lens``."""
    positions = tokens = 0
    n_b = per_rank // batch
    for r in range(world):
        mine = seq_lens[r : per_rank * world : world][: n_b * batch].reshape(n_b, batch)
        if mine.size == 0:
            continue
        S_b = mine.max(axis=1)
        if m:
            S_b = (S_b + m - 1) // m * m
        positions += int(S_b.sum()) * batch
        tokens += int(mine.sum())
    return positions, tokens


def padding_stats(
    lengths: np.ndarray,
    order: Sequence[int],
    rows: list[list[int]],
    *,
    world_size: int,
    batch_size: int,
    pad_to_multiple_of: int | None = None,
) -> PaddingStats:
    """Padding of one epoch laid out padded (``order``) and packed (``rows``).

    Both layouts are split over ``world_size`` ranks by striding and batched by
    ``batch_size`` with the tails dropped, as the loader does; each batch is
    padded to its longest sequence (rounded up to ``pad_to_multiple_of``).

    Args:
        lengths: ``(N,)`` tokens per record.
        order: The epoch's record order (padded layout).
        rows: The epoch's rows (packed layout), each a list of record indices.
        world_size: Data-parallel ranks W.
        batch_size: Per-rank micro-batch size B.
        pad_to_multiple_of: Sequence-length rounding, or None.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    W, B = world_size, batch_size
    seq_N = lengths[np.asarray(order, dtype=np.int64)]
    pos, tok = _batched_positions(seq_N, len(order) // W, W, B, pad_to_multiple_of)
    n_rec = (len(order) // W // B) * B * W
    row_len_R = np.asarray([int(lengths[r].sum()) for r in rows], dtype=np.int64)
    row_n_R = np.asarray([len(r) for r in rows], dtype=np.int64)
    per_rank = len(rows) // W
    ppos, ptok = _batched_positions(row_len_R, per_rank, W, B, pad_to_multiple_of)
    _, prec = _batched_positions(row_n_R, per_rank, W, B, None)
    return PaddingStats(
        records=n_rec,
        tokens=tok,
        padded_positions=pos,
        packed_rows=len(rows),
        packed_records=prec,
        packed_tokens=ptok,
        packed_positions=ppos,
    )
