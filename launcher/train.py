"""Train a mixture-of-LoRA-experts adapter (LoRAMoE / MoLA) with DeepSpeed.

    deepspeed [--num_gpus N | --hostfile H] launcher/train.py --config run.yaml \
        [--deepspeed ds_configs/X.json] [--resume auto|none|DIR] [--dry-run] [key=value ...]

Also runs under torchrun, ``srun`` (SLURM_* mapped to RANK/WORLD_SIZE/...) and
``mpirun`` (OpenMPI variables). Configs are validated before any process group.
Exit code 75 means "checkpointed on a preemption signal: requeue me".
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="run config (YAML or JSON)")
    ap.add_argument("--deepspeed", "--deepspeed_config", dest="ds_config", help="DeepSpeed JSON")
    ap.add_argument("--resume", default="auto", help="auto | none | checkpoint directory")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    ap.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="section.field=value overrides")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from loramoe_ds.launch.preempt import REQUEUE_EXIT_CODE, PreemptionHandler

    # First, before the heavy imports: a SIGUSR1/SIGTERM from here on means
    # "checkpoint at the next step boundary and exit 75", never a silent death.
    handler = PreemptionHandler().install()
    from loramoe_ds.launch.dist_env import setup_dist_env
    from loramoe_ds.run import make_plan, train
    from loramoe_ds.run_config import load_ds_config, load_run_config

    try:
        run = load_run_config(args.config, args.overrides)
        env = setup_dist_env()
        plan = make_plan(run, load_ds_config(args.ds_config), env.world_size, env.rank)
    except ValueError as e:  # bad input: one clear line, no traceback, before any process group
        print(f"error: {e}", file=sys.stderr)
        return 2
    if env.local_rank == 0:  # one line per node: where this node's ranks think they are
        print(
            f"[dist] node {env.node_rank}/{env.num_nodes} ranks {env.rank}.."
            f"{env.rank + env.local_world_size - 1} of {env.world_size} via {env.launcher}, "
            f"master {env.master_addr}:{env.master_port}",
            flush=True,
        )
    if args.dry_run:
        if env.rank == 0:
            print(plan.describe())
        return 0
    import torch.distributed as dist

    from loramoe_ds.run import prepare_data

    try:
        try:  # the data is validated and tokenised before any model load or DeepSpeed engine
            data = prepare_data(plan)
        except ValueError as e:  # a bad record: file:line: field ..., one line, exit 2
            print(f"error: {e}", file=sys.stderr)
            return 2
        summary = train(
            plan, resume=args.resume, stop_after=args.stop_after, handler=handler, data=data
        )
        if dist.get_rank() == 0:
            print("[done] " + json.dumps(summary), flush=True)
        return REQUEUE_EXIT_CODE if summary["preempted"] else 0
    finally:
        handler.uninstall()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
