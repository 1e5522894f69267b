"""Instruction data: records -> validated -> tokenised (cached, mmapped) -> batches.

Typical use from a training loop::

    loader = build_dataloader("train.jsonl", tokenizer, DataConfig(max_length=256),
                              batch_size=4, rank=rank, world_size=world)
    for batch in loader:           # one epoch; iterate again for the next
        ...                        # batch["input_ids"|"attention_mask"|"labels"|"task_type"]
    ckpt["data"] = loader.state_dict()   # resume: loader.load_state_dict(...)
"""

from loramoe_ds.config import DataConfig
from loramoe_ds.data.collate import IGNORE_INDEX, Collator, PackedCollator, pad_id_for
from loramoe_ds.data.loader import StatefulLoader, build_dataloader
from loramoe_ds.data.packing import (
    PackedRows,
    PaddingStats,
    pack_first_fit_decreasing,
    padding_stats,
    record_lengths,
)
from loramoe_ds.data.records import DataError, DataStats, iter_records, validate_record
from loramoe_ds.data.sampler import PackedDistributedSampler, ResumableDistributedSampler
from loramoe_ds.data.tokenize import PromptFormatter, dataset_fingerprint, load_tokenized

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "DataConfig",
    "DataError",
    "DataStats",
    "PackedCollator",
    "PackedDistributedSampler",
    "PackedRows",
    "PaddingStats",
    "PromptFormatter",
    "ResumableDistributedSampler",
    "StatefulLoader",
    "build_dataloader",
    "dataset_fingerprint",
    "demo_path",
    "iter_records",
    "load_tokenized",
    "pack_first_fit_decreasing",
    "pad_id_for",
    "padding_stats",
    "record_lengths",
    "validate_record",
]


def demo_path(name: str) -> str:
    """Path of a shipped demo file, e.g. ``demo_path("train.jsonl")``."""
    from pathlib import Path

    p = Path(__file__).parent / "demo" / name
    if not p.is_file():
        raise FileNotFoundError(f"no demo data file {name!r} in {p.parent}")
    return str(p)
