"""Raw rows of a data file: JSONL, JSON (array or lines) and Parquet, with line numbers.

Text files must be UTF-8 (a UTF-8 byte-order mark is accepted); a UTF-16 file
is rejected at once, and a JSON line that is not valid UTF-8 or not valid JSON
is yielded as a :class:`_BadRecordError` so the caller can report or count it
at its line (:mod:`loramoe_ds.data.records`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A bad record or file; the message starts with ``path:line:``."""


class _BadRecordError(DataError):
    """Internal: a :class:`DataError` tagged with a short reason for counting."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _not_utf8(path: Path, lineno: int, line: bytes, pos: int) -> str:
    """``path:line: not valid UTF-8 (byte 0x.. at column C) ...``; ``pos``: byte offset in line."""
    col = len(line[:pos].decode("utf-8", errors="replace")) + 1
    return (
        f"{path}:{lineno}: not valid UTF-8 (byte 0x{line[pos]:02x} at column {col}); "
        "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )


def _check_not_utf16(path: Path, head: bytes) -> None:
    if head.startswith(_UTF16_BOMS):
        raise DataError(
            f"{path}:1: the file is UTF-16 (byte-order mark 0x{head[:2].hex()}); save it as UTF-8"
        )


def _iter_raw(path: Path) -> Iterator[tuple[int, Any]]:
    """Yields ``(line_or_record_number, raw_object)``; raises on malformed JSON.

    A malformed JSONL line is yielded as a :class:`_BadRecordError` instance so the
    caller can count it and go on.
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=8192):
            for row in batch.to_pylist():
                n += 1
                yield n, row
        return
    if suffix not in (".json", ".jsonl", ".ndjson"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    with path.open("rb") as f:
        head = f.read(4096)
    _check_not_utf16(path, head)
    if suffix == ".json" and head.removeprefix(_UTF8_BOM).lstrip().startswith(b"["):
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            lineno = data.count(b"\n", 0, e.start) + 1
            start = data.rfind(b"\n", 0, e.start) + 1
            raise DataError(_not_utf8(path, lineno, data[start:], e.start - start)) from None
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from e
        for i, row in enumerate(rows, start=1):
            yield i, row
        return
    # JSON lines (also a .json file that is not one array). Bytes are decoded per
    # line so that a bad byte is reported (or skipped) at its line.
    with path.open("rb") as f:
        for lineno, raw_line in enumerate(f, start=1):
            try:
                line = raw_line.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                msg = _not_utf8(path, lineno, raw_line, e.start)
                yield lineno, _BadRecordError(msg, "not utf-8")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield (
                    lineno,
                    _BadRecordError(f"{path}:{lineno}: malformed JSON: {e.msg}", "bad json"),
                )
