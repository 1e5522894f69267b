"""Knowledge retention on a real model: SmolLM2-135M-Instruct, the demo's data and budget.

    python bench/smollm2_retention.py [--out runs/smollm2_retention] [--seeds 0,1,2]
        [--methods base,lora,loramoe_lbc,loramoe_null_sup] [--limit N] [--threads 2]
        [--table-only]

Every method trains from the same base on the demo mix (``configs/smollm2_demo.yaml``:
its data, steps, LR schedule, global batch 8) in one process, one optimizer step
per global batch: the token-mean LM loss and the global-batch aux losses of the
2-rank DeepSpeed demo are exactly these (``tests/distributed``). Methods:

* ``base``: no training;
* ``lora``: peft LoRA on the same linears at the LoRAMoE bank's total rank
  ``E * r`` (24), same alpha and dropout;
* ``loramoe_lbc``: LoRAMoE with the intended LBC (``configs/smollm2_loramoe_lbc.yaml``,
  the published method's routing with the intended fixed point);
* ``loramoe_null_sup``: LoRAMoE with null experts and router supervision
  (``configs/smollm2_demo.yaml``, the shipped default).

Each trained model is scored on the shipped held-out sets (never in the
training mix): knowledge QA by tolerant greedy generation and by log-likelihood
ranking against 3 distractors, downstream macro accuracy, and (LoRAMoE) the
router weight on the knowledge group per layer for knowledge and downstream
inputs. The evaluation never passes a task type. Resumable: each
(method, seed) writes ``<out>/results/<method>__s<seed>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "loramoe_lbc": REPO / "configs" / "smollm2_loramoe_lbc.yaml",
    "loramoe_null_sup": REPO / "configs" / "smollm2_demo.yaml",
}
LABELS = {
    "base": "base (SmolLM2-135M-Instruct)",
    "lora": "peft LoRA r=24",
    "loramoe_lbc": "LoRAMoE + intended LBC",
    "loramoe_null_sup": "LoRAMoE + 2 null + router supervision",
}
METHODS = tuple(LABELS)


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def build(method: str, base: Any, run: Any) -> tuple[Any, list]:
    """The method's model over a copy of ``base`` and its trainable parameters."""
    import copy

    lm = copy.deepcopy(base)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        a = run.adapter
        total_rank = a.rank * max(a.layer_experts(lm.config.num_hidden_layers))
        cfg = LoraConfig(
            r=total_rank, lora_alpha=a.alpha, lora_dropout=a.dropout,
            target_modules=list(a.target_modules),
        )  # fmt: skip
        model = get_peft_model(lm, cfg)
        return model, [p for p in model.parameters() if p.requires_grad]
    from loramoe_ds.model.inject import inject

    for p in lm.parameters():
        p.requires_grad_(False)
    model = inject(lm, run.adapter)
    return model, model.adapter_params()


def train(method: str, model: Any, params: list, run: Any, tok: Any, seed: int) -> dict:
    """The demo's optimisation in one process: AdamW, warm-up + cosine, joint clip."""
    import torch
    from tqdm import tqdm

    from loramoe_ds.data import build_dataloader, demo_path
    from loramoe_ds.lr_schedule import lr_ratio

    t = run.train
    global_batch = t.micro_batch_size * t.grad_accum * 2  # the demo's 2 ranks
    files = [demo_path("train.jsonl") if f == "demo" else f for f in run.data.train_files]
    data_cfg = dataclasses.replace(run.data, seed=seed)
    loader = build_dataloader(
        files, tok, data_cfg, batch_size=global_batch, global_batch=global_batch
    )
    groups: list = params
    if method != "lora":  # the trainer's groups: routers at train.router_lr_scale x the LR
        from loramoe_ds.parallel.settings import OptimizerSettings

        routers = [m.router.weight for m in model.moe_layers()]
        ids = {id(p) for p in routers}
        others = [p for p in params if id(p) not in ids]
        opt_settings = OptimizerSettings(lr=t.lr, router_lr_scale=t.router_lr_scale)
        groups = opt_settings.param_groups(routers, others)
    opt = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_ratio(s + 1, t.warmup_steps, t.max_steps, t.min_lr_ratio)
    )
    moe = method != "lora"
    model.train()
    rows, t0 = [], time.perf_counter()
    it = iter(loader)
    for step in tqdm(range(t.max_steps), desc=f"{method} s{seed}", leave=False):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        if moe:
            out = model(**batch)
            loss, lm = out.loss, out.lm_loss
        else:
            kw = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
            loss = lm = model(**kw).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        sched.step()
        rows.append({"step": step + 1, "lm": float(lm.detach()), "grad_norm": float(norm)})
    model.eval()
    return {
        "steps": t.max_steps,
        "global_batch": global_batch,
        "train_s": round(time.perf_counter() - t0, 1),
        "lm_loss_last5": statistics.fmean(r["lm"] for r in rows[-5:]),
        "trainable_params": sum(p.numel() for p in params),
    }


