"""Evaluate a base model, an adapter or a full fine-tune: knowledge QA, downstream, utilisation.

    python launcher/evaluate.py --model smollm2|DIR [--adapter DIR] [--limit N] \
        [--out results.json] [--plot util.png] [--heatmap experts.png] [--device cpu]
    python launcher/evaluate.py --compare before.json after.json

No DeepSpeed: an adapter directory is loaded onto the plain HF model, a full
fine-tune checkpoint is an HF directory passed as ``--model``. fp32 by default
(bf16 is far slower on CPUs without bf16 instructions). Only rank 0 (``RANK``
unset or 0) prints or writes files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="'smollm2' or a Hugging Face model directory")
    ap.add_argument("--adapter", help="adapter directory (loramoe_ds.save_adapter)")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    ap.add_argument("--knowledge", help="knowledge JSONL (default: shipped eval set)")
    ap.add_argument("--downstream", help="downstream JSONL (default: shipped eval set)")
    ap.add_argument("--limit", type=int, default=None, help="first N records of each set")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--system-prompt", default=None, help="chat system prompt used in training")
    ap.add_argument("--template", default="auto", choices=["auto", "chat", "plain"])
    ap.add_argument("--max-new-tokens", type=int, default=16, help="knowledge QA budget")
    ap.add_argument("--no-utilisation", action="store_true")
    ap.add_argument("--out", help="write results JSON here")
    ap.add_argument("--plot", help="utilisation PNG (adapter models)")
    ap.add_argument("--heatmap", help="per-expert heatmap PNG (adapter models)")
    ap.add_argument(
        "--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two results JSONs"
    )
    ap.add_argument(
        "--lm-eval-tasks",
        default=None,
        help="comma-separated lm-evaluation-harness tasks run beside the own scores "
        "(shipped: loramoe = loramoe_knowledge_gen,loramoe_knowledge_mc,loramoe_downstream; "
        "needs the lm-eval extra)",
    )
    args = ap.parse_args(argv)
    if not args.compare and not args.model:
        ap.error("--model is required (or use --compare BEFORE AFTER)")
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be >= 1")
    return args


def _pct(x) -> str:
    return "   -  " if x is None else f"{100 * x:5.1f}%"


def format_table(res: dict) -> str:
    """A compact text summary of one results dict."""
    k, d = res["knowledge"], res["downstream"]
    lines = [
        f"model {res['model']}" + (f" + adapter {res['adapter']}" if res.get("adapter") else ""),
        f"knowledge QA (n={k['n']}): generation {_pct(k['generation']['accuracy'])}  "
        f"loglik-rank {_pct(k['loglik']['accuracy'])}  "
        f"(per-token {_pct(k['loglik']['accuracy_per_token'])})  "
        f"mean gold loglik {k['loglik']['mean_answer_loglik']:.3f}  "
        f"[{k['generation']['seconds']:.0f}s + {k['loglik']['seconds']:.0f}s]",
        f"downstream (n={d['n']}): macro {_pct(d['macro_accuracy'])}  "
        f"micro {_pct(d['micro_accuracy'])}  "
        f"contains {_pct(d['macro_contains'])}  [{d['seconds']:.0f}s]",
    ]
    for task, t in d["per_task"].items():
        lines.append(
            f"  {task:<16} {_pct(t['accuracy'])}  contains {_pct(t['contains'])}  n={t['n']}"
        )
    u = res.get("utilisation")
    if u:
        lines.append("knowledge-group weight share by layer (knowledge / downstream inputs):")
        ks = u["knowledge_share"]
        for j, layer in enumerate(u["layers"]):
            vals = "  ".join(f"{name[:4]} {ks[name][j]:.3f}" for name in ks)
            lines.append(f"  layer {layer:>3} E={u['num_experts'][j]:<2} {vals}")
    lines.append(f"total {res['timing']['total_s']:.0f}s")
    return "\n".join(lines)


def compare(before: dict, after: dict) -> str:
    """Knowledge retained (after/before) and downstream gain, side by side."""

    def ratio(a, b):
        return f"{a / b:6.2f}x" if b else "    - "

    kb, ka = before["knowledge"], after["knowledge"]
    rows = [
        f"{'metric':<28}{'before':>9}{'after':>9}{'retained':>10}",
    ]
    for label, b, a in [  # the format-robust score first
        ("knowledge loglik-rank acc", kb["loglik"]["accuracy"], ka["loglik"]["accuracy"]),
        ("knowledge generation acc", kb["generation"]["accuracy"], ka["generation"]["accuracy"]),
        (
            "knowledge per-token rank",
            kb["loglik"]["accuracy_per_token"],
            ka["loglik"]["accuracy_per_token"],
        ),
    ]:
        rows.append(f"{label:<28}{_pct(b):>9}{_pct(a):>9}{ratio(a, b):>10}")
    lb, la = kb["loglik"]["mean_answer_loglik"], ka["loglik"]["mean_answer_loglik"]
    rows.append(f"{'mean gold-answer loglik':<28}{lb:>9.3f}{la:>9.3f}{la - lb:>+10.3f}")
    db, da = before["downstream"], after["downstream"]
    rows.append(f"{'downstream':<28}{'before':>9}{'after':>9}{'gain':>10}")
    tasks = sorted(set(db["per_task"]) | set(da["per_task"]))
    for t in tasks:
        b = db["per_task"].get(t, {}).get("accuracy")
        a = da["per_task"].get(t, {}).get("accuracy")
        gain = f"{100 * (a - b):+9.1f}p" if a is not None and b is not None else "    -"
        rows.append(f"  {t:<26}{_pct(b):>9}{_pct(a):>9}{gain:>10}")
    b, a = db["macro_accuracy"], da["macro_accuracy"]
    rows.append(f"{'  macro average':<28}{_pct(b):>9}{_pct(a):>9}{100 * (a - b):+9.1f}p")
    for key in ("knowledge", "downstream"):
        if before[key]["n"] != after[key]["n"]:
            rows.append(
                f"WARNING: {key} n differs ({before[key]['n']} vs {after[key]['n']}): "
                "not the same records (different --limit or files)"
            )
    rows += routing_summary(after)
    rows += promise(before, after)
    for name, r in (("before", before), ("after", after)):
        rows.append(
            f"{name}: {r.get('model')}" + (f" + {r['adapter']}" if r.get("adapter") else "")
        )
    return "\n".join(rows)


def routing_summary(res: dict) -> list[str]:
    """Which inputs went to which expert group: knowledge-group share by input type."""
    u = res.get("utilisation")
    ks = (u or {}).get("knowledge_share", {})
    if "knowledge" not in ks or "downstream" not in ks:
        return []
    know, down = ks["knowledge"], ks["downstream"]
    n = len(know)
    lead = sum(k > d for k, d in zip(know, down))
    adapter = res.get("adapter_config") or {}
    head = "routing: "
    if adapter:
        keys = ("null_experts", "router_supervision_coef", "lbc_variant", "lbc_beta")
        head = "routing (" + ", ".join(f"{k}={adapter.get(k, '?')}" for k in keys) + "): "
    return [
        head + f"router weight on the world-knowledge expert group, mean over {n} layers: "
        f"knowledge inputs {sum(know) / n:.3f}, downstream inputs {sum(down) / n:.3f}",
        f"  knowledge inputs lean more on the knowledge experts than downstream inputs in "
        f"{lead} of {n} layers (largest gap {max(k - d for k, d in zip(know, down)):+.3f}, "
        f"smallest {min(k - d for k, d in zip(know, down)):+.3f})",
    ]


#: The demo's goals (README): knowledge by generation kept at >= 0.95x of the base,
#: and downstream macro accuracy >= 0.95x of what the published method (LoRAMoE +
#: intended LBC, ``configs/smollm2_loramoe_lbc.yaml``) reached on this demo: 77.1%.
KNOWLEDGE_KEPT_GOAL = 0.95
DOWNSTREAM_GOAL = 0.95 * 0.771


def promise(before: dict, after: dict) -> list[str]:
    """The three facts the demo promises, in words: knowledge kept, downstream
    learned, knowledge inputs routed to the knowledge group (or the null experts)."""
    kb, ka = (
        before["knowledge"]["generation"]["accuracy"],
        after["knowledge"]["generation"]["accuracy"],
    )
    db, da = before["downstream"]["macro_accuracy"], after["downstream"]["macro_accuracy"]
    kept = ka / kb if kb else float("nan")

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    out = [
        "the promise, on the held-out eval sets:",
        f"  knowledge kept: generation {_pct(kb)} -> {_pct(ka)}, {kept:.2f}x of the base "
        f"(goal >= {KNOWLEDGE_KEPT_GOAL:.2f}x): {met(kept >= KNOWLEDGE_KEPT_GOAL)}",
        f"  downstream learned: macro {_pct(db)} -> {_pct(da)} (goal >= "
        f"{_pct(DOWNSTREAM_GOAL).strip()}, 0.95x of LoRAMoE + LBC's 77.1% on this demo): "
        f"{met(da >= DOWNSTREAM_GOAL)}",
    ]
    ks = (after.get("utilisation") or {}).get("knowledge_share", {})
    if "knowledge" in ks and "downstream" in ks:
        know, down = ks["knowledge"], ks["downstream"]
        lead = sum(k > d for k, d in zip(know, down))
        out.append(
            f"  routing: knowledge inputs put more router weight on the knowledge group "
            f"(knowledge and null experts) than downstream inputs in {lead} of {len(know)} "
            f"layers (goal: most layers): {met(2 * lead > len(know))}"
        )
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from loramoe_ds.eval.common import is_main_process, print0

    if args.compare:
        with open(args.compare[0]) as f0, open(args.compare[1]) as f1:
            print0(compare(json.load(f0), json.load(f1)))
        return 0

    import torch

    from loramoe_ds.data import DataConfig
    from loramoe_ds.eval import evaluate_all, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_model(
        args.model, args.adapter, args.tokenizer, args.device, getattr(torch, args.dtype)
    )
    load_s = time.perf_counter() - t0
    data_cfg = DataConfig(template=args.template, system_prompt=args.system_prompt)
    res = {
        "model": args.model,
        "adapter": args.adapter,
        "device": args.device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "host": platform.node(),
    }
    if hasattr(model, "cfg"):  # an adapter model: record what was trained
        res["adapter_config"] = model.cfg.to_dict()
    res.update(
        evaluate_all(
            model,
            tok,
            args.knowledge,
            args.downstream,
            limit=args.limit,
            batch_size=args.batch_size,
            data_cfg=data_cfg,
            utilisation=not args.no_utilisation,
            knowledge_max_new_tokens=args.max_new_tokens,
            verbose=True,
        )
    )
    if args.lm_eval_tasks:
        from loramoe_ds.eval.harness import run_lm_eval

        tasks = [t.strip() for t in args.lm_eval_tasks.split(",") if t.strip()]
        res["lm_eval"] = run_lm_eval(
            model,
            tok,
            tasks,
            limit=args.limit,
            batch_size=args.batch_size,
            system_prompt=args.system_prompt,
        )
        print0(json.dumps(res["lm_eval"], indent=1))
    res["timing"].update(load_s=round(load_s, 2), total_s=round(time.perf_counter() - t0, 2))
    res["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    if not is_main_process():
        return 0
    print(format_table(res), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.out}")
    util = res.get("utilisation")
    if (args.plot or args.heatmap) and not util:
        print("no utilisation to plot (needs --adapter)", file=sys.stderr)
    elif util:
        from loramoe_ds.eval.plots import plot_expert_heatmap, plot_utilisation

        if args.plot:
            print(f"wrote {plot_utilisation(util, args.plot)}")
        if args.heatmap:
            print(f"wrote {plot_expert_heatmap(util, args.heatmap)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
