"""Worker process of the distributed tests (one per rank): ``_worker.py SCENARIO ARGS OUT``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import _common as C
import torch

from loramoe_ds.parallel.engine import MoETrainer


def hang_in_next_save(marker: str) -> None:
    """Make the next checkpoint save hang once every file is in its temporary directory.

    Wraps ``checkpoint.store.atomic_dir``: after the body has written everything and before
    the rename, rank 0 creates ``marker`` and sleeps until the test SIGKILLs the job.
    """
    import contextlib
    import time

    from loramoe_ds.parallel.checkpoint import store

    real = store.atomic_dir

    @contextlib.contextmanager
    def hanging(path):
        with real(path) as tmp:
            yield tmp
            Path(marker).write_text(Path(path).name)
            while True:
                time.sleep(1)

    store.atomic_dir = hanging


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


def _grads_into(res: dict, key: str = "grads"):
    """A ``grad_hook`` storing the step's synchronised gradients under ``res[key]``."""

    def hook(trainer):
        res[key] = trainer.full_adapter_grads()

    return hook


def equivalence(args, out: Path):
    import torch.distributed as dist

    results = {}
    for case in args["cases"]:
        key = case["key"]
        world = int(os.environ["WORLD_SIZE"])
        factory, cfg, init = C.case_model(case)
        # Each micro-batch's LM loss is its own token mean (the reference's objective).
        trainer = MoETrainer.build(
            factory, cfg, C.ds_config(world, case["stage"], case["gas"]), case["ep"], seed=0,
            optim=C.optim(case["clip"], case.get("rls", 1.0)),
            lr_schedule=C.warmup_lr(case.get("sched", False)),
            init_state=init, loss_reduction="micro_batch_mean",
            placements=case.get("placements"),
        )  # fmt: skip
        rank = dist.get_rank()
        base = base_state(trainer)  # collective
        res = {"base": base if rank == 0 else None, "storage": base_storage(trainer)}
        res["init"] = trainer.full_adapter_state()
        losses, lrs = [], []
        for step in range(case["steps"]):
            micro = [C.batch(rank, step, m) for m in range(case["gas"])]
            result = trainer.train_step(micro, _grads_into(res) if step == 0 else None)
            losses += [{"loss": float(o.loss)} for o in result.outputs]
            lrs.append(result.lr)
            res.setdefault("norms", []).append(result.grad_norm)
        res["losses"] = losses
        res["lrs"] = lrs
        res["final"] = trainer.full_adapter_state()
        res["placements"] = trainer.layout.placements()
        res["local_banks"] = {  # the sharded layers' local shards: name -> (first expert, A, B)
            lay.name: (lay.first_expert, lay.bank.lora_A.detach().clone(),
                       lay.bank.lora_B.detach().clone())
            for lay in trainer.layout.layers if lay.sharded
        }  # fmt: skip
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
    trainer = MoETrainer.build(
        C.model_factory, C.adapter_cfg(args["router"], dropout=0.1),
        C.ds_config(world, args["stage"], args["gas"]), args["ep"], seed=0,
        optim=C.optim(args["clip"]), lr_schedule=C.warmup_lr(),
        init_state=C.init_state(args["router"]), loss_reduction="micro_batch_mean",
    )  # fmt: skip
    rank = dist.get_rank()
    start = 0
    if args.get("resume"):
        cs = trainer.load(args["ckpt"])
        start = cs["next_step"]
    losses = {}
    for step in range(start, args["steps"]):
        result = trainer.train_step([C.batch(rank, step, m) for m in range(args["gas"])])
        for m, o in enumerate(result.outputs):
            losses[(step, m)] = float(o.loss)
        if step + 1 in args.get("save_at", []):
            if step + 1 == args.get("hang_at"):
                hang_in_next_save(args["marker"])
            trainer.save(args["ckpt"], {"next_step": step + 1})
    return {"losses": losses, "global_step": trainer.global_step, "start": start,
            "final": trainer.full_adapter_state()}  # fmt: skip


