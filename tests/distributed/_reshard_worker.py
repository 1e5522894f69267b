"""Worker of test_reshard.py (one per rank): ``_reshard_worker.py ARGS OUT``.

Each run of ``args["runs"]`` builds a trainer at this launch's world size with
its own model depth (``layers``), ``ep_size``, ZeRO stage, micro-batch and GAS (global batch
:data:`GLOBAL_BATCH`), optionally resumes from a checkpoint, trains to
:data:`STEPS` on the real data path (resumable sampler with ``global_batch`` ->
:class:`StatefulLoader` -> :class:`Collator` -> ``step_batches``), saves
where asked and returns the reduced per-step metrics and the final adapter.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import _common as C
import torch

from loramoe_ds.data.collate import Collator
from loramoe_ds.data.loader import StatefulLoader
from loramoe_ds.data.sampler import ResumableDistributedSampler
from loramoe_ds.lr_schedule import LRSchedule
from loramoe_ds.parallel.engine import MoETrainer
from loramoe_ds.train_loop.step_batches import step_batches
from loramoe_ds.train_loop.step_metrics import reduce_step

GLOBAL_BATCH = 8
RECORDS = 28  # 3 whole steps per epoch (4 records dropped): the runs cross an epoch
STEPS = 5


class Records(torch.utils.data.Dataset):
    """Deterministic records: 4..13 tokens, prompts of 1..5 tokens, two task types."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(123)
        self.items = []
        for i in range(RECORDS):
            n = 4 + int(torch.randint(0, 10, (1,), generator=g))
            ids = torch.randint(1, C.VOCAB, (n,), generator=g).tolist()
            self.items.append({"input_ids": ids, "prompt_len": 1 + i % 5, "task_type": i % 2})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def ds_config(world: int, micro: int, gas: int, stage: int) -> dict:
    assert micro * gas * world == GLOBAL_BATCH, (micro, gas, world)
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": GLOBAL_BATCH,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }


def adapter_cfg(router: str, aux: bool, extra: dict):
    """The distributed tests' adapter; LBC and load balance over the step's ranks, or no aux.

    The z-loss is off: it is a mean over one micro-batch's tokens whatever
    ``aux_loss_scope`` says, so its value and gradient depend on how the step is
    split into micro-batches. ``extra`` sets further fields (null experts, router
    supervision).
    """
    cfg = C.adapter_cfg(router, **extra)
    if aux:
        return dataclasses.replace(cfg, aux_loss_scope="global_batch", z_loss_coef=0.0)
    return dataclasses.replace(cfg, lbc_beta=0.0, load_balance_coef=0.0, z_loss_coef=0.0)


def one_run(spec: dict, out: Path) -> dict:
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    layers = spec.get("layers", C.LAYERS)
    trainer = MoETrainer.build(
        C.factory(layers),
        adapter_cfg(spec["router"], spec.get("aux", True), spec.get("extra", {})),
        ds_config(world, spec["micro"], spec["gas"], spec.get("stage", 3)),
        spec["ep"],
        seed=0,
        optim=C.optim(0.5),
        lr_schedule=LRSchedule(STEPS, 2, 0.1),
        init_state=C.init_state(spec["router"], layers=layers, **spec.get("extra", {})),
    )
    rank = dist.get_rank()
    sampler = ResumableDistributedSampler(RECORDS, world, rank, seed=5, global_batch=GLOBAL_BATCH)
    loader = StatefulLoader(Records(), sampler, spec["micro"], Collator(0))
    start = 0
    if spec.get("resume"):
        client = trainer.load(spec["resume"])
        loader.load_state_dict(client["data"])
        start = trainer.global_step
    rows = {}
    steps = step_batches(loader, spec["gas"])
    while trainer.global_step < STEPS:
        res = trainer.train_step(next(steps))
        row = reduce_step(res.outputs, res.batches)
        row["grad_norm"], row["lr"] = res.grad_norm, res.lr
        rows[trainer.global_step] = row
        if trainer.global_step in spec.get("save_at", []):
            trainer.save(spec["ckpt"], {"data": loader.state_dict()})
    final = trainer.full_adapter_state()
    dist.barrier()
    placed = trainer.layout.placements()
    return {"start": start, "rows": rows, "final": final if rank == 0 else None, "placed": placed}


def main():

    args, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    results = {}
    for spec in args["runs"]:
        try:
            results[spec["key"]] = one_run(spec, out)
        except ValueError as e:  # an expected refusal
            if not spec.get("expect_error"):
                raise
            results[spec["key"]] = {"error": str(e)}
    C.finish(results, out)


if __name__ == "__main__":
    main()
