"""Forgetting vs learning: full SFT, LoRA, LoRAMoE (+/- LBC) and MoLA at equal budgets.

    python bench/forgetting.py [--out runs/forgetting] [--quick] [--device cpu]
        [--methods lora,loramoe_lbc,...] [--sizes 1,4] [--seeds 0,1]
        [--table-only] [--docs docs]

Every method trains SmolLM2-135M-Instruct on the same demo SFT mix (downstream
tasks + the 74 world-knowledge QA records, ``task_type`` 1) with ONE plain
single-process loop (AdamW, linear warmup + cosine decay, grad clip 1.0, fp32):
same steps, batch, schedule shape, seed and data order. Only the trainable
parameters and the peak LR differ (full SFT uses a lower LR, as usual).

Data sizes: ``size`` k means ``k * per_task`` records of each downstream task
(first records of a seeded shuffle, nested: the 1x subset is inside the 4x one)
plus all 74 knowledge records. Two budgets (:func:`run_steps`):

- ``--budget steps`` (default): the same ``--steps`` at every size. A larger
  size then means more distinct downstream records and a smaller knowledge
  share of the mix (74 of 158 records at 1x = 47%, 74 of 410 at 4x = 18%) at
  identical compute, so the knowledge records get fewer updates. Chosen because
  a 2-core CPU cannot afford 4x the steps for every 4x run.
- ``--budget epochs``: ``steps = ceil(epochs * n_records / batch)``
  (:func:`budget_steps`), every record seen about equally often at every size,
  i.e. the LoRAMoE paper's regime in which more SFT data also means more
  optimisation (4x the compute at 4x).

Metrics (against the base model, evaluated once with the same subsets):
knowledge retained = after / base accuracy, by greedy generation and by
log-likelihood ranking of the gold answer against 3 distractors
(format-robust); downstream gain = macro accuracy after - base (points).

Resumable: each (method, size, seed) writes ``<out>/results/<key>.json`` when it
finishes; a rerun skips finished keys (:func:`pending`). The table, the plot
and the utilisation figures are rebuilt from whatever results exist.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LORAMOE_EXPERTS = 6
"""LoRAMoE paper: 6 experts of rank 4 beside each FFN linear."""
EXPERT_RANK = 4
FFN_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Method:
    """One training recipe of the comparison.

    Attributes:
        name: Key used in file names and tables.
        kind: ``"full"`` (all parameters), ``"lora"`` (peft LoRA) or ``"moe"``
            (:func:`loramoe_ds.model.inject.inject`).
        lr: Peak learning rate.
        adapter: ``AdapterConfig`` fields for ``kind="moe"``.
        lora_rank: Rank of the plain LoRA (``kind="lora"``).
        label: Human-readable name for tables and plots.
    """

    name: str
    kind: str
    lr: float
    adapter: dict[str, Any] = field(default_factory=dict)
    lora_rank: int = 0
    label: str = ""


def make_methods(adapter_lr: float = 3e-4, full_lr: float = 3e-5) -> dict[str, Method]:
    """The compared recipes, all on the FFN ``gate/up/down_proj`` (full SFT: everything).

    LoRA's rank equals LoRAMoE's total expert rank ``E*r = 24`` and its alpha
    (32) makes ``alpha/rank`` equal to LoRAMoE's ``(alpha/r) * 1/E``, i.e. the
    scale of the mixture under uniform gates. MoLA uses the same rank-4 experts
    with top-2 routing; its allocations follow the paper's patterns (30 layers
    split 8/8/7/7 into 4 groups), so total experts differ slightly (reported).
    """
    moe = dict(target_modules=FFN_TARGETS, rank=EXPERT_RANK, alpha=32.0, dropout=0.05)
    mola = dict(moe, router="topk", top_k=2, lbc_beta=0.0)
    methods = [
        Method("full_sft", "full", full_lr, label="Full SFT"),
        Method(
            "lora",
            "lora",
            adapter_lr,
            lora_rank=LORAMOE_EXPERTS * EXPERT_RANK,
            label=f"LoRA r={LORAMOE_EXPERTS * EXPERT_RANK}",
        ),
        Method(
            "loramoe_nolbc",
            "moe",
            adapter_lr,
            dict(moe, num_experts=LORAMOE_EXPERTS, lbc_beta=0.0),
            label="LoRAMoE (no LBC)",
        ),
        Method(
            "loramoe_lbc",
            "moe",
            adapter_lr,
            dict(moe, num_experts=LORAMOE_EXPERTS, lbc_delta=0.1, lbc_beta=0.1),
            label="LoRAMoE + LBC",
        ),
    ]
    for pat in ("2468", "8642", "5555"):
        methods.append(
            Method(
                f"mola_{pat}", "moe", adapter_lr, dict(mola, num_experts=pat), label=f"MoLA {pat}"
            )
        )
    return {m.name: m for m in methods}


# -- pure pieces (unit-tested) ---------------------------------------------------------


def budget_steps(n_records: int, batch_size: int, epochs: float, min_steps: int = 1) -> int:
    """Optimizer steps for an epoch-matched budget: ``ceil(epochs * n / batch)``.

    Raises:
        ValueError: On non-positive inputs.
    """
    if n_records < 1 or batch_size < 1 or epochs <= 0:
        raise ValueError(
            f"need n_records >= 1, batch_size >= 1, epochs > 0; got {n_records}, "
            f"{batch_size}, {epochs}"
        )
    return max(min_steps, math.ceil(epochs * n_records / batch_size))


def run_steps(budget: str, n_records: int, batch_size: int, steps: int, epochs: float) -> int:
    """Steps of one run: ``steps`` for an equal-steps budget, else epoch-matched.

    Raises:
        ValueError: On an unknown ``budget``.
    """
    if budget == "steps":
        return steps
    if budget == "epochs":
        return budget_steps(n_records, batch_size, epochs)
    raise ValueError(f"budget={budget!r}: use 'steps' or 'epochs'")


def lr_factor(step: int, total: int, warmup: int, final: float = 0.1) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to ``final``.

    ``step`` counts from 0 (the LR used by the first update is ``lr_factor(0)``).
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    t = min(max(step - warmup, 0) / span, 1.0)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def subset_records(
    downstream: Sequence[dict], knowledge: Sequence[dict], per_task: int, seed: int = 1234
) -> list[dict]:
    """``per_task`` records of each downstream task (nested across sizes) + all knowledge.

    Each task's records are shuffled once with ``seed`` (independent of the
    training seed, so every run of a size sees the same records) and the first
    ``per_task`` kept; a larger ``per_task`` therefore contains the smaller subset.

    Raises:
        ValueError: If a task has fewer than ``per_task`` records.
    """
    by_task: dict[str, list[dict]] = {}
    for r in downstream:
        by_task.setdefault(r.get("task") or "downstream", []).append(r)
    out: list[dict] = []
    for task in sorted(by_task):
        recs = list(by_task[task])
        if len(recs) < per_task:
            raise ValueError(f"task {task!r} has {len(recs)} records, fewer than {per_task}")
        random.Random(f"{seed}/{task}").shuffle(recs)
        out.extend(recs[:per_task])
    return out + list(knowledge)


def make_plan(
    methods: Sequence[str],
    sizes: Sequence[int],
    seeds: Sequence[int],
    extra_seeds: Sequence[int],
    key_methods: Iterable[str],
) -> list[tuple[str, int, int]]:
    """Run order, most informative first so a cut-short run still fills the table:
    non-MoLA methods at every size (first seed), extra seeds of the key methods,
    then MoLA variants (largest size first), then the remaining seeds.
    """
    keys = set(key_methods)
    core = [m for m in methods if not m.startswith("mola")]
    mola = [m for m in methods if m.startswith("mola")]
    plan = [(m, z, seeds[0]) for z in sizes for m in core]
    plan += [(m, z, s) for s in extra_seeds for z in sizes for m in core if m in keys]
    plan += [(m, z, seeds[0]) for z in sorted(sizes, reverse=True) for m in mola]
    plan += [(m, z, s) for s in seeds[1:] for z in sizes for m in methods]
    plan += [(m, z, s) for s in extra_seeds for z in sizes for m in mola if m in keys]
    return list(dict.fromkeys(plan))


def retained(after: float, base: float) -> float | None:
    """Knowledge retained: ``after / base`` (``None`` when the base scores 0)."""
    return after / base if base > 0 else None


def gain(after: float, base: float) -> float:
    """Downstream gain in accuracy points: ``100 * (after - base)``."""
    return 100.0 * (after - base)


def run_key(method: str, size: int, seed: int) -> str:
    """File stem of one run's result, e.g. ``lora__4x__s0``."""
    return f"{method}__{size}x__s{seed}"


