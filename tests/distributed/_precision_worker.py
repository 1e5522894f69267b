"""Worker of test_precision.py (one per rank): ``_precision_worker.py ARGS OUT``.

Trains the tiny model under ZeRO-3 with expert parallelism, once in fp32 and once
in bf16 (same weights, same batches), and records the losses, the first step's
gradients, the final adapter (fp32 master weights) and the dtype of every kind of adapter tensor.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import _common as C
import torch

from loramoe_ds.parallel.engine import MoETrainer


def run(case: dict, precision: str, base_dir: Path) -> dict:
    import torch.distributed as dist

    from loramoe_ds.parallel.zero_load import load_pretrained_into

    def factory():  # the real runs' path: weights loaded from files (bf16 draws differ)
        model = C.model_factory()
        load_pretrained_into(model, base_dir)
        return model

    factory.num_layers = C.LAYERS
    world = int(os.environ["WORLD_SIZE"])
    cfg = C.ds_config(world, case["stage"])
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    trainer = MoETrainer.build(
        factory, C.adapter_cfg(case["router"]), cfg, case["ep"], seed=0,
        optim=C.optim(0.5), init_state=C.init_state(case["router"]),
        loss_reduction="micro_batch_mean",
    )  # fmt: skip
    rank = dist.get_rank()
    layers = list(trainer.model.moe_layers())
    dtypes = {
        "base": {str(p.dtype) for p in trainer.model.base.parameters() if not p.requires_grad},
        "router": {str(lay.router.weight.dtype) for lay in layers},
        "engine_banks": {
            str(p.dtype) for lay in layers if lay.experts is not None
            for p in lay.experts.parameters()
        },
        "ep_banks": {str(b.lora_A.dtype) for b in trainer.banks},
    }  # fmt: skip
    # The ZeRO-3 load (rank 0 writes, DeepSpeed re-partitions) gave every rank the file's weights.
    import deepspeed

    ref = C.model_factory().state_dict()
    frozen = [(n, p) for n, p in trainer.model.base.named_parameters() if not p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in frozen]):
        loaded = all(
            torch.equal(p.detach().cpu(), ref[n.replace(".base.", ".")].to(p.dtype))
            for n, p in frozen
        )
    losses, grads = [], {}

    def hook(t):
        grads.update(t.full_adapter_grads())

    for step in range(case["steps"]):
        result = trainer.train_step([C.batch(rank, step, 0)], hook if step == 0 else None)
        losses += [float(o.loss) for o in result.outputs]
    final = trainer.full_adapter_state()
    dist.barrier()
    return {"losses": losses, "grads": grads, "final": final, "dtypes": dtypes, "loaded": loaded}


def main():
    import deepspeed
    import torch.distributed as dist

    args, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    deepspeed.init_distributed()
    base_dir = out / "base"
    if dist.get_rank() == 0:
        C.model_factory().save_pretrained(base_dir)
    dist.barrier()
    res = {}
    for case in args["cases"]:
        for precision in ("fp32", "bf16"):
            res[(case["key"], precision)] = run(case, precision, base_dir)
    torch.save(res, out / f"result_rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main()
