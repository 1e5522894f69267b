"""GPU-site facts checked without a GPU (torch.cuda replaced by recorders).

* A site that binds one GPU per Slurm task shows each task a single device:
  ``LOCAL_RANK`` 3 must use cuda:0, and DeepSpeed -- which indexes
  ``cuda:LOCAL_RANK`` itself (the NCCL ``device_id`` at init, the engine's
  ``set_device``, ``zero.Init``'s device) -- must be told the same.
* A bf16 run on a torch that sees no GPU is refused at plan time, before any
  process group, instead of training on the CPU over gloo.
That the real NCCL job then runs is for docs/gpu.md's multi-node checks.
"""

import pytest
import torch

from loramoe_ds.parallel import groups
from loramoe_ds.plan import check_accelerator


@pytest.mark.parametrize("local_rank,count,want", [(3, 1, 0), (0, 1, 0), (3, 8, 3), (5, 4, 1)])
def test_local_rank_names_the_bound_gpu(monkeypatch, local_rank, count, want):
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", seen.append)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert groups.bind_cuda_device() == want
    assert seen == [want]
    import os

    assert os.environ["LOCAL_RANK"] == str(want)  # what DeepSpeed will index


def test_bf16_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^train\.precision=bf16: torch .* sees no CUDA device"):
        check_accelerator("bf16", {})
    check_accelerator("bf16", {"DS_ACCELERATOR": "cpu"})  # the CPU on purpose
    check_accelerator("fp32", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_accelerator("bf16", {})
