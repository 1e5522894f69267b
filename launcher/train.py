"""Train a mixture-of-LoRA-experts adapter (LoRAMoE / MoLA) with DeepSpeed.

    deepspeed [--num_gpus N | --hostfile H] launcher/train.py --config run.yaml \
        [--deepspeed ds_configs/X.json] [--resume auto|none|DIR] [--dry-run] [key=value ...]

    # the plan for a cluster, on a laptop (no process group, no GPU):
    python launcher/train.py --config run.yaml --dry-run --nodes 4 --gpus-per-node 8

Also runs under torchrun, ``srun`` (SLURM_* mapped to RANK/WORLD_SIZE/...) and
``mpirun`` (OpenMPI variables). Configs are validated before any process group.
Exit codes (:mod:`loramoe_ds.launch.exit_codes`): 0 done, 2 bad input, 65 non-finite
stop, 74 checkpoint not written, 75 preempted (requeue), 76 a peer rank died or went
silent (requeue); every failure but a bug is one line on stderr.
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
    ap.add_argument(
        "--world-size", type=int, default=None, help="--dry-run: plan for N ranks in all"
    )
    ap.add_argument("--nodes", type=int, default=None, help="--dry-run: plan for N nodes ...")
    ap.add_argument("--gpus-per-node", type=int, default=None, help="... of G GPUs (ranks) each")
    ap.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="section.field=value overrides")
    return ap.parse_args(argv)


def planned_topology(args) -> tuple[int, int | None] | None:
    """``(world size, GPUs per node or None)`` asked for with ``--dry-run``, or None.

    ``--world-size N``, or ``--nodes N --gpus-per-node G`` (world ``N x G``), or
    ``--world-size`` with one of the two (which must divide it).

    Raises:
        ValueError: Without ``--dry-run`` (a real run takes its topology from the
            launcher), for values < 1, or for numbers that do not agree.
    """
    world, nodes, gpn = args.world_size, args.nodes, args.gpus_per_node
    given = {k: v for k, v in (("--world-size", world), ("--nodes", nodes),
                               ("--gpus-per-node", gpn)) if v is not None}  # fmt: skip
    if not given:
        return None
    if not args.dry_run:
        raise ValueError(
            f"{', '.join(given)} plan a topology for --dry-run only; a real run takes its "
            "world size from the launcher (deepspeed, torchrun, srun, mpirun)"
        )
    for flag, v in given.items():
        if v < 1:
            raise ValueError(f"{flag} {v}: must be >= 1")
    if world is None:
        if nodes is None or gpn is None:
            raise ValueError("give --world-size N, or both --nodes N and --gpus-per-node G")
        return nodes * gpn, gpn
    if nodes is not None and gpn is not None and nodes * gpn != world:
        raise ValueError(
            f"--world-size {world} but --nodes {nodes} x --gpus-per-node {gpn} = {nodes * gpn}"
        )
    if gpn is None and nodes is not None:
        if world % nodes:
            raise ValueError(f"--world-size {world} is not a multiple of --nodes {nodes}")
        gpn = world // nodes
    if gpn is not None and world % gpn:
        raise ValueError(f"--world-size {world} is not a multiple of --gpus-per-node {gpn}")
    return world, gpn


def main(argv=None) -> int:
    args = parse_args(argv)
    from loramoe_ds.launch.preempt import REQUEUE_EXIT_CODE, PreemptionHandler

    # First, before the heavy imports: a SIGUSR1/SIGTERM from here on means
    # "checkpoint at the next step boundary and exit 75", never a silent death.
    handler = PreemptionHandler().install()
    from loramoe_ds.config import load_ds_config, load_run_config
    from loramoe_ds.launch.dist_env import setup_dist_env
    from loramoe_ds.plan import check_accelerator, check_attention, make_plan
    from loramoe_ds.run import train

    env = None
    try:
        topology = planned_topology(args)
        run = load_run_config(args.config, args.overrides)
        ds_user = load_ds_config(args.ds_config)
        if topology is not None:  # a dry run for the cluster you will use: no process group
            handler.uninstall()
            plan = make_plan(run, ds_user, topology[0], 0, topology[1], resume=args.resume)
            print(plan.describe())
            return 0
        check_accelerator(run.train.precision)  # no silent CPU fallback of a GPU run
        check_attention(run.model.attn_implementation)
        env = setup_dist_env()
        plan = make_plan(run, ds_user, env.world_size, env.rank, resume=args.resume)
    except ValueError as e:  # bad input: one clear line, no traceback, before any process group
        hint = ""
        if args.dry_run and env is not None and env.world_size == 1 and "world size" in str(e):
            hint = (
                " (this dry run planned for 1 process; pass --world-size N, or --nodes N "
                "--gpus-per-node G, to plan for your cluster)"
            )
        print(f"error: {e}{hint}", file=sys.stderr)
        handler.uninstall()
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
        handler.uninstall()
        return 0
    if env.rank == 0 and plan.cost is not None and plan.cost.auto:  # what auto chose
        print(f"[plan] {plan.cost.choice()}\n[plan] {plan.describe_placements()}", flush=True)
    import torch.distributed as dist

    from loramoe_ds.launch import exit_codes
    from loramoe_ds.parallel.checkpoint import (
        CheckpointDamagedError,
        CheckpointRefusedError,
        CheckpointSaveError,
    )
    from loramoe_ds.parallel.nonfinite import NonFiniteStopError
    from loramoe_ds.run import prepare_data
    from loramoe_ds.train_loop.trackers import TrackerStartError

    try:
        try:  # the data is validated and tokenised before any model load or DeepSpeed engine
            data = prepare_data(plan)
        except ValueError as e:  # a bad record: file:line: field ..., one line, exit 2
            print(f"error: {e}", file=sys.stderr)
            return exit_codes.BAD_INPUT
        summary = train(
            plan, resume=args.resume, stop_after=args.stop_after, handler=handler, data=data
        )
        if dist.get_rank() == 0:
            print("[done] " + json.dumps(summary), flush=True)
        return REQUEUE_EXIT_CODE if summary["preempted"] else exit_codes.OK
    except (CheckpointDamagedError, CheckpointRefusedError, TrackerStartError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except CheckpointSaveError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.SAVE_FAILED
    except NonFiniteStopError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.NONFINITE
    except exit_codes.PeerLostError as e:
        print(f"error: rank {env.rank}: {e}", file=sys.stderr)
        # With a dead or frozen peer the process group cannot be torn down cleanly (its
        # destructors wait on the peer): leave at once, the files are already closed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_codes.PEER_LOST)
    finally:
        handler.uninstall()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
