"""Worker process of the distributed tests (one per rank): ``_worker.py SCENARIO ARGS OUT``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from loramoe_ds.parallel.engine import MoETrainer  # noqa: E402


def hang_in_next_save(marker: str) -> None:
    """Make the next checkpoint save hang once every file is in its temporary directory.

    Wraps ``checkpoint.atomic_dir``: after the body has written everything and before
    the rename, rank 0 creates ``marker`` and sleeps until the test SIGKILLs the job.
    """
    import contextlib
    import time

    from loramoe_ds.parallel import checkpoint

    real = checkpoint.atomic_dir

    @contextlib.contextmanager
    def hanging(path):
        with real(path) as tmp:
            yield tmp
            Path(marker).write_text(Path(path).name)
            while True:
                time.sleep(1)

    checkpoint.atomic_dir = hanging


def base_state(trainer) -> dict[str, torch.Tensor]:
    """The frozen base weights, gathered (ZeRO-3) so a reference can be built."""
    import deepspeed

    params = [(n, p) for n, p in trainer.model.base.named_parameters() if not p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=True):
        return {n: p.detach().clone() for n, p in params}


def base_storage(trainer) -> tuple[int, int]:
    """(elements stored on this rank, elements of the full model) of the frozen base."""
    local = full = 0
    for _, p in trainer.model.base.named_parameters():
        if p.requires_grad:
            continue
        if hasattr(p, "ds_tensor"):
            local += p.ds_tensor.numel()
            full += p.ds_numel
        else:
            local += p.numel()
            full += p.numel()
    return local, full


def equivalence(args, out: Path):
    import torch.distributed as dist

    results = {}
    for case in args["cases"]:
        key = case["key"]
        world = int(os.environ["WORLD_SIZE"])
        cfg = C.ds_config(world, case["stage"], case["gas"], case["clip"], case.get("sched", False))
        trainer = MoETrainer.build(
            C.model_factory, C.adapter_cfg(case["router"]), cfg, case["ep"], seed=0,
            init_state=C.init_state(case["router"]),
        )  # fmt: skip
        rank = dist.get_rank()
        base = base_state(trainer)  # collective
        res = {"base": base if rank == 0 else None, "storage": base_storage(trainer)}
        res["init"] = trainer.full_adapter_state()
        losses, lrs = [], []
        for step in range(case["steps"]):
            for m in range(case["gas"]):
                b = C.batch(rank, step, m)
                if m < case["gas"] - 1:
                    losses.append(trainer.train_micro_batch(b))
                    continue
                out_ = trainer.forward_backward(b)
                losses.append({"loss": float(out_.loss)})
                lrs.append(float(trainer.engine.get_lr()[0]))
                flat = trainer.sync_expert_grads()
                if step == 0:
                    res["grads"] = trainer.full_adapter_grads()
                res.setdefault("norms", []).append(trainer.optimizer_step(flat))
        res["losses"] = losses
        res["lrs"] = lrs
        res["final"] = trainer.full_adapter_state()
        res["local_banks"] = [
            (b.lora_A.detach().clone(), b.lora_B.detach().clone()) for b in trainer.banks
        ]
        res["comm"] = (trainer.comm.bytes_total, trainer.comm.bytes_remote)
        if case.get("export"):
            trainer.export_adapter(out / f"adapter_{key}")
        results[key] = res
        dist.barrier()
    return results


def train(args, out: Path):
    """Train ``steps`` optimizer steps, saving at ``save_at``; optionally resume first."""
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    cfg = C.ds_config(world, args["stage"], args["gas"], args["clip"], sched=True)
    trainer = MoETrainer.build(
        C.model_factory, C.adapter_cfg(args["router"], dropout=0.1), cfg, args["ep"], seed=0,
        init_state=C.init_state(args["router"]),
    )  # fmt: skip
    rank = dist.get_rank()
    start = 0
    if args.get("resume"):
        cs = trainer.load(args["ckpt"])
        start = cs["next_step"]
    losses = {}
    for step in range(start, args["steps"]):
        for m in range(args["gas"]):
            st = trainer.train_micro_batch(C.batch(rank, step, m))
            losses[(step, m)] = st["loss"]
        if step + 1 in args.get("save_at", []):
            if step + 1 == args.get("hang_at"):
                hang_in_next_save(args["marker"])
            trainer.save(args["ckpt"], {"next_step": step + 1})
    return {"losses": losses, "global_step": trainer.global_step, "start": start,
            "final": trainer.full_adapter_state()}  # fmt: skip


def token_mean(args, out: Path):
    """One optimizer step per case from uneven micro-batches: N_step, reduced row, grads."""
    import torch.distributed as dist

    from loramoe_ds.train_loop.metrics import reduce_step

    results = {}
    world = int(os.environ["WORLD_SIZE"])
    for case in args["cases"]:
        cfg = C.ds_config(world, case["stage"], case["gas"], 0.0)
        trainer = MoETrainer.build(
            C.model_factory, C.adapter_cfg(case["router"]), cfg, case["ep"], seed=0,
            init_state=C.init_state(case["router"]), loss_reduction=case["reduction"],
        )  # fmt: skip
        rank = dist.get_rank()
        base = base_state(trainer)
        micro = [C.uneven_batch(rank, m) for m in range(case["gas"])]
        outputs, n_step = trainer.accumulate(micro)
        row = reduce_step(outputs, micro)
        flat = trainer.sync_expert_grads()
        grads = trainer.full_adapter_grads()
        trainer.optimizer_step(flat)
        results[case["key"]] = {"base": base if rank == 0 else None, "grads": grads,
                                "row": row, "n_step": n_step}  # fmt: skip
        dist.barrier()
    return results


def activation_checkpointing(args, out: Path):
    """Per case: one step without and one with activation checkpointing, same start."""
    import torch.distributed as dist

    results = {}
    world = int(os.environ["WORLD_SIZE"])
    for case in args["cases"]:
        for ac in (False, True):
            cfg = C.ds_config(world, case["stage"], 1, 0.0)
            trainer = MoETrainer.build(
                C.model_factory, C.adapter_cfg(case["router"], dropout=0.1), cfg, case["ep"],
                seed=0, init_state=C.init_state(case["router"]), activation_checkpointing=ac,
            )  # fmt: skip
            rank = dist.get_rank()
            calls = []
            first = trainer.model.moe_layers()[0]
            hook = first.register_forward_hook(lambda *a, calls=calls: calls.append(1))
            trainer.comm.reset()
            outputs, _ = trainer.accumulate([C.batch(rank, 0, 0)])
            hook.remove()
            flat = trainer.sync_expert_grads()
            results[(case["key"], ac)] = {
                "grads": trainer.full_adapter_grads(),
                "loss": float(outputs[0].loss),
                "forwards": len(calls),
                "a2a_calls": trainer.comm.calls,
            }
            trainer.optimizer_step(flat)
            dist.barrier()
    return results


def main():
    scenario, args, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    import torch.distributed as dist

    scenarios = {"equivalence": equivalence, "train": train, "token_mean": token_mean,
                 "activation_checkpointing": activation_checkpointing}  # fmt: skip
    res = scenarios[scenario](args, out)
    rank = dist.get_rank()
    torch.save(res, out / f"result_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
