"""Forgetting vs learning in a controlled fact world: full SFT, LoRA, LoRAMoE (no LBC,
published LBC, intended LBC) and MoLA, 3 seeds x 2 data sizes.

    python bench/forgetting.py [--out runs/forgetting] [--docs docs] [--device cpu|cuda]
        [--methods full_sft,lora,...] [--sizes 1,8] [--seeds 0,1,2] [--quick]
        [--table-only]

A tiny Llama is pretrained (once, cached) on a generated world of 640 facts
until it knows them (``bench/fact_world.py``); every method then fine-tunes
a copy on downstream tasks plus a small share of knowledge QA records
(``task_type`` 1, train-split facts only) with one loop
(``bench/fact_world_train.py``). Knowledge is scored on *every* held-out fact
(never in the SFT mix): log-likelihood ranking of the gold answer against 3
distractors, and greedy generation counted correct when the gold answer is
among the first 4 generated tokens (format-tolerant). Downstream: exact match
on 50 fresh examples per task, macro mean.

Data sizes: size k = ``k * per_task`` records per downstream task (nested)
plus ``know_frac`` as many knowledge records; each run makes ``epochs``
passes, so 8x also means 8x the optimisation (the LoRAMoE paper's regime).

Resumable: each (method, size, seed) writes ``<out>/results/<key>.json``; a
rerun skips finished keys. Table and figure are rebuilt from what exists.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fact_world import PretrainConfig, World, WorldConfig  # noqa: E402

QUICK_WORLD = WorldConfig(n_entities=16)
QUICK_PRETRAIN = PretrainConfig(
    layers=4, hidden=32, intermediate=64, steps=100, batch_size=16, lr=1e-2
)


def run_key(method: str, size: int, seed: int) -> str:
    """File stem of one run's result, e.g. ``lora__8x__s0``."""
    return f"{method}__{size}x__s{seed}"


def make_plan(methods: Sequence[str], sizes: Sequence[int], seeds: Sequence[int]) -> list:
    """Seed-major order, so a cut-short run leaves complete seeds of every cell."""
    return [(m, z, s) for s in seeds for z in sizes for m in methods]


def pending(plan: Sequence[tuple[str, int, int]], results_dir: Path) -> list:
    return [p for p in plan if not (results_dir / f"{run_key(*p)}.json").is_file()]


def write_json_atomic(path: Path, obj: Any) -> None:
    """JSON via a temp file + rename (a crash never leaves half a result)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation (n-1; 0 for one value) of the non-None values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return statistics.fmean(vals), sd, len(vals)


def summarize(result: dict, base: dict) -> dict[str, float | None]:
    """Accuracies (0-1), retained (after / base) and downstream gain (points) of one run."""
    k, kb = result["knowledge"], base["knowledge"]
    out: dict[str, float | None] = {
        "ll": k["ll_acc"],
        "ll_pool": k.get("ll_pool_acc"),
        "gen": k["gen_acc"],
        "ll_retained": k["ll_acc"] / kb["ll_acc"] if kb["ll_acc"] else None,
        "gen_retained": k["gen_acc"] / kb["gen_acc"] if kb["gen_acc"] else None,
        "down": result["downstream"]["macro"],
        "gain": 100.0 * (result["downstream"]["macro"] - base["downstream"]["macro"]),
        "share_know": None,
        "share_down": None,
    }
    if result.get("shares"):
        out["share_know"] = statistics.fmean(result["shares"]["knowledge"])
        out["share_down"] = statistics.fmean(result["shares"]["downstream"])
    return out


def aggregate(results: Sequence[dict], base: dict) -> list[dict[str, Any]]:
    """One row per (method, size): mean and std over seeds of every summary metric."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["size"]), []).append(r)
    rows = []
    for (method, size), runs in groups.items():
        sums = [summarize(r, base) for r in runs]
        row: dict[str, Any] = {
            "method": method,
            "label": runs[0]["label"],
            "size": size,
            "seeds": sorted(r["seed"] for r in runs),
            "steps": runs[0]["train"]["steps"],
            "trainable_params": runs[0]["train"]["trainable_params"],
            "train_s": statistics.fmean(r["train"]["train_s"] for r in runs),
        }
        for key in sums[0]:
            row[key] = mean_std([s[key] for s in sums])
        rows.append(row)
    return rows


