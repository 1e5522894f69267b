"""Resumable distributed sampler and the stateful loader built on it."""

from __future__ import annotations

import pytest
import torch

from loramoe_ds.data import Collator, ResumableDistributedSampler, StatefulLoader
from loramoe_ds.data.sampler import PackedDistributedSampler


def _epoch(n: int, world: int, rank: int, epoch: int, seed: int = 0) -> list[int]:
    s = ResumableDistributedSampler(n, world, rank, seed=seed)
    s.set_epoch(epoch)
    return list(s)


@pytest.mark.parametrize("n,world", [(103, 1), (103, 2), (103, 4), (64, 8)])
def test_ranks_disjoint_equal_and_cover(n: int, world: int) -> None:
    parts = [_epoch(n, world, r, epoch=0) for r in range(world)]
    assert all(len(p) == n // world for p in parts)  # equal steps per rank
    flat = [i for p in parts for i in p]
    assert len(set(flat)) == len(flat)  # disjoint
    assert len(flat) == n - n % world  # only the N % W tail is dropped
    assert set(flat) <= set(range(n))


def test_deterministic_and_reshuffled_per_epoch() -> None:
    assert _epoch(100, 2, 0, epoch=3, seed=7) == _epoch(100, 2, 0, epoch=3, seed=7)
    assert _epoch(100, 2, 0, epoch=3, seed=7) != _epoch(100, 2, 0, epoch=4, seed=7)
    assert _epoch(100, 2, 0, epoch=3, seed=7) != _epoch(100, 2, 0, epoch=3, seed=8)
    # The global permutation is the same for every rank: rank r takes r::W of it.
    g = torch.Generator().manual_seed(7 + 3)
    perm = torch.randperm(100, generator=g).tolist()
    assert _epoch(100, 2, 1, epoch=3, seed=7) == perm[1:100:2]


def test_no_drop_last_pads_by_wrapping() -> None:
    parts = [list(ResumableDistributedSampler(10, 4, r, drop_last=False)) for r in range(4)]
    assert [len(p) for p in parts] == [3, 3, 3, 3]
    assert set(i for p in parts for i in p) == set(range(10))


@pytest.mark.parametrize("stop_after", [0, 1, 17, 24])
def test_sampler_resume_mid_epoch(stop_after: int) -> None:
    full = ResumableDistributedSampler(50, 2, 1, seed=3)
    full.set_epoch(2)
    expected = list(full)
    s = ResumableDistributedSampler(50, 2, 1, seed=3)
    s.set_epoch(2)
    it = iter(s)
    seen = [next(it) for _ in range(stop_after)]
    state = s.state_dict()
    assert state["epoch"] == 2 and state["position"] == stop_after
    resumed = ResumableDistributedSampler(50, 2, 1, seed=3)
    resumed.load_state_dict(state)
    assert seen + list(resumed) == expected


def test_load_state_rejects_mismatch() -> None:
    # A state from another world size loads (continuing at its global position,
    # test_resume_on_other_world_size) unless that position does not split evenly.
    s = ResumableDistributedSampler(50, 2, 0, seed=3)
    next(iter(s))
    with pytest.raises(ValueError, match="cannot be split evenly over 4 ranks"):
        ResumableDistributedSampler(50, 4, 0, seed=3).load_state_dict(s.state_dict())
    state = ResumableDistributedSampler(50, 2, 0, seed=3).state_dict()
    with pytest.raises(ValueError, match="global_batch"):
        ResumableDistributedSampler(50, 2, 0, seed=3, global_batch=4).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples_total"):
        ResumableDistributedSampler(60, 2, 0, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="rank"):
        ResumableDistributedSampler(50, 2, 2)


def _steps(n: int, world: int, micro: int, gas: int, gb: int, epochs: int = 2, start=None):
    """Sorted sample ids of every optimizer step over all ranks (optionally resumed)."""
    samplers = [ResumableDistributedSampler(n, world, r, seed=9, global_batch=gb)
                for r in range(world)]  # fmt: skip
    if start is not None:
        for s in samplers:
            s.load_state_dict(start)
    out = []
    for _ in range(epochs):
        rank_ids = [list(s) for s in samplers]
        for s in samplers:
            s.set_epoch(s.epoch + 1)
        micro_steps = len(rank_ids[0]) // micro
        assert micro_steps % gas == 0  # whole optimizer steps per epoch
        for g in range(micro_steps // gas):
            lo, hi = g * gas * micro, (g + 1) * gas * micro
            out.append(sorted(i for ids in rank_ids for i in ids[lo:hi]))
    return out, samplers[0]


def test_global_batch_is_topology_independent() -> None:
    """Global batch 8: step g holds perm[8g : 8g+8] on 1 rank x micro 4 x GAS 2,
    2 x 4, 4 x 2 and 8 x 1; each epoch is 50 // 8 = 6 whole steps (no step spans two
    epochs, which 1 rank x GAS 2 without ``global_batch`` would: 12.5 steps)."""
    ref, _ = _steps(50, 2, 4, 1, 8)
    assert len(ref) == 12
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(9)).tolist()
    assert ref[1] == sorted(perm[8:16])
    for world, micro, gas in [(1, 4, 2), (4, 2, 1), (8, 1, 1), (2, 2, 2)]:
        assert _steps(50, world, micro, gas, 8)[0] == ref, (world, micro, gas)


@pytest.mark.parametrize("w1,w2", [(2, 4), (4, 2), (2, 1), (1, 8)])
def test_resume_on_other_world_size(w1: int, w2: int) -> None:
    """A state saved after 3 steps at W1 continues at W2 with exactly the steps an
    uninterrupted run has (same global batch): nothing skipped, nothing repeated."""
    full, _ = _steps(50, w1, 8 // w1, 1, 8, epochs=2)
    s = ResumableDistributedSampler(50, w1, 0, seed=9, global_batch=8)
    it = iter(s)
    for _ in range(3 * 8 // w1):
        next(it)
    state = s.state_dict()
    assert state["global_position"] == 24
    rest, s2 = _steps(50, w2, 8 // w2, 1, 8, epochs=2, start=state)
    assert full[3:] == rest[: len(full) - 3]
    assert s2.position == 0 and s2.epoch == 2


def test_packed_rows_per_step_topology_independent_and_resumable() -> None:
    """Packed rows, global batch 4 rows: the rows of each step are the same on 1, 2 and 4
    ranks, and a row position saved on 2 ranks continues on 4 ranks."""
    lengths = [5 + (7 * i) % 40 for i in range(120)]

    def step_rows(world: int, start=None) -> list[list[tuple[int, ...]]]:
        samplers = [PackedDistributedSampler(lengths, 64, world, r, seed=2, global_batch=4)
                    for r in range(world)]  # fmt: skip
        for s in samplers:
            if start is not None:
                s.load_state_dict(start)
        per = [list(s) for s in samplers]
        k = 4 // world  # rows per rank per step (micro-batch 4 / W, GAS 1)
        return [sorted(tuple(row) for p in per for row in p[g * k : (g + 1) * k])
                for g in range(len(per[0]) // k)]  # fmt: skip

    ref = step_rows(1)
    n_rows = len(PackedDistributedSampler(lengths, 64, 1, 0, seed=2).rows(0))
    assert len(ref) == n_rows // 4 and n_rows % 4  # whole steps; the tail rows dropped
    assert step_rows(2) == ref and step_rows(4) == ref
    two = PackedDistributedSampler(lengths, 64, 2, 1, seed=2, global_batch=4)
    it = iter(two)
    for _ in range(6):  # 3 steps of 2 rows on this rank
        next(it)
    assert two.state_dict()["global_position"] == 12
    assert step_rows(4, start=two.state_dict()) == ref[3:]


class _Toy(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 41

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": [i + 10] * (1 + i % 4), "prompt_len": 0, "task_type": i % 2}


def _loader(rank: int, workers: int = 0) -> StatefulLoader:
    s = ResumableDistributedSampler(41, 2, rank, seed=11)
    return StatefulLoader(_Toy(), s, 3, Collator(0), num_workers=workers)


def _ids(batch: dict) -> list[int]:
    return (batch["input_ids"][:, 0] - 10).tolist()


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resume_equals_uninterrupted(workers: int) -> None:
    """Stop mid-epoch 1 (DataLoader prefetching ahead), resume in a fresh loader."""
    ref = _loader(rank=1)
    uninterrupted = [_ids(b) for _ in range(3) for b in ref]  # 3 epochs
    assert len(ref) == 6 and len(uninterrupted) == 18

    first = _loader(rank=1, workers=workers)
    got = [_ids(b) for b in first]  # epoch 0
    it = iter(first)
    got += [_ids(next(it)) for _ in range(4)]  # 4 batches of epoch 1, workers prefetch more
    state = first.state_dict()
    del it
    assert state["epoch"] == 1 and state["position"] == 12

    resumed = _loader(rank=1, workers=workers)
    resumed.load_state_dict(state)
    got += [_ids(b) for b in resumed]  # rest of epoch 1
    assert resumed.epoch == 2 and resumed.state_dict()["position"] == 0
    got += [_ids(b) for b in resumed]  # epoch 2
    assert got == uninterrupted


def test_loader_equal_steps_across_ranks() -> None:
    a, b = _loader(0), _loader(1)
    ia = [i for x in a for i in _ids(x)]
    ib = [i for x in b for i in _ids(x)]
    assert len(ia) == len(ib) == 18 and not set(ia) & set(ib)
