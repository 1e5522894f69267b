"""Worker of tests/distributed/test_nonfinite.py (one per rank): ``_nonfinite_worker.py ARGS OUT``.

For each case: run P trains ``steps`` steps on batches 0..steps-1 and poisons
step ``k`` on rank 1 only (a forward hook making the final norm's output
infinite -- the loss goes non-finite -- or an infinite expert gradient in the
``grad_hook``); run R trains the same steps but never sees batch ``k``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import _common as C
import torch.distributed as dist

from loramoe_ds.parallel.checkpoint import full_optimizer_state
from loramoe_ds.parallel.engine import MoETrainer


def _build(case) -> MoETrainer:
    world = int(os.environ["WORLD_SIZE"])
    return MoETrainer.build(
        C.model_factory, C.adapter_cfg(case["router"]), C.ds_config(world, 3, case["gas"]),
        case["ep"], seed=0, optim=C.optim(clip=1.0), lr_schedule=C.warmup_lr(),
        init_state=C.init_state(case["router"]), loss_reduction="token_mean",
    )  # fmt: skip


def _poison_loss(trainer):
    norm = trainer.model.base.model.norm
    return norm.register_forward_hook(lambda m, i, out: out * float("inf"))


def _poison_grad(trainer):
    p = trainer.expert_params()[0]
    p.grad.view(-1)[0] = float("inf")


def _run(case, poisoned: bool) -> dict:
    trainer = _build(case)
    rank = dist.get_rank()
    seen, verdicts, norms = [], [], []
    for step in range(case["steps"]):
        if not poisoned and step == case["k"]:
            continue  # the reference never sees batch k
        hook, grad_hook = None, None
        if poisoned and step == case["k"] and rank == 1:
            if case["poison"] == "loss":
                hook = _poison_loss(trainer)
            else:
                grad_hook = _poison_grad
        micro = [C.batch(rank, step, m) for m in range(case["gas"])]
        result = trainer.train_step(micro, grad_hook)
        if hook is not None:
            hook.remove()
        seen.append(step)
        verdicts.append(result.nonfinite)
        norms.append(result.grad_norm)
    return {
        "seen": seen,
        "verdicts": verdicts,
        "norms": norms,
        "global_step": trainer.global_step,
        "skipped_steps": int(trainer.engine.skipped_steps),
        "lr": trainer.lr,
        "final": trainer.full_adapter_state(),
        "optim": full_optimizer_state(trainer),
    }


def main():
    args, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    results = {}
    for case in args["cases"]:
        results[case["key"]] = {"P": _run(case, True), "R": _run(case, False)}
        dist.barrier()
    C.finish(results, out)


if __name__ == "__main__":
    main()
