"""The CUDA device is bound before the first collective (no GPU needed: torch.cuda and
DeepSpeed's init are replaced by recorders)."""

import pytest
import torch

from loramoe_ds.parallel import groups


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.append(("set_device", i)))
    import deepspeed

    monkeypatch.setattr(deepspeed, "init_distributed", lambda *a, **k: seen.append(("init",)))
    return seen


@pytest.mark.parametrize("local_rank,count,want", [(3, 8, 3), (0, 8, 0), (3, 1, 0), (5, 4, 1)])
def test_device_is_set_before_the_process_group(calls, monkeypatch, local_rank, count, want):
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    groups.init_process_group()
    assert calls == [("set_device", want), ("init",)]


def test_no_cuda_no_binding(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert groups.bind_cuda_device() is None