def paired(results: Sequence[dict], base: dict, a: str, b: str) -> list[dict[str, Any]]:
    """Per size: method ``a`` minus method ``b`` on the seeds both ran (same seed = same
    batches, same adapter init), mean ± std of the per-seed differences of each metric.

    Returns:
        One dict per size: ``size, seeds`` and ``(mean, std, n)`` per metric key.
    """
    by = {(r["method"], r["size"], r["seed"]): summarize(r, base) for r in results}
    out = []
    for size in sorted({r["size"] for r in results}):
        seeds = sorted(s for (m, z, s) in by if m == a and z == size and (b, size, s) in by)
        if not seeds:
            continue
        row: dict[str, Any] = {"size": size, "seeds": seeds}
        for key in ("ll", "ll_pool", "gen", "gain"):
            row[key] = mean_std([by[(a, size, s)][key] - by[(b, size, s)][key] for s in seeds])
        out.append(row)
    return out


def format_paired(rows: Sequence[dict], a: str, b: str) -> str:
    """Markdown table of :func:`paired` (points)."""
    lines = [
        f"Paired per seed, {a} minus {b} (points, mean ± std over seeds):",
        "",
        "| data | seeds | LL-rank | LL vs pool | generation | downstream gain "
        "| generation, gain in standard errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']}x | {len(r['seeds'])} | {fmt(r['ll'], sign=True)} | "
            f"{fmt(r['ll_pool'], sign=True)} | {fmt(r['gen'], sign=True)} | "
            f"{fmt(r['gain'], 1.0, True)} | {in_se(r['gen'])}, {in_se(r['gain'])} |"
        )
    return "\n".join(lines)


def in_se(ms: tuple[float | None, float | None, int]) -> str:
    """The mean difference in standard errors of the mean, ``m / (s / sqrt(n))``."""
    m, s, n = ms
    if m is None or n < 2 or not s:
        return "-"
    return f"{m / (s / math.sqrt(n)):+.1f}"


def fmt(
    ms: tuple[float | None, float | None, int], scale: float = 100.0, sign: bool = False
) -> str:
    """``mean ± std`` (std only with 2+ seeds), scaled (100: fractions as percent)."""
    m, s, n = ms
    if m is None:
        return "-"
    body = f"{m * scale:+.1f}" if sign else f"{m * scale:.1f}"
    return body + (f" ± {s * scale:.1f}" if n > 1 else "")


