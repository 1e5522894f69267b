"""Expert-parallel token dispatch vs replicated experts: bytes moved and step time.

Shape legend: T tokens per rank, E experts per adapted linear, R LoRA rank,
D hidden width (the tiny Llama's; FFN width 2D), K top-k, P = ep_size, W ranks.

For each (router, T, E, R, D) it builds a :class:`~loramoe_ds.parallel.engine.MoETrainer`
on a 2-layer tiny Llama (ZeRO-3 base, FFN ``gate/up/down`` adapted) twice:

* ``ep``: ``ep_size = W``, experts sharded, tokens moved by all-to-all;
* ``rep``: ``ep_size = 1``, experts replicated as ZeRO-3 parameters (gathered in
  forward and backward, grads reduce-scattered).

and reports per optimizer step and per rank:

* ``a2a MB``: bytes this rank's all-to-alls sent to *other* ranks (forward +
  backward, all adapted linears; measured by the dispatcher);
* ``unif MB``: the theoretical minimum for token dispatch, for uniform routing
  (a trained or random router deviates, so ``a2a`` can be below it). Top-k: every
  (token, slot) routed to a remote expert moves its input row (D_in) there and
  its output row (D_out) back, twice (forward, backward): uniform routing gives
  ``2 (P-1)/P T K (D_in + D_out)`` values per linear. Soft: every token must
  reach every other EP rank: ``2 (P-1) T (D_in + D_out)`` (our message also
  carries the L gate values per row);
* ``rep MB``: what replication moves instead (ZeRO-3: all-gather in forward, again
  in backward, reduce-scatter of grads): ``3 (W-1)/W E R (D_in + D_out)`` values
  per linear (docs/design.md, "Expert parallelism and dispatch": replicating
  moves about ``E R (D_in + D_out)`` values, here times 3);
* step times (ms, median of the timed steps) of both modes.

The crossover ``T*`` is where the byte counts are equal (token dispatch moves
less below it); ``faster`` says which mode was faster in wall time here. On one
CPU machine gloo "communication" is a memcpy, so wall time is dominated by
compute and Python overhead; the byte columns are what transfers to a cluster.

Run (2 ranks on CPU)::

    python bench/dispatch.py --world 2            # spawns the ranks itself
    deepspeed --num_gpus 2 bench/dispatch.py      # or under the DeepSpeed launcher
    python bench/dispatch.py --device cuda ...    # GPUs: bf16, NCCL

Flags ``--tokens 64,256,1024 --experts 4,16 --ranks 8 --dims 128 --routers topk,soft``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2, help="ranks to spawn (when not launched)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--tokens", type=_ints, default=_ints("64,256,1024"), help="T per rank")
    p.add_argument("--experts", type=_ints, default=_ints("4,16"))
    p.add_argument("--ranks", type=_ints, default=_ints("8"))
    p.add_argument("--dims", type=_ints, default=_ints("128"))
    p.add_argument("--routers", default="topk,soft")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _ds_config(world: int, device: str) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": device == "cuda"},
        "steps_per_print": 10**9,
    }


def _theory(router, T, E, R, D, P, W, elem):
    """(min token-dispatch bytes, replication bytes) per step per rank, 3 FFN linears."""
    K = 2
    linears = [(D, 2 * D), (D, 2 * D), (2 * D, D)]  # gate, up, down (d_in, d_out)
    tok = rep = 0.0
    for din, dout in linears:
        if router == "topk":
            tok += 2 * (P - 1) / P * T * K * (din + dout)
        else:
            tok += 2 * (P - 1) * T * (din + dout)
        rep += 3 * (W - 1) / W * E * R * (din + dout)
    layers = 2
    return tok * layers * elem, rep * layers * elem


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from loramoe_ds.config import AdapterConfig
    from loramoe_ds.parallel.engine import MoETrainer
    from loramoe_ds.parallel.settings import OptimizerSettings
    from loramoe_ds.tiny import tiny_model

    W = int(os.environ["WORLD_SIZE"])
    rows = []
    for router in args.routers.split(","):
        for D in args.dims:
            for R in args.ranks:
                for E in args.experts:
                    for T in args.tokens:
                        row = dict(router=router, T=T, E=E, R=R, D=D)
                        for mode, ep in (("ep", W), ("rep", 1)):
                            if E % ep:
                                continue
                            cfg = AdapterConfig(
                                rank=R, alpha=2.0 * R, dropout=0.0, router=router, top_k=2,
                                num_experts=E, lbc_beta=0.0,
                            )  # fmt: skip

                            def factory(D=D):
                                return tiny_model("llama", vocab_size=256, layers=2, hidden=D)

                            trainer = MoETrainer.build(
                                factory, cfg, _ds_config(W, args.device), ep_size=ep, seed=0,
                                optim=OptimizerSettings(lr=1e-4, grad_clip=1.0), num_layers=2,
                                loss_reduction="micro_batch_mean",
                            )  # fmt: skip
                            rank = dist.get_rank()
                            g = torch.Generator().manual_seed(rank)
                            S = 64 if T >= 64 else T
                            ids = torch.randint(0, 256, (T // S, S), generator=g)
                            batch = {
                                "input_ids": ids,
                                "attention_mask": torch.ones_like(ids),
                                "labels": ids.clone(),
                            }
                            times = []
                            for i in range(args.warmup + args.steps):
                                if i == args.warmup:
                                    trainer.comm.reset()
                                dist.barrier()
                                if args.device == "cuda":
                                    torch.cuda.synchronize()
                                t0 = time.perf_counter()
                                trainer.train_step([batch])
                                if args.device == "cuda":
                                    torch.cuda.synchronize()
                                dist.barrier()
                                times.append(time.perf_counter() - t0)
                            row[f"{mode}_ms"] = 1e3 * statistics.median(times[args.warmup :])
                            if mode == "ep":
                                row["a2a_MB"] = trainer.comm.bytes_remote / args.steps / 1e6
                            elem = 2 if args.device == "cuda" else 4
                            tok, rep = _theory(router, T, E, R, D, W, W, elem)
                            row["min_MB"], row["rep_MB"] = tok / 1e6, rep / 1e6
                            del trainer
                        rows.append(row)
    if dist.get_rank() == 0:
        report(rows, W, args)
    dist.barrier()


def report(rows, W, args) -> None:
    print(f"\nEP token dispatch (ep_size={W}) vs replicated experts (ep_size=1), ZeRO-3, "
          f"{W} ranks, {args.device}; per optimizer step, per rank")  # fmt: skip
    hdr = (
        f"{'router':>6} {'T':>5} {'E':>3} {'R':>3} {'D':>4} | {'a2a MB':>8} {'unif MB':>8} "
        f"{'rep MB':>8} | {'ep ms':>8} {'rep ms':>8} {'faster':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        faster = "ep" if r.get("ep_ms", 1e9) < r.get("rep_ms", 1e9) else "rep"
        print(
            f"{r['router']:>6} {r['T']:>5} {r['E']:>3} {r['R']:>3} {r['D']:>4} | "
            f"{r.get('a2a_MB', float('nan')):8.3f} {r['min_MB']:8.3f} {r['rep_MB']:8.3f} | "
            f"{r.get('ep_ms', float('nan')):8.1f} {r.get('rep_ms', float('nan')):8.1f} {faster:>6}"
        )
    print("\nCrossover (tokens per rank where both move the same bytes; dispatch pays below):")
    seen = set()
    for r in rows:
        key = (r["router"], r["E"], r["R"], r["D"])
        if key in seen:
            continue
        seen.add(key)
        per_token = r["min_MB"] / r["T"]
        t_bytes = r["rep_MB"] / per_token
        same = [x for x in rows if (x["router"], x["E"], x["R"], x["D"]) == key]
        ep_wins = [x["T"] for x in same if x.get("ep_ms", 1e9) < x.get("rep_ms", 1e9)]
        wall = f"ep faster in wall time at T in {ep_wins}" if ep_wins else "rep faster at all T"
        print(f"  {key[0]:>5} E={key[1]:<3} R={key[2]:<3} D={key[3]:<4}: T* = {t_bytes:8.1f}"
              f" tokens  ({wall})")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


def spawn(args, argv) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(args.world):
        env = dict(os.environ)
        env.update(
            RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(args.world),
            LOCAL_WORLD_SIZE=str(args.world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
            OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        )  # fmt: skip
        if args.device == "cpu":
            env["DS_ACCELERATOR"] = "cpu"
        out = None if r == 0 else subprocess.DEVNULL
        procs.append(subprocess.Popen([sys.executable, __file__, *argv], env=env, stdout=out,
                                      stderr=out))  # fmt: skip
    return max(p.wait() for p in procs)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if "RANK" not in os.environ:
        return spawn(args, argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
