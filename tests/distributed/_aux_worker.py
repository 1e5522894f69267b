"""Worker of test_aux_scope.py (one per rank): ``_aux_worker.py ARGS OUT``."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import _common as C

from loramoe_ds.parallel.aux_scope import DPGather
from loramoe_ds.parallel.engine import MoETrainer


def main():
    import deepspeed
    import torch.distributed as dist

    args, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    world = int(os.environ["WORLD_SIZE"])
    results = {}
    for case in args["cases"]:
        extra = case.get("extra", {})
        cfg = dataclasses.replace(
            C.adapter_cfg(case["router"], **extra), aux_loss_scope="global_batch"
        )
        trainer = MoETrainer.build(
            C.model_factory, cfg, C.ds_config(world, 3), case["ep"], seed=0,
            optim=C.optim(), loss_reduction="micro_batch_mean",
            init_state=C.init_state(case["router"], **extra),
        )  # fmt: skip
        if trainer.model.aux_gather is None:
            trainer.model.aux_gather = DPGather()
        rank = dist.get_rank()
        frozen = [(n, p) for n, p in trainer.model.base.named_parameters() if not p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in frozen], enabled=True):
            base = {n: p.detach().clone() for n, p in frozen}
        got: dict = {}
        result = trainer.train_step(
            [C.batch(rank, 0, 0)], lambda t, got=got: got.update(grads=t.full_adapter_grads())
        )
        o = result.outputs[0]
        results[case["key"]] = {
            "base": base,
            "loss": float(o.loss),
            "lm": float(o.lm_loss),
            "z": float(o.z_loss),
            "lbc": float(o.lbc_loss),
            "sup": float(o.router_supervision_loss),
            "lb": float(o.load_balance_loss),
            "grads": got["grads"],
        }
        dist.barrier()
    C.finish(results, out)


if __name__ == "__main__":
    main()
