"""Data files that are not plain UTF-8: bad bytes reported at file:line, a BOM accepted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loramoe_ds.data import DataConfig, DataError
from loramoe_ds.data.records import DataStats, iter_records

GOOD = [
    {"instruction": "Name the capital of France.", "output": "Paris", "task_type": 1},
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5", "task_type": 0},
    {"instruction": "Translate to French: café", "output": "café", "task_type": "downstream"},
]
BOM = b"\xef\xbb\xbf"


def _lines(rows) -> list[bytes]:
    return [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in rows]


def _read(path: Path, skip: bool) -> tuple[list[dict], DataStats]:
    stats = DataStats()
    cfg = DataConfig(skip_bad_records=skip)
    return list(iter_records([path], cfg, stats)), stats


def _latin1_line() -> bytes:
    """A record whose 'é' was saved as Latin-1 (0xe9), the usual non-UTF-8 file."""
    rec = {"instruction": "Spell café.", "output": "café", "task_type": 0}
    return json.dumps(rec, ensure_ascii=False).encode("latin-1")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_bom_is_accepted(tmp_path: Path, suffix: str) -> None:
    p = tmp_path / f"bom{suffix}"
    p.write_bytes(BOM + b"\n".join(_lines(GOOD)) + b"\n")
    for skip in (False, True):
        recs, stats = _read(p, skip)
        assert [r["output"] for r in recs] == [g["output"] for g in GOOD]
        assert [r["line"] for r in recs] == [1, 2, 3]
        assert stats.bad_records == 0 and stats.records_read == 3


def test_bom_json_array(tmp_path: Path) -> None:
    p = tmp_path / "arr.json"
    p.write_bytes(BOM + json.dumps(GOOD, ensure_ascii=False, indent=1).encode("utf-8"))
    recs, _ = _read(p, False)
    assert [r["instruction"] for r in recs] == [g["instruction"] for g in GOOD]


def test_non_utf8_line_is_reported_at_file_line(tmp_path: Path) -> None:
    p = tmp_path / "mixed.jsonl"
    lines = _lines(GOOD)
    lines.insert(2, _latin1_line())  # line 3
    p.write_bytes(b"\n".join(lines) + b"\n")
    col = _latin1_line().index(b"\xe9") + 1  # ASCII before the bad byte: byte == column
    with pytest.raises(DataError) as e:
        _read(p, False)
    msg = str(e.value)
    assert msg.startswith(f"{p}:3: not valid UTF-8 (byte 0xe9 at column {col})")
    assert "\n" not in msg and "save the file as UTF-8" in msg


def test_non_utf8_line_skipped_and_counted(tmp_path: Path) -> None:
    p = tmp_path / "mixed.jsonl"
    lines = _lines(GOOD)
    lines.insert(1, _latin1_line())  # line 2
    p.write_bytes(b"\n".join(lines) + b"\n")
    recs, stats = _read(p, True)
    assert [r["line"] for r in recs] == [1, 3, 4]  # the others kept, numbered as in the file
    assert stats.records_read == 4 and stats.bad_records == 1
    assert stats.bad_by_reason == {"not utf-8": 1}
    assert stats.bad_examples[0].startswith(f"{p}:2: not valid UTF-8")


def test_non_utf8_in_json_array_names_the_line(tmp_path: Path) -> None:
    """A JSON array is parsed whole: an error even with skip_bad_records, at the right line."""
    p = tmp_path / "arr.json"
    body = b"[\n" + b",\n".join(_lines(GOOD[:2]) + [_latin1_line()]) + b"\n]\n"
    p.write_bytes(body)
    for skip in (False, True):
        with pytest.raises(DataError, match=rf"^{p}:4: not valid UTF-8 \(byte 0xe9"):
            _read(p, skip)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_utf16_file_is_named(tmp_path: Path, encoding: str) -> None:
    p = tmp_path / "wide.jsonl"
    text = "\n".join(json.dumps(r) for r in GOOD) + "\n"
    data = text.encode(encoding)
    if not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        data = b"\xfe\xff" + data  # utf-16-be writes no BOM; editors do
    p.write_bytes(data)
    with pytest.raises(DataError, match=r"the file is UTF-16 .*save it as UTF-8"):
        _read(p, True)
