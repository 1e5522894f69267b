"""Reading and validating instruction records before tokenisation.

A record is ``{instruction, input, output, task_type}`` (``input`` optional,
``task`` an optional free-form name kept for per-task evaluation), or a chat
record (OpenAI ``messages`` / ShareGPT ``conversations``, checked by
:mod:`loramoe_ds.data.chat`); ``task_type`` may come from the dataset instead. Files are
JSONL, JSON (an array of objects, or JSON lines under a ``.json`` name) or
Parquet. Every problem is reported as ``path:N: message`` where ``N`` is the
1-based line (JSONL) or record number (JSON array, Parquet), so a user can jump
to it. Nothing is dropped silently: skipped records are counted in
:class:`DataStats`.

Text files must be UTF-8; a UTF-8 byte-order mark (as Windows editors write)
is accepted. A JSON line that is not valid UTF-8 is a bad record (``path:line:
not valid UTF-8 ...``: an error, or counted and skipped with
``skip_bad_records``); in a JSON array file, which is parsed whole, it is always
an error. A UTF-16 file is rejected at once with a message saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loramoe_ds.config import DataConfig, DatasetConfig
from loramoe_ds.data.chat import ChatRecordError, detect_format, dumps_turns, normalise_turns
from loramoe_ds.data.raw import DataError, _BadRecordError

__all__ = ["REQUIRED_FIELDS", "DataError", "DataStats", "iter_records", "validate_record"]

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("instruction", "output", "task_type")
"""Fields every record must have (``input`` may be missing or empty)."""

MAX_ERROR_EXAMPLES = 20
"""How many skipped-record messages :class:`DataStats` keeps verbatim."""


@dataclass
class DataStats:
    """Counts of what the pipeline read, kept, skipped and truncated."""

    records_read: int = 0
    """Records (or lines) seen in the input files, good or bad."""

    records_kept: int = 0
    """Records that made it into the tokenised dataset."""

    bad_records: int = 0
    """Records skipped because they were invalid (``skip_bad_records=True``)."""

    bad_by_reason: dict[str, int] = field(default_factory=dict)
    """Skipped records per reason (e.g. ``"empty output"``)."""

    bad_examples: list[str] = field(default_factory=list)
    """The first :data:`MAX_ERROR_EXAMPLES` skip messages, ``path:line: ...``."""

    truncated: int = 0
    """Records whose response was cut to fit ``max_length``."""

    tokens: int = 0
    """Total tokens (prompt + response) in the kept records."""

    label_tokens: int = 0
    """Tokens that carry a loss (response + EOS)."""

    cache_hit: bool = False
    """True when the tokenised dataset was loaded from the on-disk cache."""

    per_dataset: list[dict[str, Any]] = field(default_factory=list)
    """One entry per dataset: ``name``, ``records`` kept, ``tokens``,
    ``label_tokens``, ``weight`` and ``share`` (its fraction of an epoch's
    draws: planned from the weights, realised by the sampler in a loader)."""

    def record_bad(self, err: DataError, reason: str) -> None:
        """Counts one skipped record."""
        self.bad_records += 1
        self.bad_by_reason[reason] = self.bad_by_reason.get(reason, 0) + 1
        if len(self.bad_examples) < MAX_ERROR_EXAMPLES:
            self.bad_examples.append(str(err))

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataStats:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)

    def summary(self) -> str:
        """One log line with every count (the bad reasons included)."""
        s = (
            f"read {self.records_read} records, kept {self.records_kept}, "
            f"skipped {self.bad_records} bad, truncated {self.truncated}, "
            f"{self.tokens} tokens ({self.label_tokens} labelled)"
        )
        if self.bad_by_reason:
            s += " | skipped: " + ", ".join(f"{k}={v}" for k, v in self.bad_by_reason.items())
        for d in self.per_dataset if len(self.per_dataset) > 1 else []:
            s += (
                f" | {d['name']}: {d['records']} records, {d['tokens']} tokens, "
                f"share {100 * d['share']:.1f}%"
            )
        return s

    __str__ = summary


def _task_type(tt: Any, where: str, cfg: DataConfig) -> int:
    """A record's ``task_type`` (int or name) as 0/1; raises :class:`_BadRecordError`."""
    if isinstance(tt, str):
        if tt not in cfg.task_type_names:
            raise _BadRecordError(
                f"{where}: field 'task_type' has unknown name {tt!r}; known: "
                f"{sorted(cfg.task_type_names)} (map it to 0 or 1 in data.task_type_names)",
                "unknown task_type",
            )
        return cfg.task_type_names[tt]
    if isinstance(tt, bool) or not isinstance(tt, int):
        raise _BadRecordError(
            f"{where}: field 'task_type' must be 0, 1 or a name, got {type(tt).__name__}",
            "wrong type task_type",
        )
    if tt not in (0, 1):
        raise _BadRecordError(
            f"{where}: field 'task_type' is {tt}; must be 1 (world knowledge) or 0 (downstream)",
            "unknown task_type",
        )
    return tt