def one_run(method: str, seed: int, base: Any, tok: Any, args: argparse.Namespace) -> dict:
    import torch

    from loramoe_ds.config import load_run_config
    from loramoe_ds.eval import evaluate_all

    run = load_run_config(CONFIGS.get(method, CONFIGS["loramoe_null_sup"]), args.set)
    torch.manual_seed(seed)
    info: dict[str, Any] = {"method": method, "label": LABELS[method], "seed": seed}
    model = base
    if method != "base":
        model, params = build(method, base, run)
        info["train"] = train(method, model, params, run, tok, seed)
        info["adapter"] = dataclasses.asdict(run.adapter) if method != "lora" else None
    with torch.no_grad():
        res = evaluate_all(model, tok, limit=args.limit, utilisation=method.startswith("loramoe"))
    k, d = res["knowledge"], res["downstream"]
    info["knowledge_gen"] = k["generation"]["accuracy"]
    info["knowledge_ll"] = k["loglik"]["accuracy"]
    info["downstream"] = d["macro_accuracy"]
    info["n"] = {"knowledge": k["n"], "downstream": d["n"]}
    info["knowledge_predictions"] = [
        {key: p.get(key) for key in ("instruction", "gold", "generation", "gen_correct")}
        for p in k["predictions"]
    ]
    u = res.get("utilisation")
    if u:
        info["share"] = u["knowledge_share"]
    return info


def mean_std(vals: list[float]) -> str:
    if not vals:
        return "-"
    m = statistics.fmean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def table(results: list[dict]) -> str:
    """Markdown: mean ± std over seeds; shares as mean over layers (and layers led)."""
    lines = [
        "| method | seeds | knowledge generation % | knowledge LL-rank % | downstream macro % "
        "| know-group share: know / down inputs (layers where know > down) | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        runs = [r for r in results if r["method"] == m]
        if not runs:
            continue
        share = "-"
        if runs[0].get("share"):
            know = [statistics.fmean(r["share"]["knowledge"]) for r in runs]
            down = [statistics.fmean(r["share"]["downstream"]) for r in runs]
            lead = [
                sum(a > b for a, b in zip(r["share"]["knowledge"], r["share"]["downstream"]))
                for r in runs
            ]
            n_layers = len(runs[0]["share"]["knowledge"])
            share = (
                f"{statistics.fmean(know):.3f} / {statistics.fmean(down):.3f} "
                f"({min(lead)}-{max(lead)} of {n_layers})"
            )
        train_s = [r["train"]["train_s"] for r in runs if "train" in r]
        secs = f"{statistics.fmean(train_s):.0f}" if train_s else "-"
        lines.append(
            f"| {LABELS[m]} | {len(runs)} | {mean_std([r['knowledge_gen'] for r in runs])} | "
            f"{mean_std([r['knowledge_ll'] for r in runs])} | "
            f"{mean_std([r['downstream'] for r in runs])} | {share} | {secs} |"
        )
    return "\n".join(lines)


def per_layer(results: list[dict]) -> str:
    """Router share on the knowledge group per layer, mean over seeds, for each LoRAMoE method."""
    out = []
    for m in METHODS:
        runs = [r for r in results if r["method"] == m and r.get("share")]
        if not runs:
            continue
        n = len(runs[0]["share"]["knowledge"])
        know = [statistics.fmean(r["share"]["knowledge"][i] for r in runs) for i in range(n)]
        down = [statistics.fmean(r["share"]["downstream"][i] for r in runs) for i in range(n)]
        out.append(f"{LABELS[m]} (layer: know / down)")
        out.append(
            "  " + "  ".join(f"{i}: {a:.2f}/{b:.2f}" for i, (a, b) in enumerate(zip(know, down)))
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/smollm2_retention")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--limit", type=int, default=None, help="first N of each eval set")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument(
        "--set", nargs="*", default=[], help="run-config overrides, e.g. adapter.null_experts=4"
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; valid: {list(METHODS)}")
    if not args.table_only:
        import torch

        from loramoe_ds.eval import load_model

        torch.set_num_threads(args.threads)
        base, tok = load_model("smollm2")
        for seed in [int(s) for s in args.seeds.split(",")]:
            for m in methods:
                seeds = [0] if m == "base" else [seed]  # the base is deterministic
                path = out / "results" / f"{m}__s{seeds[0]}.json"
                if path.is_file():
                    continue
                info = one_run(m, seeds[0], base, tok, args)
                write_json_atomic(path, info)
                print(
                    f"[{m} s{seeds[0]}] knowledge gen {info['knowledge_gen']:.3f} "
                    f"ll {info['knowledge_ll']:.3f} downstream {info['downstream']:.3f}",
                    flush=True,
                )
    results = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    text = table(results) + "\n\n" + per_layer(results)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
