"""Worker of test_warmup_steps.py (one per rank): ``_warmup_worker.py ARGS_JSON OUT_DIR``
(started by ``_common.launch``).

Builds the plan exactly as ``launcher/train.py`` does (config -> make_plan ->
MoETrainer), takes a few optimizer steps and records, per step, the logged LR and
the largest change of every router and expert tensor (gathered over EP).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import _common as C

from loramoe_ds.base_model import model_factory
from loramoe_ds.config import load_run_config
from loramoe_ds.parallel.engine import MoETrainer
from loramoe_ds.plan import make_plan


def main(out: Path, overrides: list[str]) -> None:
    import os

    import torch.distributed as dist

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    run = load_run_config(C.REPO / "configs" / "tiny.yaml", overrides)
    plan = make_plan(run, {}, world, rank)
    trainer = MoETrainer.build(
        model_factory(plan), run.adapter, plan.ds_config, ep_size=run.parallel.ep_size,
        seed=run.train.seed, optim=plan.optim, lr_schedule=plan.lr_schedule,
        num_layers=plan.num_layers,
    )  # fmt: skip
    before = trainer.full_adapter_state()
    steps = []
    for step in range(run.train.max_steps):
        result = trainer.train_step([C.batch(rank, step, 0)])  # the training loop's call
        after = trainer.full_adapter_state()
        delta = {n: float((after[n] - before[n]).abs().max()) for n in after}
        steps.append({"step": trainer.global_step, "lr": result.lr, "delta": delta})
        before = after
    if dist.get_rank() == 0:
        (out / "steps.json").write_text(json.dumps({"steps": steps, "ep": trainer.expert_parallel}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[2]), json.loads(sys.argv[1])["overrides"])