def validate_record(
    raw: Any,
    where: str,
    cfg: DataConfig,
    fmt: str = "alpaca",
    default_task_type: int | str | None = None,
) -> dict[str, Any]:
    """Checks one raw record and normalises it.

    Args:
        raw: The decoded JSON object / Parquet row.
        where: ``"path:line"`` prefix for error messages.
        cfg: Supplies ``task_type_names``.
        fmt: ``alpaca``, ``messages`` or ``sharegpt`` (:mod:`loramoe_ds.data.chat`).
        default_task_type: The dataset's task type, used when the record has none.

    Returns:
        ``{instruction, input, output, messages, task_type: int, task: str}``;
        a chat record has its turns as a JSON string in ``messages`` and empty
        ``instruction``/``input``/``output``, an alpaca record ``messages=""``.

    Raises:
        DataError: Naming ``where`` and the offending field.
    """
    if not isinstance(raw, dict):
        raise _BadRecordError(
            f"{where}: record must be a JSON object, got {type(raw).__name__}", "not an object"
        )
    if raw.get("task_type") is None and default_task_type is not None:
        raw = {**raw, "task_type": default_task_type}
    if fmt in ("messages", "sharegpt"):
        try:
            turns = normalise_turns(raw, fmt, where)
        except ChatRecordError as e:
            raise _BadRecordError(str(e), e.reason) from None
        if raw.get("task_type") is None:
            raise _BadRecordError(
                f"{where}: missing field 'task_type' (give it per record or as the "
                "dataset's task_type in data.datasets)",
                "missing task_type",
            )
        task = raw.get("task", "")
        return {
            "instruction": "",
            "input": "",
            "output": "",
            "messages": dumps_turns(turns),
            "task_type": _task_type(raw["task_type"], where, cfg),
            "task": task if isinstance(task, str) else str(task),
        }
    for name in REQUIRED_FIELDS:
        if name not in raw or raw[name] is None:
            raise _BadRecordError(f"{where}: missing field '{name}'", f"missing {name}")
    for name in ("instruction", "output"):
        if not isinstance(raw[name], str):
            raise _BadRecordError(
                f"{where}: field '{name}' must be a string, got {type(raw[name]).__name__}",
                f"wrong type {name}",
            )
    inp = raw.get("input")
    if inp is None:
        inp = ""
    if not isinstance(inp, str):
        raise _BadRecordError(
            f"{where}: field 'input' must be a string, got {type(inp).__name__}",
            "wrong type input",
        )
    if not raw["instruction"].strip():
        raise _BadRecordError(f"{where}: field 'instruction' is empty", "empty instruction")
    if not raw["output"].strip():
        raise _BadRecordError(f"{where}: field 'output' is empty", "empty output")
    tt = _task_type(raw["task_type"], where, cfg)
    task = raw.get("task", "")
    return {
        "instruction": raw["instruction"],
        "input": inp,
        "output": raw["output"],
        "messages": "",
        "task_type": tt,
        "task": task if isinstance(task, str) else str(task),
    }


def iter_records(
    paths: Sequence[Any], cfg: DataConfig, stats: DataStats
) -> Iterator[dict[str, Any]]:
    """Yields validated records from ``paths`` in order, each with ``source``/``line``.

    Args:
        paths: Input files (``Path``) or resolved datasets
            (:class:`~loramoe_ds.data.sources.Source`, with their format and
            default task type); ``source`` is the index in this list.
        cfg: Pipeline config (``skip_bad_records``, ``task_type_names``, ``format``).
        stats: Updated in place (``records_read``, bad-record counts).

    Raises:
        DataError: On the first bad record unless ``cfg.skip_bad_records``.
    """
    from loramoe_ds.data.sources import Source

    for src_idx, src in enumerate(paths):
        if not isinstance(src, Source):
            path = Path(src)
            if not path.is_file():
                raise DataError(f"{path}: file not found")
            src = Source(DatasetConfig(str(path), cfg.format), "file", str(path))
        fmt = src.spec.format
        for lineno, raw in src.rows():
            stats.records_read += 1
            try:
                if isinstance(raw, _BadRecordError):
                    raise raw
                if fmt == "auto" and isinstance(raw, dict):
                    fmt = detect_format(raw)
                rec = validate_record(
                    raw, f"{src.name}:{lineno}", cfg, fmt if fmt != "auto" else "alpaca",
                    src.spec.task_type,
                )  # fmt: skip
            except _BadRecordError as e:
                if not cfg.skip_bad_records:
                    raise DataError(str(e)) from None
                stats.record_bad(e, e.reason)
                continue
            rec["source"] = src_idx
            rec["line"] = lineno
            yield rec