def format_table(rows: Sequence[dict], base: dict, order: Sequence[str]) -> str:
    """Markdown table (accuracies in %, gain in points), method order then size."""
    rank = {m: i for i, m in enumerate(order)}
    rows = sorted(rows, key=lambda r: (rank.get(r["method"], 99), r["size"]))
    kb, db = base["knowledge"], base["downstream"]
    lines = [
        "| method | data | steps | seeds | knowledge LL-rank % | knowledge generation % | "
        "LL-rank vs whole pool % | retained LL % | retained gen % | downstream % | gain (pts) | "
        "know-group share: know / down inputs | trainable |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| base (pretrained) | - | - | - | {100 * kb['ll_acc']:.1f} | {100 * kb['gen_acc']:.1f} "
        f"| {100 * kb['ll_pool_acc']:.1f} | 100 | 100 | {100 * db['macro']:.1f} | 0 | - | - |",
    ]
    for r in rows:
        share = "-"
        if r["share_know"][0] is not None:
            share = f"{r['share_know'][0]:.3f} / {r['share_down'][0]:.3f}"
        lines.append(
            f"| {r['label']} | {r['size']}x | {r['steps']} | {len(r['seeds'])} | "
            f"{fmt(r['ll'])} | {fmt(r['gen'])} | {fmt(r['ll_pool'])} | {fmt(r['ll_retained'])} | "
            f"{fmt(r['gen_retained'])} | {fmt(r['down'])} | {fmt(r['gain'], 1.0, True)} | "
            f"{share} | {r['trainable_params'] / 1e3:.0f}k |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[dict], base: dict, path: Path) -> None:
    """Knowledge accuracy (LL ranking, generation) vs downstream gain; 1x -> 8x lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    sizes = sorted({r["size"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, key, title, bkey in (
        (axes[0], "ll", "held-out facts, LL ranking vs 3 distractors", "ll_acc"),
        (axes[1], "gen", "held-out facts, greedy generation (tolerant)", "gen_acc"),
    ):
        for i, m in enumerate(methods):
            pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["size"])
            c = colors[i % len(colors)]
            xs = [r["gain"][0] for r in pts]
            ys = [100 * r[key][0] for r in pts]
            ax.plot(xs, ys, "-", color=c, lw=1, alpha=0.6)
            for r, x, y in zip(pts, xs, ys):
                mk = "o" if r["size"] == sizes[0] else "s"
                ax.errorbar(
                    x, y, xerr=r["gain"][1], yerr=100 * r[key][1], fmt=mk, color=c, ms=6, capsize=2
                )
            ax.plot([], [], "-o", color=c, label=pts[0]["label"])
        ax.axhline(100 * base["knowledge"][bkey], color="gray", ls="--", lw=1, label="base")
        ax.set_xlabel("downstream gain over base (macro exact match, points)")
        ax.set_ylabel("knowledge accuracy %")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(
        f"Forgetting vs learning, fact-world Llama (circle {sizes[0]}x, square {sizes[-1]}x "
        "downstream data; bars: std over seeds)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(out: Path, docs: Path | None, order: Sequence[str]) -> str:
    """Rebuilds ``table.md``, ``summary.json`` and the figure from finished results."""
    if not (out / "base.json").is_file():
        return "no base evaluation yet"
    base = json.loads((out / "base.json").read_text())
    results = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    if not results:
        return "no finished runs yet"
    rows = aggregate(results, base)
    table = format_table(rows, base, order)
    for a, b, a_name, b_name in (
        ("loramoe_intended", "loramoe_published", "intended", "published"),
        ("loramoe_null_sup", "lora", "null experts + supervision", "LoRA"),
        ("loramoe_null_sup", "loramoe_intended", "null experts + supervision", "intended LBC"),
    ):
        pair = paired(results, base, a, b)
        if pair:
            table += "\n\n" + format_paired(pair, a_name, b_name)
    (out / "table.md").write_text(table + "\n")
    write_json_atomic(out / "summary.json", {"base": base, "rows": rows})
    plot(rows, base, (docs or out) / "forgetting.png")
    return table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/forgetting")
    ap.add_argument("--docs", default=None, help="write forgetting.png here (e.g. docs)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda when a GPU is lent")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=None, help="comma list (default: all)")
    ap.add_argument("--sizes", default="1,8", help="multiples of --per-task")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--per-task", type=int, default=60, help="1x records per downstream task")
    ap.add_argument("--know-frac", type=float, default=0.1, help="knowledge / downstream records")
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument(
        "--targets",
        default="all",
        choices=["all", "ffn"],
        help="adapted linears of every adapter method: all = q,k,v,o,gate,up,down; ffn = "
        "gate,up,down (the LoRAMoE paper; too weak to learn the tasks in this world)",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--full-lr", type=float, default=3e-3)
    ap.add_argument("--adapter-lr", type=float, default=3e-3)
    ap.add_argument("--delta", type=float, default=0.1, help="LBC delta")
    ap.add_argument("--beta", type=float, default=0.1, help="LBC beta")
    ap.add_argument("--sup", type=float, default=1.0, help="router supervision coefficient")
    ap.add_argument("--router-lr-mult", type=float, default=1.0, help="router LR / adapter LR")
    ap.add_argument("--eval-per-task", type=int, default=50)
    ap.add_argument("--cache-root", default=None, help="pretrained-world cache (~/.cache/...)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny world and model")
    ap.add_argument("--table-only", action="store_true")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import fact_world_train as fwt

    out = Path(args.out)
    targets = fwt.ALL_TARGETS if args.targets == "all" else fwt.FFN_TARGETS
    methods = fwt.make_methods(args.delta, args.beta, targets, args.sup)
    order = list(methods)
    docs = Path(args.docs) if args.docs else None
    if args.table_only:
        print(report(out, docs, order))
        return 0
    import torch
    from fact_world import pretrained_base

    torch.set_num_threads(args.threads)
    wcfg, pcfg = WorldConfig(), PretrainConfig()
    if args.quick:
        wcfg, pcfg = QUICK_WORLD, QUICK_PRETRAIN
        args.per_task, args.eval_per_task, args.epochs = 4, 4, 1.0
        args.cache_root = args.cache_root or str(out / "cache")
    chosen = args.methods.split(",") if args.methods else order
    unknown = sorted(set(chosen) - set(methods))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; valid: {order}")
    sizes = [int(s) for s in args.sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    world = World(wcfg)
    (out / "results").mkdir(parents=True, exist_ok=True)
    setup = {
        "world": asdict(wcfg),
        "pretrain": asdict(pcfg),
        "per_task": args.per_task,
        "know_frac": args.know_frac,
        "epochs": args.epochs,
        "targets": args.targets,
        "batch_size": args.batch_size,
        "full_lr": args.full_lr,
        "adapter_lr": args.adapter_lr,
        "delta": args.delta,
        "beta": args.beta,
        "eval_per_task": args.eval_per_task,
    }
    meta_file = out / "meta.json"
    if meta_file.is_file() and json.loads(meta_file.read_text())["setup"] != setup:
        raise ValueError(f"{meta_file} was made with another setup; use another --out")
    meta = {
        "setup": setup,
        "host": platform.node(),
        "cpu": platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
    }
    write_json_atomic(meta_file, meta)
    t0 = time.perf_counter()
    base, pinfo = pretrained_base(wcfg, pcfg, args.cache_root, args.device)
    print(f"pretrained base ready in {time.perf_counter() - t0:.0f}s ({pinfo})", flush=True)
    eval_down = world.downstream(args.eval_per_task, "eval")
    if not (out / "base.json").is_file():
        kb = fwt.score_knowledge(base, world, args.device)
        db = fwt.score_downstream(base, eval_down, args.device)
        write_json_atomic(out / "base.json", {"knowledge": kb, "downstream": db, "pretrain": pinfo})
        print(f"base: LL {kb['ll_acc']:.3f} gen {kb['gen_acc']:.3f} down {db['macro']:.3f}")
    plan = make_plan(chosen, sizes, seeds)
    todo = pending(plan, out / "results")
    print(f"{len(plan) - len(todo)} of {len(plan)} runs cached; {len(todo)} to go", flush=True)
    for name, size, seed in todo:
        method = methods[name]
        n_down = args.per_task * size
        recs = world.downstream(n_down, "train")
        recs += world.knowledge_train(max(1, round(args.know_frac * len(recs))))
        steps = math.ceil(args.epochs * len(recs) / args.batch_size)
        lr = args.full_lr if method.kind == "full" else args.adapter_lr
        print(f"== {run_key(name, size, seed)}: {len(recs)} records, {steps} steps", flush=True)
        t1 = time.perf_counter()
        model, params = fwt.build(method, base, seed)
        if method.kind == "moe" and args.router_lr_mult != 1.0:
            from loramoe_ds.parallel.settings import OptimizerSettings

            routers = [m.router.weight for m in model.moe_layers()]
            ids = {id(p) for p in routers}
            others = [p for p in params if id(p) not in ids]
            opt = OptimizerSettings(lr=lr, router_lr_scale=args.router_lr_mult)
            params = opt.param_groups(routers, others)
        model.to(args.device)
        info = fwt.train(method, model, params, recs, steps, lr, seed, args.batch_size, args.device)
        result = {
            "method": name,
            "label": method.label,
            "adapter": method.adapter,
            "size": size,
            "seed": seed,
            "lr": lr,
            "n_records": len(recs),
            "train": info,
            "knowledge": fwt.score_knowledge(model, world, args.device),
            "downstream": fwt.score_downstream(model, eval_down, args.device),
        }
        if method.kind == "moe":
            know = [world.fact_record(f) for f in world.facts_of("heldout")]
            result["shares"] = {
                "knowledge": fwt.knowledge_shares(model, know, args.device),
                "downstream": fwt.knowledge_shares(model, eval_down, args.device),
            }
        result["wall_s"] = round(time.perf_counter() - t1, 1)
        write_json_atomic(out / "results" / f"{run_key(name, size, seed)}.json", result)
        s = summarize(result, json.loads((out / "base.json").read_text()))
        print(
            f"   {result['wall_s']}s: "
            + ", ".join(f"{k} {v:.3f}" for k, v in s.items() if v is not None),
            flush=True,
        )
        report(out, docs, order)
    print(report(out, docs, order))
    return 0


if __name__ == "__main__":
    sys.exit(main())
