"""Worker of test_device_paths.py (one per rank): ``_device_paths_worker.py ARGS OUT``.

Two checks that stand in, on gloo, for what only a GPU run would show:

* ``load``: :func:`~loramoe_ds.parallel.zero_load.load_pretrained_into` on an
  unpartitioned model (ZeRO stage 0/1/2) under a recorder of the
  ``torch.distributed`` collectives, with the run's compute device declared
  ``cuda``: every tensor a collective gets must be on it (an NCCL-only group
  has no CPU backend).
* ``syncs``: one forward and backward of :class:`EPDispatcher` (soft; top-k
  with null experts) under a counter of the device->host reads.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

COLLECTIVES = (
    "broadcast", "all_reduce", "all_gather", "all_gather_into_tensor",
    "reduce_scatter_tensor", "all_to_all_single", "reduce", "scatter", "gather",
)  # fmt: skip
SYNC_METHODS = ("tolist", "item", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


class CollectiveRecorder:
    """Wraps the ``torch.distributed`` collectives; records each call's tensors' devices."""

    def __init__(self):
        self.calls: list[tuple[str, list[str]]] = []
        self._orig = {}

    def __enter__(self):
        for name in COLLECTIVES:
            fn = getattr(dist, name)
            self._orig[name] = fn

            def wrapped(*a, _fn=fn, _name=name, **kw):
                tensors = [t for t in list(a) + list(kw.values()) if isinstance(t, torch.Tensor)]
                for x in list(a) + list(kw.values()):
                    if isinstance(x, list):
                        tensors += [t for t in x if isinstance(t, torch.Tensor)]
                self.calls.append((_name, [t.device.type for t in tensors]))
                return _fn(*a, **kw)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(dist, name, fn)
        return False


class SyncCounter:
    """Counts Python-level device->host reads of tensors (``tolist``, ``item``, ``int()``...)."""

    def __init__(self):
        self.calls: list[str] = []
        self._orig = {}

    def __enter__(self):
        for name in SYNC_METHODS:
            fn = getattr(torch.Tensor, name)
            self._orig[name] = fn

            def wrapped(t, *a, _fn=fn, _name=name, **kw):
                self.calls.append(_name)
                return _fn(t, *a, **kw)

            setattr(torch.Tensor, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(torch.Tensor, name, fn)
        return False


def check_load(out: Path) -> dict:
    """Every rank starts from different weights; after the load all equal the file."""
    from loramoe_ds.parallel.zero_load import load_pretrained_into
    from loramoe_ds.tiny import tiny_model

    rank = dist.get_rank()
    src = out / "model"
    if rank == 0:
        tiny_model("llama", seed=7, vocab_size=64, layers=2, hidden=32).save_pretrained(src)
    dist.barrier()
    model = tiny_model("llama", seed=100 + rank, vocab_size=64, layers=2, hidden=32)
    with CollectiveRecorder() as rec:
        load_pretrained_into(model, src)
    ref = tiny_model("llama", seed=7, vocab_size=64, layers=2, hidden=32)
    equal = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                   ref.state_dict().values()))  # fmt: skip
    compute = "cuda"  # the run's compute device on a GPU machine
    off = [(n, d) for n, devs in rec.calls for d in devs if d != compute]
    return {"load_equal": equal, "load_calls": rec.calls, "load_off_device": off}


def check_syncs() -> dict:
    from loramoe_ds.model.experts import ExpertBank
    from loramoe_ds.model.router import Router
    from loramoe_ds.parallel.dispatch import EPDispatcher

    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    res = {}
    for mode, k, nulls in [("soft", 1, 0), ("topk", 2, 2)]:
        E, D, O, R = 4, 16, 12, 4
        torch.manual_seed(0)
        router = Router(D, E, mode, k, num_null=nulls)
        full = ExpertBank(E, D, O, R)
        L = E // world
        shard = ExpertBank(L, D, O, R)
        with torch.no_grad():
            full.lora_B.normal_()
            shard.lora_A.copy_(full.lora_A[rank * L : (rank + 1) * L])
            shard.lora_B.copy_(full.lora_B[rank * L : (rank + 1) * L])
        disp = EPDispatcher(shard, E, group, world, rank)
        torch.manual_seed(1 + rank)
        x = torch.randn(9 + rank, D, requires_grad=True)
        routing = router(x)
        with SyncCounter() as fwd:
            y = disp(x, routing)
        with SyncCounter() as bwd:
            y.square().sum().backward()
        res[mode] = {"forward": fwd.calls, "backward": bwd.calls}
    return res


def main():
    import deepspeed  # noqa: F401  (the project's import order)

    args, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    res = {}
    if "load" in args["checks"]:
        res.update(check_load(out))
    if "syncs" in args["checks"]:
        res["syncs"] = check_syncs()
    torch.save(res, out / f"result_rank{os.environ['RANK']}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
