"""Do LoRAMoE's routers specialise? The LBC's two variants side by side.

    python bench/specialisation.py [--out runs/specialisation] [--docs docs]
        [--steps 300] [--delta 0.1] [--beta 0.1] [--router-lr-mult 10] [--quick]

LoRAMoE (6 rank-4 experts on every linear of the 4 layers, as in
``bench/forgetting.py``; ``--targets ffn`` for the FFN only) is fine-tuned on the fact world
(``bench/fact_world.py``: the pretrained tiny Llama, downstream tasks + the
knowledge QA records of train-split facts, ``task_type`` 1) once with
``lbc_variant="intended"`` and once with ``"published"``: same seed, same
batches, same init. Every ``--every`` steps, for each decoder layer, the
router weight on the knowledge group (experts ``[0, E/2)``,
``loramoe_ds.model.losses.knowledge_group``) is averaged over the tokens of
held-out knowledge questions and of held-out downstream examples (mean over
the layer's adapted linears). Separation = knowledge-input share minus
downstream-input share: the LBC's fixed points predict ``+delta`` (intended)
and ``-delta`` (published) once the routers have converged.

Writes ``<out>/<variant>.json`` (the traces), ``<out>/table.md`` and
``specialisation.png`` (in ``--docs`` when given).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fact_world import PretrainConfig, World, WorldConfig  # noqa: E402

VARIANTS = ("intended", "published")


def separation(trace: dict[str, Any]) -> list[float]:
    """Mean over layers of (knowledge-input share - downstream-input share), per checkpoint."""
    return [
        statistics.fmean(k - d for k, d in zip(ks, ds))
        for ks, ds in zip(trace["knowledge"], trace["downstream"])
    ]


def run_variant(variant: str, world: World, base: Any, args: argparse.Namespace) -> dict:
    """Trains LoRAMoE with one LBC variant, recording per-layer shares every ``--every`` steps."""
    import fact_world_train as fwt

    method = fwt.Method(
        f"loramoe_{variant}",
        "moe",
        variant,
        dict(
            target_modules=fwt.ALL_TARGETS if args.targets == "all" else fwt.FFN_TARGETS,
            rank=fwt.RANK,
            alpha=32.0,
            dropout=0.05,
            num_experts=fwt.EXPERTS,
            lbc_delta=args.delta,
            lbc_beta=args.beta,
            lbc_variant=variant,
        ),
    )
    model, _ = fwt.build(method, base, args.seed)
    model.to(args.device)
    routers = [p for n, p in model.adapter_named_parameters() if ".router." in n]
    experts = [p for n, p in model.adapter_named_parameters() if ".router." not in n]
    recs = world.downstream(args.per_task, "train")
    recs += world.knowledge_train(round(args.know_frac * len(recs)))
    know = [world.fact_record(f) for f in world.facts_of("heldout")][: args.eval_n]
    down = world.downstream(max(1, args.eval_n // 4), "eval")
    trace: dict[str, Any] = {"step": [], "knowledge": [], "downstream": [], "lbc": []}

    def measure(step: int, m: Any) -> None:
        if step % args.every and step != args.steps:
            return
        trace["step"].append(step)
        trace["knowledge"].append(fwt.knowledge_shares(m, know, args.device))
        trace["downstream"].append(fwt.knowledge_shares(m, down, args.device))

    measure(0, model)
    # Two AdamW parameter groups: experts at --lr, routers at --lr * --router-lr-mult.
    params = [
        {"params": experts, "lr": args.lr},
        {"params": routers, "lr": args.lr * args.router_lr_mult},
    ]
    t0 = time.perf_counter()
    info = fwt.train(
        method,
        model,
        params,
        recs,
        args.steps,
        args.lr,
        args.seed,
        args.batch_size,
        args.device,
        callback=measure,
        log=lambda s: print(s, flush=True),
    )
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    sep = separation(trace)
    final_k, final_d = trace["knowledge"][-1], trace["downstream"][-1]
    return {
        "variant": variant,
        "delta": args.delta,
        "beta": args.beta,
        "lr": args.lr,
        "router_lr": args.lr * args.router_lr_mult,
        "n_records": len(recs),
        "train": info,
        "trace": trace,
        "separation": sep,
        "final_layer_separation": [k - d for k, d in zip(final_k, final_d)],
    }


def format_table(runs: Sequence[dict]) -> str:
    """Per variant: separation at each checkpoint and the final per-layer shares."""
    lines = [
        "| variant | step | mean separation | layers with know > down | per layer know / down |"
    ]
    lines.append("|---|---|---|---|---|")
    for r in runs:
        tr = r["trace"]
        for i, step in enumerate(tr["step"]):
            ks, ds = tr["knowledge"][i], tr["downstream"][i]
            pos = sum(k > d for k, d in zip(ks, ds))
            per = ", ".join(f"{k:.3f}/{d:.3f}" for k, d in zip(ks, ds))
            lines.append(
                f"| {r['variant']} | {step} | {r['separation'][i]:+.4f} | {pos}/{len(ks)} | {per} |"
            )
    return "\n".join(lines)


def plot(runs: Sequence[dict], path: Path) -> None:
    """Per-layer knowledge-group share over steps (both variants) and the mean separation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, r in zip(axes[:2], runs):
        tr = r["trace"]
        n_layers = len(tr["knowledge"][0])
        for layer in range(n_layers):
            c = colors[layer % len(colors)]
            ax.plot(
                tr["step"],
                [k[layer] for k in tr["knowledge"]],
                "-",
                color=c,
                label=f"layer {layer}: knowledge inputs",
            )
            ax.plot(tr["step"], [d[layer] for d in tr["downstream"]], "--", color=c,
                    label=f"layer {layer}: downstream inputs")  # fmt: skip
        d = r["delta"]
        for y in (0.5, (1 + d) / 2, (1 - d) / 2):
            ax.axhline(y, color="gray", lw=0.8, ls=":" if y != 0.5 else "-")
        ax.set_title(
            f"lbc_variant={r['variant']} (delta {d}, beta {r['beta']}, router LR "
            f"{r['router_lr']:g})",
            fontsize=9,
        )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("router weight on knowledge experts [0, E/2)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2, loc="best")
    for i, r in enumerate(runs):
        axes[2].plot(r["trace"]["step"], r["separation"], "-o", ms=3, color=colors[i],
                     label=r["variant"])  # fmt: skip
        axes[2].axhline(r["delta"] if r["variant"] == "intended" else -r["delta"],
                        color=colors[i], ls=":", lw=1)  # fmt: skip
    axes[2].axhline(0, color="gray", lw=0.8)
    axes[2].set_title("separation = share(knowledge inputs) - share(downstream inputs),\n"
                      "mean over layers; dotted: fixed point +/- delta", fontsize=9)  # fmt: skip
    axes[2].set_xlabel("optimizer step")
    axes[2].legend(fontsize=8)
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/specialisation")
    ap.add_argument("--docs", default=None, help="write specialisation.png here (e.g. docs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=25, help="measure shares every k steps")
    ap.add_argument("--targets", default="all", choices=["all", "ffn"], help="as forgetting.py")
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=3e-3, help="expert LR (peak)")
    ap.add_argument("--router-lr-mult", type=float, default=1.0, help="router LR = lr * this")
    ap.add_argument("--per-task", type=int, default=200)
    ap.add_argument("--know-frac", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-n", type=int, default=200, help="inputs per type for the shares")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-root", default=None)
    ap.add_argument("--quick", action="store_true")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from fact_world import pretrained_base
    from forgetting import QUICK_PRETRAIN, QUICK_WORLD

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wcfg, pcfg = WorldConfig(), PretrainConfig()
    if args.quick:
        wcfg, pcfg = QUICK_WORLD, QUICK_PRETRAIN
        args.steps, args.every, args.per_task, args.eval_n = 6, 3, 8, 16
        args.cache_root = args.cache_root or str(out / "cache")
    world = World(wcfg)
    base, _ = pretrained_base(wcfg, pcfg, args.cache_root, args.device)
    runs = []
    for variant in VARIANTS:
        print(f"== {variant}", flush=True)
        r = run_variant(variant, world, base, args)
        (out / f"{variant}.json").write_text(json.dumps(r, indent=1))
        print(f"   separation by checkpoint: {[round(s, 4) for s in r['separation']]}")
        runs.append(r)
    table = format_table(runs)
    (out / "table.md").write_text(table + "\n")
    plot(runs, Path(args.docs or out) / "specialisation.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