def pending(plan: Iterable[tuple[str, int, int]], results_dir: str | os.PathLike[str]) -> list:
    """The ``(method, size, seed)`` runs of ``plan`` without a finished result file."""
    d = Path(results_dir)
    return [p for p in plan if not (d / f"{run_key(*p)}.json").is_file()]


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Writes JSON via a temp file + rename (a crash never leaves half a result)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def mean_spread(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and half-range (``(max-min)/2``; 0 for one value) of the non-None values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (max(vals) - min(vals)) / 2, len(vals)


def summarize(result: dict, base: dict) -> dict[str, float | None]:
    """Retained knowledge (gen, LL) and downstream gain of one run vs the base eval."""
    k, kb = result["eval"]["knowledge"], base["knowledge"]
    return {
        "know_gen_retained": retained(k["generation"]["accuracy"], kb["generation"]["accuracy"]),
        "know_ll_retained": retained(k["loglik"]["accuracy"], kb["loglik"]["accuracy"]),
        "down_gain": gain(
            result["eval"]["downstream"]["macro_accuracy"], base["downstream"]["macro_accuracy"]
        ),
        "down_acc": result["eval"]["downstream"]["macro_accuracy"],
    }


def aggregate(results: Sequence[dict], base: dict) -> list[dict[str, Any]]:
    """One row per (method, size): mean and half-range over seeds of each metric."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["size"]), []).append(r)
    rows = []
    for (method, size), runs in groups.items():
        sums = [summarize(r, base) for r in runs]
        row: dict[str, Any] = {
            "method": method,
            "label": runs[0].get("label", method),
            "size": size,
            "seeds": sorted(r["seed"] for r in runs),
            "steps": runs[0]["steps"],
            "trainable_params": runs[0]["trainable_params"],
            "total_experts": runs[0].get("total_experts"),
            "train_s": statistics.fmean(r["train_s"] for r in runs),
        }
        for key in ("know_gen_retained", "know_ll_retained", "down_gain", "down_acc"):
            row[key] = mean_spread([s[key] for s in sums])
        rows.append(row)
    return rows


def _fmt(ms: tuple[float | None, float | None, int], pct: bool, signed: bool = False) -> str:
    m, s, n = ms
    if m is None:
        return "-"
    scale = 100.0 if pct else 1.0
    body = f"{m * scale:+.1f}" if signed else f"{m * scale:.1f}"
    body += "%" if pct else ""
    return body + (f" ± {s * scale:.1f}" if n > 1 else "")


def format_table(rows: Sequence[dict], order: Sequence[str]) -> str:
    """Markdown table: rows = method x size, ordered as ``order`` then by size."""
    rank = {m: i for i, m in enumerate(order)}
    rows = sorted(rows, key=lambda r: (rank.get(r["method"], 99), r["size"]))
    head = (
        "| method | SFT data | steps | seeds | knowledge retained (generation) | "
        "knowledge retained (LL ranking) | downstream gain (macro, points) | "
        "total experts | trainable params |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        experts = "-" if r["total_experts"] is None else str(r["total_experts"])
        lines.append(
            f"| {r['label']} | {r['size']}x | {r['steps']} | {len(r['seeds'])} | "
            f"{_fmt(r['know_gen_retained'], True)} | {_fmt(r['know_ll_retained'], True)} | "
            f"{_fmt(r['down_gain'], False, signed=True)} | {experts} | "
            f"{r['trainable_params'] / 1e6:.2f}M |"
        )
    return "\n".join(lines)


# -- training and evaluation (need SmolLM2) ---------------------------------------------


def infinite(loader: Any) -> Iterator[dict]:
    """Batches of a :class:`~loramoe_ds.data.StatefulLoader`, epoch after epoch."""
    while True:
        yield from loader


def lm_loss(hf_model: Any, batch: dict) -> Any:
    """Mean next-token CE at labelled positions only (same math as ``LoRAMoEModel``)."""
    import torch

    labels_BS = batch["labels"]
    h_BSD = hf_model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    )[0]
    target_BS = labels_BS[:, 1:]
    keep_BS = target_BS != -100
    logits_NV = hf_model.get_output_embeddings()(h_BSD[:, :-1][keep_BS]).float()
    return torch.nn.functional.cross_entropy(logits_NV, target_BS[keep_BS])


def build(method: Method, model_dir: str, seed: int, device: str) -> tuple[Any, Any, list]:
    """Fresh base model + the method's trainable parts.

    Returns:
        ``(model, hf_model, trainable_params)``; ``model`` is the object to
        evaluate (a ``LoRAMoEModel`` for ``moe``), ``hf_model`` the HF LM.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if method.kind == "full":
        params = [p for p in lm.parameters() if p.requires_grad]
        model = lm
    elif method.kind == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=method.lora_rank,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules=list(FFN_TARGETS),
            bias="none",
        )
        model = get_peft_model(lm, cfg)
        lm = model.get_base_model()
        params = [p for p in model.parameters() if p.requires_grad]
    elif method.kind == "moe":
        from loramoe_ds.config import AdapterConfig
        from loramoe_ds.model.inject import inject

        model = inject(lm, AdapterConfig(**method.adapter))
        params = model.adapter_params()
    else:
        raise ValueError(f"unknown method kind {method.kind!r}")
    model.to(device)
    return model, lm, params