def token_mean(args, out: Path):
    """One optimizer step per case from uneven micro-batches: N_step, reduced row, grads."""
    import torch.distributed as dist

    from loramoe_ds.train_loop.step_metrics import reduce_step

    results = {}
    world = int(os.environ["WORLD_SIZE"])
    for case in args["cases"]:
        trainer = MoETrainer.build(
            C.model_factory, C.adapter_cfg(case["router"]),
            C.ds_config(world, case["stage"], case["gas"]), case["ep"], seed=0, optim=C.optim(),
            init_state=C.init_state(case["router"]), loss_reduction=case["reduction"],
        )  # fmt: skip
        rank = dist.get_rank()
        base = base_state(trainer)
        micro = [C.uneven_batch(rank, m) for m in range(case["gas"])]
        got: dict = {}
        result = trainer.train_step(micro, _grads_into(got))
        row = reduce_step(result.outputs, micro)
        results[case["key"]] = {"base": base if rank == 0 else None, "grads": got["grads"],
                                "row": row, "n_step": result.label_tokens}  # fmt: skip
        dist.barrier()
    return results


def activation_checkpointing(args, out: Path):
    """Per case: one step without and one with activation checkpointing, same start."""
    import torch.distributed as dist

    results = {}
    world = int(os.environ["WORLD_SIZE"])
    for case in args["cases"]:
        for ac in (False, True):
            trainer = MoETrainer.build(
                C.model_factory, C.adapter_cfg(case["router"], dropout=0.1),
                C.ds_config(world, case["stage"], 1), case["ep"], seed=0, optim=C.optim(),
                init_state=C.init_state(case["router"]), activation_checkpointing=ac,
            )  # fmt: skip
            rank = dist.get_rank()
            calls = []
            first = trainer.model.moe_layers()[0]
            hook = first.register_forward_hook(lambda *a, calls=calls: calls.append(1))
            trainer.comm.reset()
            got: dict = {}

            def grad_hook(t, got=got, hook=hook):
                hook.remove()  # the step's forwards (and recomputations) are over
                got["a2a_calls"] = t.comm.calls
                got["grads"] = t.full_adapter_grads()

            result = trainer.train_step([C.batch(rank, 0, 0)], grad_hook)
            results[(case["key"], ac)] = {
                "grads": got["grads"],
                "loss": float(result.outputs[0].loss),
                "forwards": len(calls),
                "a2a_calls": got["a2a_calls"],
            }
            dist.barrier()
    return results


def _caught(fn) -> tuple[str, str] | None:
    """``(exception type, message)`` of what ``fn()`` raises, ``None`` if nothing."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test checks type and message
        return type(e).__name__, str(e)
    return None


def _misuse_case(case: dict, world: int) -> dict:
    import torch.distributed as dist

    trainer = MoETrainer.build(
        C.model_factory, C.adapter_cfg(case["router"]),
        C.ds_config(world, 3, case["gas"]), case["ep"], seed=0, optim=C.optim(0.5),
        init_state=C.init_state(case["router"]),
    )  # fmt: skip
    rank = dist.get_rank()
    micro = [C.batch(rank, 0, m) for m in range(case["gas"])]
    got = {
        "grads_before_step": _caught(trainer.full_adapter_grads),
        "step_off_boundary": _caught(trainer._optimizer_step),
        "sync_before_backward": _caught(trainer._sync_grads),
        "wrong_micro_batches": _caught(lambda: trainer.train_step(micro + micro[:1])),
    }
    if trainer.expert_optimizer is not None:
        got["expert_step_before_sync"] = _caught(lambda: trainer.expert_optimizer.step(1e-3))

    def hook(t):
        got["second_sync"] = _caught(t._sync_grads)
        if t.expert_optimizer is not None:
            got["second_expert_sync"] = _caught(t.expert_optimizer.sync_grads)
        got["nested_step"] = _caught(lambda: t.train_step(micro))
        got["clip_norm"] = t._clip_joint()  # replicated mode too
        got["grads_in_hook"] = sorted(t.full_adapter_grads())

    result = trainer.train_step(micro, hook)
    got["grad_norm"] = result.grad_norm
    got["grads_after_step"] = _caught(trainer.full_adapter_grads)
    got["global_step"] = trainer.global_step
    return got


def misuse(args, out: Path):
    """Every misuse of the step API raises: ``{case: {misuse: (exception type, message)}}``."""
    import torch.distributed as dist

    results = {}
    world = int(os.environ["WORLD_SIZE"])
    for case in args["cases"]:
        results[case["key"]] = _misuse_case(case, world)
        dist.barrier()
    return results


def main():
    scenario, args, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    import torch.distributed as dist

    scenarios = {"equivalence": equivalence, "train": train, "token_mean": token_mean,
                 "activation_checkpointing": activation_checkpointing,
                 "misuse": misuse}  # fmt: skip
    res = scenarios[scenario](args, out)
    rank = dist.get_rank()
    torch.save(res, out / f"result_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
