"""Timeouts reach the process groups; ranks wait for rank-0-only work on the gloo side group.

One process (a gloo world of 1) started by ``init_process_group`` itself, with
``deepspeed.init_distributed`` and ``torch.distributed`` spied on: the default
group gets ``parallel.timeout_s``, the side group is gloo with
``parallel.rank0_timeout_s``, and the waits behind rank 0's work -- the verdict
on the tokenised data (``prepare_data``), the data-cache barrier, a checkpoint
save's verdict and the resume's choice of tag -- name that side group, never the
default (NCCL on GPUs) group.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch.distributed as dist
from launching import free_port

from loramoe_ds.parallel import groups


@pytest.fixture
def world_of_one(monkeypatch):
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():  # fmt: skip
        monkeypatch.setenv(k, v)
    import deepspeed

    seen = {}
    real_init, real_new = deepspeed.init_distributed, dist.new_group

    def init(*a, **k):
        seen["init_timeout"] = k.get("timeout")
        return real_init(*a, **k)

    def new_group(*a, **k):
        seen.setdefault("new_group", []).append(k)
        return real_new(*a, **k)

    monkeypatch.setattr(deepspeed, "init_distributed", init)
    monkeypatch.setattr(dist, "new_group", new_group)
    monkeypatch.setattr(groups, "_timeouts", dict(groups._timeouts))
    monkeypatch.setattr(groups, "_rank0_group", {})
    assert not dist.is_initialized()
    groups.init_process_group(timeout_s=37, rank0_timeout_s=4321)
    yield seen
    dist.destroy_process_group()


def _spy_waits(monkeypatch) -> list:
    calls = []
    real_b, real_bo = dist.barrier, dist.broadcast_object_list

    def barrier(*a, **k):
        calls.append(("barrier", k.get("group")))
        return real_b(*a, **k)

    def bcast(obj, src=0, group=None, **k):
        calls.append(("broadcast_object_list", group))
        return real_bo(obj, src=src, group=group, **k)

    monkeypatch.setattr(dist, "barrier", barrier)
    monkeypatch.setattr(dist, "broadcast_object_list", bcast)
    return calls


def test_timeouts_and_the_gloo_side_group(world_of_one):
    seen = world_of_one
    assert seen["init_timeout"] == timedelta(seconds=37)
    side = groups.rank0_group()
    assert side is not None and side is not dist.group.WORLD
    assert dist.get_backend(side) == "gloo"
    assert seen["new_group"][-1] == {"backend": "gloo", "timeout": timedelta(seconds=4321)}
    assert groups.rank0_group() is side  # created once
    assert groups.collective_timeout() == timedelta(seconds=37)
    groups.create_expert_groups(1)
    assert seen["new_group"][-1]["timeout"] == timedelta(seconds=37)


def test_prepare_data_and_cache_barrier_wait_on_the_side_group(world_of_one, tmp_path,
                                                               monkeypatch):  # fmt: skip
    import json

    from loramoe_ds.config import load_run_config
    from loramoe_ds.plan import make_plan
    from loramoe_ds.run import _rank0_barrier, prepare_data

    calls = _spy_waits(monkeypatch)
    small = tmp_path / "small.jsonl"  # a few records: the waits are what is tested
    rec = {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5", "task_type": 0}
    small.write_text("\n".join(json.dumps(rec) for _ in range(8)) + "\n")
    run = load_run_config(None, ["model.name=tiny-llama", f"output.dir={tmp_path}",
                                 f"data.train_files=[{small}]", "train.micro_batch_size=1",
                                 "parallel.ep_size=1"])  # fmt: skip
    plan = make_plan(run, {}, 2, 0)  # planned for 2 ranks: the verdict is broadcast
    prepare_data(plan)
    _rank0_barrier()
    side = groups.rank0_group()
    assert calls == [("broadcast_object_list", side), ("barrier", side)]


def test_checkpoint_waits_use_the_side_group(world_of_one, tmp_path, monkeypatch):
    import test_checkpoint_integrity as T

    from loramoe_ds.parallel.checkpoint import store

    trainer = T.trainer.__wrapped__(monkeypatch)  # the stand-in trainer of those tests
    calls = _spy_waits(monkeypatch)
    trainer.global_step = 3
    store.save_checkpoint(trainer, tmp_path, {"step": 3})
    side = groups.rank0_group()
    assert calls == [("broadcast_object_list", side)]
    calls.clear()
    assert store.load_checkpoint(trainer, tmp_path) == {"step": 3}
    assert calls == [("broadcast_object_list", side), ("barrier", side)]
