"""Tiny gloo program that proves a launch path end to end.

Each rank maps its launcher's environment with ``setup_dist_env``, calls
``deepspeed.init_distributed(dist_backend="gloo")``, checks that torch agrees on
rank/world, all-reduces ``rank + 1``, all-gathers ``(node_rank, local_rank,
local_world_size)`` to check the node layout, and writes ``<out>/rank<R>.json``.

With ``--steps N`` it also runs a slow fake training loop that imitates the
trainer's preemption contract (``PreemptionHandler.poll`` at each step, a
"checkpoint" on stop, exit ``REQUEUE_EXIT_CODE``, resume from the checkpoint), so
the Slurm tests can requeue it. Usable as ``python``, ``deepspeed``, ``torchrun``,
``mpirun`` or ``srun`` target::

    mpirun --allow-run-as-root --oversubscribe -np 2 \
        python tests/integration/dist_probe.py --out /tmp/o
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.distributed as dist

from loramoe_ds.launch import REQUEUE_EXIT_CODE, PreemptionHandler, setup_dist_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for rank<R>.json files")
    parser.add_argument("--local_rank", type=int, default=None, help="set by deepspeed")
    parser.add_argument("--expect-world", type=int, default=None)
    parser.add_argument("--expect-nodes", type=int, default=None)
    parser.add_argument("--steps", type=int, default=0, help="fake training steps")
    parser.add_argument("--sleep", type=float, default=0.5, help="seconds per fake step")
    parser.add_argument("--ds-config", default=None, help="also train 2 steps with this JSON")
    parser.add_argument(
        "--ds-set", nargs="*", default=[], help="run-config overrides the JSON is filled from"
    )
    args = parser.parse_args(argv)

    handler = PreemptionHandler().install()  # before anything slow, like the trainer
    denv = setup_dist_env()
    if args.local_rank is not None and args.local_rank != denv.local_rank:
        raise ValueError(f"--local_rank={args.local_rank} but LOCAL_RANK={denv.local_rank}")

    import deepspeed  # after the env mapping, as launcher/train.py does

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    if (dist.get_rank(), dist.get_world_size()) != (denv.rank, denv.world_size):
        raise RuntimeError(
            f"torch sees rank {dist.get_rank()}/{dist.get_world_size()}, "
            f"env says {denv.rank}/{denv.world_size}"
        )
    if args.expect_world is not None and denv.world_size != args.expect_world:
        raise RuntimeError(f"world_size {denv.world_size} != expected {args.expect_world}")
    if args.expect_nodes is not None and denv.num_nodes != args.expect_nodes:
        raise RuntimeError(f"num_nodes {denv.num_nodes} != expected {args.expect_nodes}")

    total = torch.tensor([denv.rank + 1], dtype=torch.int64)
    dist.all_reduce(total)
    expected = denv.world_size * (denv.world_size + 1) // 2
    if total.item() != expected:
        raise RuntimeError(f"all_reduce gave {total.item()}, expected {expected}")

    mine = torch.tensor([denv.node_rank, denv.local_rank, denv.local_world_size])
    layout = [torch.zeros_like(mine) for _ in range(denv.world_size)]
    dist.all_gather(layout, mine)
    layout_rows = [t.tolist() for t in layout]
    slots = {(n, lr) for n, lr, _ in layout_rows}
    if len(slots) != denv.world_size or {n for n, _, _ in layout_rows} != set(
        range(denv.num_nodes)
    ):
        raise RuntimeError(f"inconsistent node layout {layout_rows}")

    # Only one rank "receives a signal"; all must agree after one all_reduce(MAX).
    agree = PreemptionHandler()  # not installed: flag set by hand
    if denv.rank == denv.world_size - 1:
        agree.request_stop()
    if not agree.any_rank_should_stop() or PreemptionHandler().any_rank_should_stop():
        raise RuntimeError("any_rank_should_stop did not agree across ranks")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        **{k: getattr(denv, k) for k in denv.__dataclass_fields__},
        "allreduce_sum": int(total.item()),
        "stop_agreed": True,
        "layout": layout_rows,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }

    if args.ds_config:
        record.update(_ds_config_steps(deepspeed, args.ds_config, args.ds_set))

    status = 0
    if args.steps:
        record["steps"], status = _fake_training(args, denv.rank, handler, out)
    rank_file = out / f"rank{denv.rank}.json"
    if status == 0:
        rank_file.write_text(json.dumps(record, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    if denv.rank == 0:
        print(f"dist_probe: ok world={denv.world_size} launcher={denv.launcher} status={status}")
    return status


def _ds_config_steps(deepspeed, path: str, overrides: list[str]) -> dict:
    """``deepspeed.initialize`` a tiny model with a client torch AdamW and the JSON as the
    trainer hands it over (filled in from a run config with ``overrides``); 2 steps."""
    from loramoe_ds.config import load_ds_config, load_run_config, resolve_ds_config

    run = load_run_config(None, overrides)
    cfg = resolve_ds_config(run, load_ds_config(path), dist.get_world_size(), where=path)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    micro = engine.train_micro_batch_size_per_gpu()
    dtype = next(p for p in engine.module.parameters()).dtype
    losses = []
    for _ in range(2 * engine.gradient_accumulation_steps()):
        x = torch.randn(micro, 16, dtype=dtype, device=engine.device)
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return {
        "ds_config_losses": losses,
        "ds_engine": {
            "micro_batch": micro,
            "grad_accum": engine.gradient_accumulation_steps(),
            "train_batch": engine.train_batch_size(),
            "bf16": engine.bfloat16_enabled(),
            "zero_stage": engine.zero_optimization_stage(),
        },
    }


def _fake_training(args, rank: int, handler: PreemptionHandler, out: Path) -> tuple[list, int]:
    """Slow loop: resume from ``ckpt.json``, log steps, stop+checkpoint on a signal."""
    ckpt = out / "ckpt.json"
    start = json.loads(ckpt.read_text())["next_step"] if ckpt.exists() else 0
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    done = []
    for step in range(start, args.steps):
        time.sleep(args.sleep)
        done.append(step)
        if rank == 0:
            with open(out / "steps.log", "a") as f:
                f.write(f"{step} {restart}\n")
        if handler.poll(step):
            if rank == 0:
                ckpt.write_text(json.dumps({"next_step": step + 1}))
                with open(out / "preempted.log", "a") as f:
                    f.write(f"step={step} restart={restart} signal={handler.received}\n")
            dist.barrier()  # the checkpoint is complete before any rank exits
            return done, REQUEUE_EXIT_CODE
    if rank == 0:
        ckpt.write_text(json.dumps({"next_step": args.steps}))
    return done, 0


if __name__ == "__main__":
    sys.exit(main())
