"""Data pipeline: parsing, validation errors, label masking, collation, caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loramoe_ds.data import (
    IGNORE_INDEX,
    Collator,
    DataConfig,
    DataError,
    build_dataloader,
    load_tokenized,
)
from loramoe_ds.data import tokenize as tokenize_mod
from loramoe_ds.tiny import tiny_sp_tokenizer as tiny_tokenizer

RECORDS = [
    {"instruction": "What is the capital of France?", "output": "Paris", "task_type": 1},
    {"instruction": "Compute the sum.", "input": "347 + 128", "output": "475", "task_type": 0},
    {
        "instruction": "Reverse the order of the list.",
        "input": "",
        "output": "fig, pear, apple",
        "task_type": "downstream",
    },
    {
        "instruction": "Who wrote Hamlet?",
        "input": None,
        "output": "William Shakespeare",
        "task_type": "world_knowledge",
    },
]
EXPECTED_TASK_TYPES = [1, 0, 0, 1]


def _write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    for idx, text in (raw_lines or {}).items():
        lines.insert(idx, text)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def cfg(tmp_path: Path) -> DataConfig:
    return DataConfig(max_length=64, cache_dir=str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return tiny_tokenizer(chat=True)


def _collate_all(ds, tok) -> dict[str, torch.Tensor]:
    return Collator(tok.pad_token_id)([ds[i] for i in range(len(ds))])


# ----------------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", ["jsonl", "json", "json_lines", "parquet"])
def test_parses_each_format(tmp_path: Path, cfg: DataConfig, tok, fmt: str) -> None:
    if fmt == "jsonl":
        path = _write_jsonl(tmp_path / "d.jsonl", RECORDS)
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(RECORDS, indent=2))
    elif fmt == "json_lines":
        path = _write_jsonl(tmp_path / "d.json", RECORDS)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        names = {1: "knowledge", 0: "downstream"}  # a Parquet column has one type
        rows = [{**r, "task_type": names.get(r["task_type"], r["task_type"])} for r in RECORDS]
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    ds, stats = load_tokenized(path, tok, cfg)
    assert len(ds) == len(RECORDS) == stats.records_kept == stats.records_read
    assert ds["task_type"] == EXPECTED_TASK_TYPES
    assert ds["line"] == [1, 2, 3, 4]
    batch = _collate_all(ds, tok)
    for i, rec in enumerate(RECORDS):
        lab = batch["labels"][i]
        assert tok.decode(lab[lab != IGNORE_INDEX]) == rec["output"] + tok.eos_token


def test_multiple_files_concatenate(tmp_path: Path, cfg: DataConfig, tok) -> None:
    a = _write_jsonl(tmp_path / "a.jsonl", RECORDS[:2])
    b = _write_jsonl(tmp_path / "b.jsonl", RECORDS[2:])
    ds, stats = load_tokenized([a, b], tok, cfg)
    assert ds["source"] == [0, 0, 1, 1] and ds["line"] == [1, 2, 1, 2]
    assert ds["task_type"] == EXPECTED_TASK_TYPES


# ------------------------------------------------------------------------ label masking
@pytest.mark.parametrize("chat", [False, True])
def test_labels_only_on_response_and_eos(tmp_path: Path, cfg: DataConfig, chat: bool) -> None:
    tok = tiny_tokenizer(chat=chat)
    path = _write_jsonl(tmp_path / "d.jsonl", RECORDS)
    ds, _ = load_tokenized(path, tok, cfg)
    batch = _collate_all(ds, tok)
    ids_BS, mask_BS, labels_BS = batch["input_ids"], batch["attention_mask"], batch["labels"]
    for i, rec in enumerate(RECORDS):
        L, P = len(ds[i]["input_ids"]), ds[i]["prompt_len"]
        labelled_S = labels_BS[i] != IGNORE_INDEX
        # Exactly the positions [P, L) are labelled, and they equal the inputs there.
        assert labelled_S.nonzero().squeeze(1).tolist() == list(range(P, L))
        assert torch.equal(labels_BS[i, P:L], ids_BS[i, P:L])
        assert tok.decode(labels_BS[i, labelled_S]) == rec["output"] + tok.eos_token
        assert mask_BS[i].sum().item() == L
        # The prompt holds the instruction and the input (if any), in the template.
        prompt = tok.decode(ids_BS[i, :P])
        assert rec["instruction"] in prompt
        if rec.get("input"):
            assert rec["input"] in prompt
        if chat:
            assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>\n")
        else:
            assert prompt.startswith(tok.bos_token) and "### Response:" in prompt


def test_collator_shapes_padding_and_multiple_of_8(tok) -> None:
    examples = [
        {"input_ids": [5, 6, 7, 8, 9], "prompt_len": 3, "task_type": 1},
        {"input_ids": [5, 6, 7], "prompt_len": 1, "task_type": 0},
    ]
    b = Collator(pad_token_id=3)(examples)
    assert {k: tuple(v.shape) for k, v in b.items()} == {
        "input_ids": (2, 5),
        "attention_mask": (2, 5),
        "labels": (2, 5),
        "task_type": (2,),
    }
    assert all(v.dtype == torch.long for v in b.values())
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 3, 3]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 6, 7, -100, -100]]
    assert b["task_type"].tolist() == [1, 0]
    b8 = Collator(pad_token_id=3, pad_to_multiple_of=8)(examples)
    assert b8["input_ids"].shape == (2, 8)
    assert (b8["labels"][:, 5:] == IGNORE_INDEX).all()


def test_truncation_is_counted(tmp_path: Path, tok) -> None:
    long_out = " ".join(["apple pear fig plum"] * 20)
    rows = [*RECORDS, {"instruction": "List fruit.", "output": long_out, "task_type": 0}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(max_length=60, cache_dir=str(tmp_path / "c"))
    ds, stats = load_tokenized(path, tok, cfg)
    assert stats.truncated == 1 and stats.records_kept == len(rows)
    assert len(ds[len(rows) - 1]["input_ids"]) == 60
    assert max(len(x) for x in ds["input_ids"]) == 60


# -------------------------------------------------------------------------- bad records
GOOD = {"instruction": "Say hi.", "output": "hi", "task_type": 0}
BAD_CASES = {
    "malformed_json": ('{"instruction": "x", "output": ', "malformed JSON", None),
    "missing_field": ({"instruction": "x", "task_type": 0}, "missing field 'output'", "output"),
    "wrong_type": (
        {"instruction": "x", "output": 42, "task_type": 0},
        "field 'output' must be a string",
        "output",
    ),
    "unknown_task_type_name": (
        {"instruction": "x", "output": "y", "task_type": "poetry"},
        "field 'task_type' has unknown name 'poetry'",
        "task_type",
    ),
    "unknown_task_type_int": (
        {"instruction": "x", "output": "y", "task_type": 7},
        "field 'task_type' is 7",
        "task_type",
    ),
    "empty_output": (
        {"instruction": "x", "output": "  ", "task_type": 0},
        "field 'output' is empty",
        "output",
    ),
    "prompt_too_long": (
        {"instruction": "apple pear " * 60, "output": "y", "task_type": 0},
        "max_length=64 leaves no room",
        "instruction",
    ),
}


def _bad_file(tmp_path: Path, case: str) -> Path:
    bad, _, _ = BAD_CASES[case]
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(GOOD)] * 16 + [bad if isinstance(bad, str) else json.dumps(bad)]
    lines += [json.dumps(GOOD)] * 3
    path.write_text("\n".join(lines) + "\n")
    return path  # the bad record is on line 17


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_raises_with_file_line_field(
    tmp_path: Path, cfg: DataConfig, tok, case: str
) -> None:
    path = _bad_file(tmp_path, case)
    _, text, field = BAD_CASES[case]
    with pytest.raises(DataError) as exc:
        load_tokenized(path, tok, cfg)
    msg = str(exc.value)
    assert msg.startswith(f"{path.resolve()}:17: "), msg
    assert text in msg
    if field:
        assert f"'{field}'" in msg
    assert not list(Path(cfg.cache_dir).glob("*/stats.json"))  # nothing half-cached


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_skip_mode_counts_bad_records(tmp_path: Path, tok, case: str, caplog) -> None:
    path = _bad_file(tmp_path, case)
    cfg = DataConfig(max_length=64, cache_dir=str(tmp_path / "c"), skip_bad_records=True)
    with caplog.at_level("WARNING"):
        ds, stats = load_tokenized(path, tok, cfg)
    assert len(ds) == stats.records_kept == 19
    assert stats.records_read == 20 and stats.bad_records == 1
    assert sum(stats.bad_by_reason.values()) == 1
    assert stats.bad_examples[0].startswith(f"{path.resolve()}:17: ")
    assert ":17: " in caplog.text  # reported in the log, not dropped silently


def test_json_array_errors_name_record(tmp_path: Path, cfg: DataConfig, tok) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, GOOD, {"instruction": "x", "task_type": 0}]))
    with pytest.raises(DataError, match=r"d\.json:3: missing field 'output'"):
        load_tokenized(path, tok, cfg)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="template"):
        DataConfig(template="alpaca")
    with pytest.raises(ValueError, match="max_length"):
        DataConfig(max_length=1)
    with pytest.raises(ValueError, match="task_type_names"):
        DataConfig(task_type_names={"x": 2})
    cfg = DataConfig(task_type_names={"qa": 1, "tool": 0, "knowledge": 0})
    # merged over the defaults; an entry given wins
    assert cfg.task_type_names == {"world_knowledge": 1, "knowledge": 0, "downstream": 0,
                                   "qa": 1, "tool": 0}  # fmt: skip


def test_run_config_data_section_is_data_config() -> None:
    """One type, one name per field: the run's ``data:`` section is the pipeline's DataConfig."""
    from loramoe_ds.config import RunConfig

    run = RunConfig.from_dict({"data": {"max_length": 64, "packing": True, "template": "plain"}})
    assert type(run.data) is DataConfig
    assert (run.data.max_length, run.data.packing, run.data.template) == (64, True, "plain")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['max_len'\]"):
        RunConfig.from_dict({"data": {"max_len": 64}})


# ------------------------------------------------------------------------------- cache
@pytest.fixture
def tokenize_calls(monkeypatch) -> list[int]:
    """One entry per batch tokenised in this process (wraps the ``Dataset.map`` function)."""
    calls: list[int] = []
    real = tokenize_mod._Tokenize.__call__

    def counting(self, batch):
        calls.append(1)
        return real(self, batch)

    monkeypatch.setattr(tokenize_mod._Tokenize, "__call__", counting)
    return calls


def test_second_call_reuses_cache_without_tokenising(
    tmp_path: Path, cfg: DataConfig, tok, tokenize_calls: list[int]
) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", RECORDS)
    ds1, s1 = load_tokenized(path, tok, cfg)
    assert len(tokenize_calls) > 0 and not s1.cache_hit
    calls1 = len(tokenize_calls)
    ds2, s2 = load_tokenized(path, tok, cfg)
    assert len(tokenize_calls) == calls1 and s2.cache_hit
    assert ds2["input_ids"] == ds1["input_ids"]
    # Memory-mapped from the cache directory, not an in-memory copy.
    assert all(f["filename"].startswith(cfg.cache_dir) for f in ds2.cache_files)
    # A different max_length, tokenizer template or file content is a different cache entry.
    _, s3 = load_tokenized(path, tok, DataConfig(max_length=48, cache_dir=cfg.cache_dir))
    _, s4 = load_tokenized(path, tiny_tokenizer(chat=True), cfg)
    _write_jsonl(path, RECORDS[:3])
    ds5, s5 = load_tokenized(path, tok, cfg)
    assert not (s3.cache_hit or s4.cache_hit or s5.cache_hit) and len(ds5) == 3


def test_main_builds_then_others_load(
    tmp_path: Path, cfg: DataConfig, tok, tokenize_calls: list[int]
) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", RECORDS)
    events: list[str] = []
    # A non-main rank whose barrier runs before anyone built the cache fails clearly.
    with pytest.raises(DataError, match="missing after the barrier"):
        load_tokenized(path, tok, cfg, is_main=False, barrier=lambda: events.append("b"))
    calls = len(tokenize_calls)
    load_tokenized(path, tok, cfg, is_main=True, barrier=lambda: events.append("main"))
    ds, stats = load_tokenized(path, tok, cfg, is_main=False, barrier=lambda: None)
    assert events == ["b", "main"] and stats.cache_hit and len(ds) == 4
    assert len(tokenize_calls) == calls + 1  # one batch, tokenised by main only


def test_build_dataloader_batches(tmp_path: Path, cfg: DataConfig, tok) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", RECORDS * 5)  # 20 records
    loader = build_dataloader(path, tok, cfg, batch_size=3, rank=1, world_size=2)
    assert len(loader) == 3  # 10 per rank -> 3 full batches
    batches = list(loader)
    assert len(batches) == 3
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "labels", "task_type"}
        assert b["input_ids"].shape[0] == 3 and b["task_type"].shape == (3,)
    assert loader.epoch == 1 and loader.stats.records_kept == 20
