"""Dataset mixes: quotas, determinism, world sizes, resume, dataset-level task types, the
dataset sources (Parquet, save_to_disk, Hub offline) and the per-dataset log."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import pytest

from loramoe_ds.data import DataConfig, DataError, build_dataloader, load_tokenized
from loramoe_ds.data.mix import Mix
from loramoe_ds.data.sampler import PackedDistributedSampler, ResumableDistributedSampler

SIZES = (7, 20, 5)
WEIGHTS = (1.0, 1.0, 2.0)


def _ref_quotas(weights, total):
    """Largest remainder with exact fractions, written as a plain loop."""
    exact = [Fraction(total) * Fraction(w).limit_denominator() / sum(
        Fraction(v).limit_denominator() for v in weights) for w in weights]  # fmt: skip
    out = [int(x) for x in exact]
    by_rest = sorted(range(len(weights)), key=lambda d: (-(exact[d] - out[d]), d))
    for d in by_rest[: total - sum(out)]:
        out[d] += 1
    return out


def _dataset(i: int) -> int:
    bound = 0
    for d, n in enumerate(SIZES):
        bound += n
        if i < bound:
            return d
    raise AssertionError(i)


def _epoch_all_ranks(world: int, epoch: int, seed: int = 0, gb: int | None = None) -> list[int]:
    """Every rank's indices of an epoch, interleaved back into global order."""
    mix = Mix(SIZES, WEIGHTS)
    parts = []
    for r in range(world):
        s = ResumableDistributedSampler(sum(SIZES), world, r, seed=seed, mix=mix, global_batch=gb)
        s.set_epoch(epoch)
        parts.append(list(s))
    return [parts[k % world][k // world] for k in range(sum(len(p) for p in parts))]


def test_quotas_follow_the_weights_every_epoch() -> None:
    N = sum(SIZES)
    want = _ref_quotas(WEIGHTS, N)
    assert want == [8, 8, 16] and Mix(SIZES, WEIGHTS).quotas == want
    for epoch in range(4):
        order = _epoch_all_ranks(1, epoch)
        counts = [0] * len(SIZES)
        for i in order:
            counts[_dataset(i)] += 1
        assert counts == want


def test_each_dataset_is_walked_as_whole_passes() -> None:
    # Dataset 1 (20 records, 8 draws an epoch) is seen without repeats until all 20
    # have been drawn; dataset 2 (5 records, 16 draws) repeats as whole passes.
    mix = Mix(SIZES, WEIGHTS)
    stream = {d: [] for d in range(3)}
    for epoch in range(5):
        for d in range(3):
            stream[d] += mix.draws(d, seed=3, epoch=epoch).tolist()
    for d, n in enumerate(SIZES):
        s = stream[d]
        for start in range(0, len(s) - n + 1, n):
            assert sorted(s[start : start + n]) == list(range(n))


def test_deterministic_per_seed() -> None:
    assert _epoch_all_ranks(1, 0, seed=5) == _epoch_all_ranks(1, 0, seed=5)
    assert _epoch_all_ranks(1, 0, seed=5) != _epoch_all_ranks(1, 0, seed=6)
    assert _epoch_all_ranks(1, 0, seed=5) != _epoch_all_ranks(1, 1, seed=5)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_world_size_sees_the_same_global_order(world: int) -> None:
    gb = 6
    ref = _epoch_all_ranks(1, 2, seed=1, gb=gb)
    assert len(ref) == sum(SIZES) // gb * gb
    assert _epoch_all_ranks(world, 2, seed=1, gb=gb) == ref


@pytest.mark.parametrize("w1,w2", [(1, 2), (2, 3), (3, 1), (2, 2)])
def test_resume_on_global_position_equals_uninterrupted(w1: int, w2: int) -> None:
    gb, mix, N = 6, Mix(SIZES, WEIGHTS), sum(SIZES)
    ref = _epoch_all_ranks(1, 0, seed=2, gb=gb)
    first = []
    states = []
    for r in range(w1):  # 2 steps of gb on w1 ranks
        s = ResumableDistributedSampler(N, w1, r, seed=2, mix=mix, global_batch=gb)
        it = iter(s)
        first.append([next(it) for _ in range(2 * gb // w1)])
        states.append(s.state_dict())
    rest = []
    for r in range(w2):
        s = ResumableDistributedSampler(N, w2, r, seed=2, mix=mix, global_batch=gb)
        s.load_state_dict(states[0])
        rest.append(list(s))
    got = [first[k % w1][k // w1] for k in range(2 * gb)]
    got += [rest[k % w2][k // w2] for k in range(sum(len(p) for p in rest))]
    assert got == ref
    other = ResumableDistributedSampler(N, w2, 0, seed=2, mix=Mix(SIZES, (1.0, 2.0, 2.0)),
                                        global_batch=gb)  # fmt: skip
    with pytest.raises(ValueError, match="mix="):
        other.load_state_dict(states[0])


def test_packed_mix_rows_hold_the_epoch_draws() -> None:
    mix = Mix(SIZES, WEIGHTS)
    lengths = [3 + i % 5 for i in range(sum(SIZES))]
    s = PackedDistributedSampler(lengths, 16, 1, 0, seed=4, mix=mix)
    rows = s.rows(0)
    assert sorted(i for row in rows for i in row) == sorted(mix.order(4, 0))
    assert all(sum(lengths[i] for i in row) <= 16 for row in rows)


# ------------------------------------------------------------------- end to end
TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def _files(tmp_path: Path) -> dict[str, Path]:
    m = tmp_path / "chat.jsonl"
    m.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"}, *TURNS[1:]]}) + "\n"
        for i in range(6)
    ))  # fmt: skip
    s = tmp_path / "share.json"
    s.write_text(json.dumps([{"conversations": [
        {"from": "human", "value": f"Sum {i} and 1."}, {"from": "gpt", "value": f"{i + 1}"}
    ]} for i in range(10)]))  # fmt: skip
    a = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": f"Repeat {i}.", "output": f"{i}", "task_type": 1} for i in range(4)]
    a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"chat": m, "share": s, "alpaca": a}


@pytest.fixture(scope="module")
def tok():
    from loramoe_ds.tiny import tiny_sp_tokenizer as tiny_tokenizer

    return tiny_tokenizer(chat=True)


def test_mix_of_three_formats_with_dataset_task_types(tmp_path, tok) -> None:
    f = _files(tmp_path)
    cfg = DataConfig(
        max_length=128,
        cache_dir=str(tmp_path / "c"),
        datasets=[
            {"path": str(f["chat"]), "task_type": "knowledge", "weight": 1},
            {"path": str(f["share"]), "format": "sharegpt", "task_type": 0, "weight": 2},
            {"path": str(f["alpaca"]), "task_type": 0, "weight": 1},  # records carry 1
        ],
    )
    assert cfg.train_files == [str(p) for p in f.values()]
    world = 2
    loaders = [
        build_dataloader(cfg.train_files, tok, cfg, batch_size=2, rank=r, world_size=world)
        for r in range(world)
    ]
    ds, _ = load_tokenized(cfg.train_files, tok, cfg)
    assert ds["source"] == [0] * 6 + [1] * 10 + [2] * 4
    assert ds["task_type"] == [1] * 6 + [0] * 10 + [1] * 4  # the record's own type wins
    by_ids = {tuple(r["input_ids"]): r["source"] for r in ds}
    counts = [0, 0, 0]
    for loader in loaders:
        for batch in loader:
            for b in range(batch["input_ids"].shape[0]):
                ids = batch["input_ids"][b][batch["attention_mask"][b] == 1].tolist()
                src = by_ids[tuple(ids)]
                counts[src] += 1
                assert int(batch["task_type"][b]) == [1, 0, 1][src]
    assert counts == _ref_quotas([1, 2, 1], 20)  # whole epoch over both ranks: 5, 10, 5
    stats = loaders[0].stats
    assert [d["records"] for d in stats.per_dataset] == [6, 10, 4]
    assert [d["share"] for d in stats.per_dataset] == [0.25, 0.5, 0.25]
    line = str(stats)
    assert "chat.jsonl: 6 records" in line and "share 50.0%" in line and "\n" not in line


def test_parquet_and_save_to_disk_sources(tmp_path, tok) -> None:
    import datasets

    rows = [{"instruction": f"Repeat {i}.", "output": f"{i}"} for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    cfg = DataConfig(max_length=64, cache_dir=str(tmp_path / "c"), datasets=[
        {"path": str(tmp_path / "saved"), "task_type": 1},
        {"path": str(tmp_path / "d.parquet"), "task_type": 0},
    ])  # fmt: skip
    ds, stats = load_tokenized(cfg.train_files, tok, cfg)
    assert ds["task_type"] == [1, 1, 1, 0, 0, 0] and ds["line"] == [1, 2, 3, 1, 2, 3]
    assert ds["input_ids"][:3] == ds["input_ids"][3:]
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match="not a saved dataset"):
        load_tokenized([str(tmp_path / "plain_dir")], tok, cfg.__class__(max_length=64))


def test_hub_name_offline_is_one_line(tmp_path, tok, monkeypatch) -> None:
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    hub = [{"path": "no-such-org/no-such-dataset", "task_type": 1}]
    cfg = DataConfig(max_length=64, cache_dir=str(tmp_path / "c"), datasets=hub)
    with pytest.raises(DataError) as e:
        load_tokenized(cfg.train_files, tok, cfg)
    msg = str(e.value)
    assert msg.startswith("no-such-org/no-such-dataset: ") and "Hub" in msg and "\n" not in msg


def test_record_without_task_type_needs_a_dataset_one(tmp_path, tok) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    with pytest.raises(DataError, match=r"a\.jsonl:1: missing field 'task_type'"):
        load_tokenized(p, tok, DataConfig(max_length=64, cache_dir=str(tmp_path / "c")))
    cfg = DataConfig(max_length=64, cache_dir=str(tmp_path / "c"),
                     datasets=[{"path": str(p), "task_type": "downstream"}])  # fmt: skip
    ds, _ = load_tokenized(cfg.train_files, tok, cfg)
    assert ds["task_type"] == [0]


def test_run_config_reads_a_mix_from_yaml_values() -> None:
    from loramoe_ds.config import RunConfig

    a = {"path": "a.jsonl", "weight": "2", "task_type": "knowledge"}
    b = {"path": "b.parquet", "weight": 1, "format": "sharegpt"}
    d = {"data": {"datasets": [a, b]}}
    run = RunConfig.from_dict(d)
    assert run.data.train_files == ["a.jsonl", "b.parquet"]
    assert [(s.weight, s.format) for s in run.data.datasets] == [(2.0, "auto"), (1.0, "sharegpt")]
    for bad, phrase in [
        ({"path": "a.jsonl", "weight": -1}, "data.datasets[0].weight=-1.0: must be a number > 0"),
        ({"path": "a.jsonl", "format": "csv"}, "data.datasets[0].format='csv': valid values"),
        ({"path": "a.jsonl", "task_type": 2}, "data.datasets[0].task_type=2: must be 0, 1"),
    ]:
        with pytest.raises(ValueError, match=re.escape(phrase)):
            RunConfig.from_dict({"data": {"datasets": [bad]}})
    with pytest.raises(ValueError, match="weight to every dataset or none"):
        DataConfig(datasets=[{"path": "a", "weight": 1}, {"path": "b"}])
    with pytest.raises(ValueError, match="either train_files or datasets"):
        DataConfig(train_files=["x.jsonl"], datasets=[{"path": "a"}])
    with pytest.raises(ValueError, match=r"data\.loss_on='first': valid values"):
        DataConfig(loss_on="first")
