"""Peak memory of a SmolLM2 training step with and without activation checkpointing.

    python bench/memory.py [--batch 4] [--seq 512] [--router soft]

Each setting runs in its own process (one rank: ZeRO-3, gloo, CPU, fp32) through
the training path itself (``make_plan`` -> ``MoETrainer.build`` ->
``train_step``) on the embedded SmolLM2-135M-Instruct with the demo config's
LoRAMoE adapter. Memory is the kernel's resident-set high-water mark
(``VmHWM``), reset (``/proc/self/clear_refs``) once the model and engine are
built, then two optimizer steps run (the first allocates AdamW's state). Reported:
RSS of the built model, the peak RSS over the two steps and their difference (the
training step's own memory: activations, gradients, optimizer state, transients),
the second step's time, and the first step's loss (must agree: same weights, same
batch; the second step's may differ in the last digits, AdamW's first update
amplifying rounding differences of near-zero gradients).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> dict:
    import torch

    from loramoe_ds.base_model import model_factory
    from loramoe_ds.config import load_run_config
    from loramoe_ds.parallel.engine import MoETrainer
    from loramoe_ds.plan import make_plan

    run = load_run_config(
        ROOT / "configs" / "smollm2_demo.yaml",
        [
            "parallel.ep_size=1",
            f"adapter.router={args.router}",
            f"train.micro_batch_size={args.batch}",
            f"data.max_length={args.seq}",
            f"train.activation_checkpointing={'true' if args.ac else 'false'}",
            f"output.dir={args.out}",
        ],
    )
    plan = make_plan(run, {}, 1, 0)
    trainer = MoETrainer.build(
        model_factory(plan), run.adapter, plan.ds_config, ep_size=1, seed=0,
        optim=plan.optim, lr_schedule=plan.lr_schedule, num_layers=plan.num_layers,
        activation_checkpointing=args.ac,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    vocab = plan.hf_config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 4] = -100  # a prompt quarter without loss, as in SFT
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "task_type": torch.arange(args.batch) % 2}  # fmt: skip
    built = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    first = trainer.train_step([batch])  # step 1: also allocates AdamW state
    t0 = time.perf_counter()
    res = trainer.train_step([batch])
    dt = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return {"ac": args.ac, "built_mib": built / 1024, "peak_mib": peak / 1024,
            "train_mib": (peak - built) / 1024, "step_s": dt,
            "loss": float(first.outputs[0].loss), "loss2": float(res.outputs[0].loss)}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--router", default="soft", choices=["soft", "topk"])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ac", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ac in (0, 1):
            env = dict(os.environ, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                       DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))  # fmt: skip
            cmd = [sys.executable, __file__, "--child", "--ac", str(ac), "--batch",
                   str(args.batch), "--seq", str(args.seq), "--router", args.router,
                   "--out", str(Path(tmp) / f"ac{ac}")]  # fmt: skip
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not lines:
                sys.exit(f"child ac={ac} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
            rows.append(json.loads(lines[0][7:]))
    off, on = rows
    print(f"# bench/memory.py SmolLM2-135M, {args.router} LoRAMoE adapter (demo config), "
          f"batch {args.batch} x {args.seq} tokens, 1 rank ZeRO-3 fp32 CPU, "
          f"threads={os.environ.get('OMP_NUM_THREADS', 'default')}")  # fmt: skip
    print("| activation checkpointing | RSS, model built (MiB) | peak RSS, 2 steps (MiB) "
          "| peak - built (MiB) | step time (s) | loss step 1 | loss step 2 |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {'on' if r['ac'] else 'off'} | {r['built_mib']:.0f} | {r['peak_mib']:.0f} "
            f"| {r['train_mib']:.0f} | {r['step_s']:.1f} | {r['loss']:.6f} | {r['loss2']:.5f} |"
        )
    saved = off["peak_mib"] - on["peak_mib"]
    print(
        f"peak saved: {saved:.0f} MiB ({100 * saved / off['peak_mib']:.0f}% of the peak); "
        f"training memory above the built model {off['train_mib']:.0f} -> "
        f"{on['train_mib']:.0f} MiB ({100 * (1 - on['train_mib'] / off['train_mib']):.0f}% "
        f"less); step time x{on['step_s'] / off['step_s']:.2f}"
    )
    if abs(off["loss"] - on["loss"]) > 1e-6 * max(1.0, abs(off["loss"])):
        sys.exit(f"losses differ: {off['loss']} vs {on['loss']}")


if __name__ == "__main__":
    main()