def train_one(
    method: Method,
    train_file: str,
    tokenizer: Any,
    model_dir: str,
    *,
    seed: int,
    steps: int,
    batch_size: int,
    max_len: int,
    warmup_frac: float,
    device: str,
    cache_dir: str,
    log_every: int = 10,
) -> tuple[Any, dict[str, Any]]:
    """Trains one method with the shared loop; returns ``(model, train_info)``."""
    import torch

    from loramoe_ds.data import DataConfig, build_dataloader

    model, lm, params = build(method, model_dir, seed, device)
    data_cfg = DataConfig(max_length=max_len, cache_dir=cache_dir, seed=seed)
    loader = build_dataloader(train_file, tokenizer, data_cfg, batch_size=batch_size)
    opt = torch.optim.AdamW(params, lr=method.lr, betas=(0.9, 0.999), weight_decay=0.0)
    warmup = max(1, round(warmup_frac * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    model.train()
    losses, lbc_losses = [], []
    it = infinite(loader)
    t0 = time.perf_counter()
    for step in range(steps):
        batch = {k: v.to(device) for k, v in next(it).items()}
        if method.kind == "moe":
            out = model(**batch)
            loss, lm_l = out.loss, out.lm_loss
            lbc_losses.append(out.lbc_loss.item())
        else:
            loss = lm_l = lm_loss(lm, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(lm_l.item())
        if (step + 1) % log_every == 0 or step == 0 or step + 1 == steps:
            el = time.perf_counter() - t0
            extra = f" lbc {lbc_losses[-1]:.3f}" if lbc_losses else ""
            print(
                f"  [{method.name}] step {step + 1}/{steps} lm {losses[-1]:.3f}{extra} "
                f"lr {sched.get_last_lr()[0]:.2e} {el / (step + 1):.2f}s/step",
                flush=True,
            )
    train_s = time.perf_counter() - t0
    model.eval()
    info = {
        "steps": steps,
        "train_s": round(train_s, 1),
        "s_per_step": round(train_s / steps, 3),
        "lm_loss_first10": statistics.fmean(losses[:10]),
        "lm_loss_last10": statistics.fmean(losses[-10:]),
        "lbc_loss_last10": statistics.fmean(lbc_losses[-10:]) if lbc_losses else None,
        "trainable_params": sum(p.numel() for p in params),
        "total_experts": model.total_experts() if method.kind == "moe" else None,
        "experts_per_layer": model.experts_per_layer if method.kind == "moe" else None,
    }
    return model, info


def eval_sets(know_limit: int | None, gen_stride: int, down_limit: int) -> dict[str, list]:
    """Eval records: all (or ``know_limit``) knowledge facts for LL ranking, every
    ``gen_stride``-th of them for generation, the first ``down_limit`` downstream
    records (the file is interleaved by task, so all tasks are covered)."""
    from loramoe_ds.eval import default_eval_files, read_jsonl

    kf, df = default_eval_files()
    know = read_jsonl(kf, know_limit)
    return {"know_ll": know, "know_gen": know[::gen_stride], "down": read_jsonl(df, down_limit)}


def evaluate(
    model: Any, tokenizer: Any, sets: dict[str, list], batch_size: int, util: bool
) -> dict[str, Any]:
    """Knowledge (generation on a subset, LL ranking on all), downstream, utilisation."""
    from loramoe_ds.data import DataConfig
    from loramoe_ds.eval import PromptEncoder, evaluate_downstream, evaluate_knowledge
    from loramoe_ds.eval import expert_utilisation as util_fn

    enc = PromptEncoder(tokenizer, DataConfig())
    t0 = time.perf_counter()
    gen = evaluate_knowledge(model, enc, sets["know_gen"], batch_size, loglik=False)
    ll = evaluate_knowledge(model, enc, sets["know_ll"], batch_size, generation=False)
    knowledge = {
        "generation": {**gen["generation"], "n": gen["n"]},
        "loglik": ll["loglik"],
        "gen_predictions": [
            {k: p[k] for k in ("instruction", "gold", "generation", "gen_correct")}
            for p in gen["predictions"]
        ],
    }
    down = evaluate_downstream(model, enc, sets["down"], batch_size)
    down["predictions"] = down["predictions"][:21]
    out: dict[str, Any] = {"knowledge": knowledge, "downstream": down}
    if util:
        recs = [dict(r, task_type=1) for r in sets["know_gen"]]
        recs += [dict(r, task_type=0) for r in sets["down"]]
        out["utilisation"] = util_fn(model, enc, recs, batch_size)
    out["eval_s"] = round(time.perf_counter() - t0, 1)
    return out


# -- reporting ---------------------------------------------------------------------------


def load_results(results_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results_dir.glob("*__*x__s*.json"))]


def plot_tradeoff(rows: Sequence[dict], path: str | os.PathLike[str]) -> str:
    """Retained knowledge (LL ranking and generation) vs downstream gain, 1x -> 4x arrows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, key, title in (
        (axes[0], "know_ll_retained", "knowledge retained, log-likelihood ranking"),
        (axes[1], "know_gen_retained", "knowledge retained, greedy generation"),
    ):
        for i, m in enumerate(methods):
            pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["size"])
            pts = [r for r in pts if r[key][0] is not None]
            if not pts:
                continue
            c = colors[i % len(colors)]
            xs = [r["down_gain"][0] for r in pts]
            ys = [100 * r[key][0] for r in pts]
            xe = [r["down_gain"][1] or 0 for r in pts]
            ye = [100 * (r[key][1] or 0) for r in pts]
            ax.plot(xs, ys, "-", color=c, lw=1, alpha=0.6)
            for r, x, y, dx, dy in zip(pts, xs, ys, xe, ye):
                mk = "o" if r["size"] == min(p["size"] for p in rows) else "s"
                ax.errorbar(x, y, xerr=dx, yerr=dy, fmt=mk, color=c, ms=6, capsize=2)
            ax.plot([], [], "-o", color=c, label=pts[0]["label"])
        ax.axhline(100, color="gray", ls="--", lw=1)
        ax.set_xlabel("downstream gain over base (macro accuracy, points)")
        ax.set_ylabel("% of base accuracy retained")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    sizes = sorted({r["size"] for r in rows})
    fig.suptitle(
        f"Forgetting vs learning, SmolLM2-135M (circle = {sizes[0]}x SFT data, "
        f"square = {sizes[-1]}x; bars: half-range over seeds)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def report(out: Path, docs: Path | None, order: Sequence[str]) -> str:
    """Rebuilds ``table.md``, ``summary.json`` and the figures from finished results."""
    base_file = out / "base.json"
    if not base_file.is_file():
        return "no base evaluation yet"
    base = json.loads(base_file.read_text())
    results = load_results(out / "results")
    if not results:
        return "no finished runs yet"
    rows = aggregate(results, base)
    table = format_table(rows, order)
    (out / "table.md").write_text(table + "\n")
    write_json_atomic(out / "summary.json", {"base": _base_summary(base), "rows": rows})
    fig_dir = docs if docs is not None else out
    fig_dir.mkdir(parents=True, exist_ok=True)
    plot_tradeoff(rows, fig_dir / "forgetting.png")
    from loramoe_ds.eval.plots import plot_utilisation

    for name, fname, title in (
        ("loramoe_lbc", "utilisation_lbc.png", "LoRAMoE + LBC"),
        ("loramoe_nolbc", "utilisation_nolbc.png", "LoRAMoE without LBC"),
    ):
        cands = [r for r in results if r["method"] == name and "utilisation" in r["eval"]]
        if cands:
            r = max(cands, key=lambda r: (r["size"], -r["seed"]))
            plot_utilisation(
                r["eval"]["utilisation"],
                fig_dir / fname,
                title=f"{title} ({r['size']}x data, seed {r['seed']}): router weight on "
                "knowledge experts",
            )
    return table


def check_base(base: dict, sets: dict[str, list], path: Path) -> None:
    """Refuses a cached base evaluation made with other eval-set sizes.

    Raises:
        ValueError: If the cached sizes differ from ``sets`` (use another ``--out``).
    """
    have = (
        base["knowledge"]["loglik"]["n"] + base["knowledge"]["loglik"]["skipped"],
        base["knowledge"]["generation"]["n"],
        base["downstream"]["n"],
    )
    want = (len(sets["know_ll"]), len(sets["know_gen"]), len(sets["down"]))
    if have != want:
        raise ValueError(
            f"{path} was evaluated on (LL, generation, downstream) = {have} records but "
            f"this run asks for {want}; use another --out or the same eval flags"
        )


def _base_summary(base: dict) -> dict[str, Any]:
    return {
        "know_gen_acc": base["knowledge"]["generation"]["accuracy"],
        "know_gen_n": base["knowledge"]["generation"]["n"],
        "know_ll_acc": base["knowledge"]["loglik"]["accuracy"],
        "know_ll_n": base["knowledge"]["loglik"]["n"],
        "down_macro": base["downstream"]["macro_accuracy"],
        "down_n": base["downstream"]["n"],
        "down_per_task": {t: v["accuracy"] for t, v in base["downstream"]["per_task"].items()},
    }


# -- entry point -------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/forgetting")
    ap.add_argument("--docs", default=None, help="also write the figures here (e.g. docs)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda when a GPU is lent")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=None, help="comma list (default: all)")
    ap.add_argument("--sizes", default="1,4", help="data multiples of --per-task")
    ap.add_argument("--seeds", default="0", help="seeds of every method")
    ap.add_argument("--extra-seeds", default="1", help="more seeds for --key-methods")
    ap.add_argument("--key-methods", default="lora,loramoe_lbc")
    ap.add_argument("--per-task", type=int, default=12, help="1x records per downstream task")
    ap.add_argument(
        "--budget",
        default="steps",
        choices=["steps", "epochs"],
        help="steps: --steps at every size; epochs: ceil(--epochs * records / batch)",
    )
    ap.add_argument("--steps", type=int, default=20, help="steps per run (--budget steps)")
    ap.add_argument("--epochs", type=float, default=1.0, help="passes (--budget epochs)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--warmup-frac", type=float, default=0.1)
    ap.add_argument("--adapter-lr", type=float, default=3e-4)
    ap.add_argument("--full-lr", type=float, default=3e-5)
    ap.add_argument("--know-limit", type=int, default=None, help="knowledge facts for LL")
    ap.add_argument("--gen-stride", type=int, default=4, help="every k-th fact is generated")
    ap.add_argument("--down-limit", type=int, default=42, help="downstream eval records")
    ap.add_argument("--eval-batch-size", type=int, default=48)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 steps, tiny eval")
    ap.add_argument("--table-only", action="store_true", help="only rebuild table + plots")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    methods = make_methods(args.adapter_lr, args.full_lr)
    order = list(methods)
    docs = Path(args.docs) if args.docs else None
    if args.table_only:
        print(report(out, docs, order))
        return 0
    import torch
    from transformers import AutoTokenizer

    from loramoe_ds.data import demo_path
    from loramoe_ds.eval import read_jsonl
    from loramoe_ds.smollm2 import ensure_smollm2

    torch.set_num_threads(args.threads)
    if args.quick:
        args.know_limit, args.gen_stride, args.down_limit = 8, 2, 7
    chosen = args.methods.split(",") if args.methods else order
    unknown = sorted(set(chosen) - set(methods))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; valid: {order}")
    sizes = [int(s) for s in args.sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = [int(s) for s in args.extra_seeds.split(",") if s]
    keys = set(args.key_methods.split(","))
    plan = make_plan(chosen, sizes, seeds, extra, keys)
    model_dir = str(ensure_smollm2())
    tok = AutoTokenizer.from_pretrained(model_dir)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(parents=True, exist_ok=True)
    sets = eval_sets(args.know_limit, args.gen_stride, args.down_limit)
    meta = {
        "args": vars(args),
        "host": platform.node(),
        "cpu": platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    write_json_atomic(out / "meta.json", meta)
    base_file = out / "base.json"
    if base_file.is_file():
        check_base(json.loads(base_file.read_text()), sets, base_file)
    else:
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device)
        res = evaluate(lm, tok, sets, args.eval_batch_size, util=False)
        write_json_atomic(base_file, res)
        print(f"base eval {res['eval_s']}s: {json.dumps(_base_summary(res))}", flush=True)
        del lm
    downstream = [r for r in read_jsonl(demo_path("train.jsonl")) if r.get("task_type", 0) == 0]
    knowledge = read_jsonl(demo_path("knowledge_train.jsonl"))
    todo = pending(plan, out / "results")
    print(f"{len(plan) - len(todo)} of {len(plan)} runs cached; {len(todo)} to go", flush=True)
    for method_name, size, seed in todo:
        method = methods[method_name]
        recs = subset_records(downstream, knowledge, args.per_task * size)
        train_file = out / "data" / f"train_{args.per_task}x{size}.jsonl"
        if not train_file.is_file():
            train_file.write_text("".join(json.dumps(r) + "\n" for r in recs))
        steps = run_steps(args.budget, len(recs), args.batch_size, args.steps, args.epochs)
        steps = 2 if args.quick else steps
        print(f"== {run_key(method_name, size, seed)}: {len(recs)} records, {steps} steps")
        t0 = time.perf_counter()
        model, info = train_one(
            method,
            str(train_file),
            tok,
            model_dir,
            seed=seed,
            steps=steps,
            batch_size=args.batch_size,
            max_len=args.max_len,
            warmup_frac=args.warmup_frac,
            device=args.device,
            cache_dir=str(out / "cache"),
        )
        ev = evaluate(
            model, tok, sets, args.eval_batch_size, util=method_name.startswith("loramoe")
        )
        result = {
            "method": method_name,
            "label": method.label,
            "kind": method.kind,
            "lr": method.lr,
            "adapter": method.adapter,
            "lora_rank": method.lora_rank,
            "size": size,
            "seed": seed,
            "n_records": len(recs),
            "batch_size": args.batch_size,
            **info,
            "eval": ev,
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        write_json_atomic(out / "results" / f"{run_key(method_name, size, seed)}.json", result)
        s = summarize(result, json.loads(base_file.read_text()))
        print(
            f"   done in {result['wall_s']}s (train {info['train_s']}s, eval {ev['eval_s']}s): "
            + ", ".join(f"{k} {v:.3f}" for k, v in s.items() if v is not None),
            flush=True,
        )
        del model
        report(out, docs, order)
    print(report(out, docs, order))
    return 0


if __name__ == "__main__":
    sys.exit(main())
