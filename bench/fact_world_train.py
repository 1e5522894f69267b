"""Methods, the one training loop and the scores of the fact-world experiments.

Shape legend: B samples, S positions, V vocabulary, E experts, N labelled positions.

Every method trains a copy of the pretrained fact-world Llama
(:func:`fact_world.pretrained_base`) with the same loop (AdamW, warmup + cosine,
grad clip 1.0, fp32), the same batches in the same order for a given seed;
only the trainable parameters, the peak LR and the adapter's aux loss differ.
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from fact_world import EOS, World, collate, lm_loss, lr_factor

FFN_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", *FFN_TARGETS)
EXPERTS = 6
RANK = 4
NULL = 2


@dataclass(frozen=True)
class Method:
    """One recipe: ``kind`` ``full`` | ``lora`` (peft) | ``moe`` (``inject``)."""

    name: str
    kind: str
    label: str
    adapter: dict[str, Any] = field(default_factory=dict)
    lora_rank: int = 0


def make_methods(
    delta: float = 0.1,
    beta: float = 0.1,
    targets: Sequence[str] = FFN_TARGETS,
    sup: float = 1.0,
) -> dict[str, Method]:
    """Full SFT, LoRA at LoRAMoE's total rank ``E*r``, LoRAMoE without / with both LBC
    variants (paper delta, beta), and MoLA top-2 ("2468" over the 4 layers); all
    adapters on the FFN ``gate/up/down_proj``, alpha 32 (LoRA ``alpha/(E*r)`` =
    LoRAMoE's mixture scale under uniform gates)."""
    moe = dict(target_modules=tuple(targets), rank=RANK, alpha=32.0, dropout=0.05)
    lbc = dict(moe, num_experts=EXPERTS, lbc_delta=delta, lbc_beta=beta)
    nolbc = dict(moe, num_experts=EXPERTS, lbc_beta=0.0)
    methods = [
        Method("full_sft", "full", "Full SFT"),
        Method("lora", "lora", f"LoRA r={EXPERTS * RANK}", dict(target_modules=tuple(targets)),
               lora_rank=EXPERTS * RANK),
        Method("loramoe_nolbc", "moe", "LoRAMoE, no LBC", nolbc),
        Method("loramoe_published", "moe", "LoRAMoE + LBC published",
               dict(lbc, lbc_variant="published")),
        Method("loramoe_intended", "moe", "LoRAMoE + LBC intended",
               dict(lbc, lbc_variant="intended")),
        Method(
            "mola_2468", "moe", "MoLA 2468 top-2",
            dict(moe, num_experts="2468", router="topk", top_k=2, lbc_beta=0.0),
        ),
        Method("loramoe_sup", "moe", "LoRAMoE + router supervision",
               dict(nolbc, router_supervision_coef=sup)),
        Method("loramoe_null_sup", "moe", f"LoRAMoE + {NULL} null + router supervision",
               dict(nolbc, null_experts=NULL, router_supervision_coef=sup)),
    ]  # fmt: skip
    return {m.name: m for m in methods}


def build(method: Method, base: torch.nn.Module, seed: int) -> tuple[Any, list]:
    """A fresh copy of ``base`` with the method's trainable parts: ``(model, params)``."""
    torch.manual_seed(seed)
    lm = copy.deepcopy(base)
    if method.kind == "full":
        return lm, list(lm.parameters())
    if method.kind == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=method.lora_rank,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules=list(method.adapter["target_modules"]),
        )
        model = get_peft_model(lm, cfg)
        return model, [p for p in model.parameters() if p.requires_grad]
    if method.kind == "moe":
        import dataclasses

        from loramoe_ds.config import AdapterConfig
        from loramoe_ds.model.inject import inject

        names = {f.name for f in dataclasses.fields(AdapterConfig)}
        missing = sorted(set(method.adapter) - names)
        if missing:
            raise ValueError(f"{method.name}: AdapterConfig has no field(s) {missing} yet")
        model = inject(lm, AdapterConfig(**method.adapter))
        return model, model.adapter_params()
    raise ValueError(f"kind={method.kind!r}: use full, lora or moe")


def logits_fn(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``ids_BS -> logits_BSV`` for any of the three kinds (LoRAMoE: its base LM)."""
    lm = getattr(model, "base", None)
    lm = lm if isinstance(lm, torch.nn.Module) and hasattr(model, "moe_layers") else model
    return lambda ids_BS: lm(input_ids=ids_BS).logits


def epoch_order(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Batches of record indices: seeded reshuffle every epoch, ``steps`` batches."""
    rng = random.Random(f"order/{seed}")
    flat: list[int] = []
    while len(flat) < steps * batch_size:
        flat += rng.sample(range(n), n)
    return [flat[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def train(
    method: Method,
    model: Any,
    params: list,
    records: Sequence[dict],
    steps: int,
    lr: float,
    seed: int,
    batch_size: int = 32,
    device: str = "cpu",
    warmup_frac: float = 0.1,
    callback: Callable[[int, Any], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The shared loop; ``callback(step, model)`` runs after every update when given.

    ``params``: tensors, or AdamW parameter groups (dicts with their own ``lr``).
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if params and isinstance(params[0], dict):
        params = [p for g in params for p in g["params"]]
    warm = max(1, round(warmup_frac * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warm))
    losses, lbcs = [], []
    t0 = time.perf_counter()
    model.train()
    for step, idx in enumerate(epoch_order(len(records), steps, batch_size, seed)):
        batch = collate([records[i] for i in idx], device)
        if method.kind == "moe":
            out = model(**batch)
            loss, lm = out.loss, out.lm_loss
            lbcs.append(float(out.lbc_loss.detach()))
        else:
            loss = lm = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(lm.detach()))
        if callback is not None:
            callback(step + 1, model)
        if (step + 1) % max(steps // 4, 1) == 0:
            log(f"  [{method.name}] step {step + 1}/{steps} lm {losses[-1]:.3f}")
    model.eval()
    train_s = time.perf_counter() - t0
    return {
        "steps": steps,
        "train_s": round(train_s, 2),
        "lm_loss_last": statistics.fmean(losses[-10:]),
        "lbc_loss_last": statistics.fmean(lbcs[-10:]) if lbcs else None,
        "trainable_params": sum(p.numel() for p in params),
        "total_experts": model.total_experts() if method.kind == "moe" else None,
    }


# -- scores -------------------------------------------------------------------------------


def by_length(records: Sequence[dict]) -> dict[int, list[int]]:
    """Record indices grouped by prompt length (batches need no padding)."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(len(r["prompt"]), []).append(i)
    return groups


@torch.no_grad()
def greedy(
    fn: Callable, records: Sequence[dict], max_new: int, device: str = "cpu", chunk: int = 256
) -> list[list[int]]:
    """Greedy continuation of every prompt, cut before the first ``</s>``."""
    out: list[list[int]] = [[] for _ in records]
    for idx_all in by_length(records).values():
        for c in range(0, len(idx_all), chunk):
            idx = idx_all[c : c + chunk]
            ids_BS = torch.tensor([records[i]["prompt"] for i in idx], device=device)
            L = ids_BS.shape[1]
            for _ in range(max_new):
                nxt_B = fn(ids_BS)[:, -1].argmax(-1)
                ids_BS = torch.cat([ids_BS, nxt_B[:, None]], dim=1)
            for row, i in enumerate(idx):
                gen = ids_BS[row, L:].tolist()
                out[i] = gen[: gen.index(EOS)] if EOS in gen else gen
    return out


@torch.no_grad()
def first_token_logprobs(fn: Callable, records: Sequence[dict], device: str = "cpu") -> list:
    """``log p(token | prompt)`` over the vocabulary at the answer's first position."""
    out: list[Any] = [None] * len(records)
    for idx in by_length(records).values():
        ids_BS = torch.tensor([records[i]["prompt"] for i in idx], device=device)
        lp_BV = torch.log_softmax(fn(ids_BS)[:, -1].float(), -1).cpu()
        for row, i in enumerate(idx):
            out[i] = lp_BV[row]
    return out


def rank_correct(logprob_V: torch.Tensor, candidates: Sequence[int]) -> bool:
    """LL ranking: the gold (``candidates[0]``) beats every distractor (ties count wrong)."""
    lp = logprob_V[list(candidates)]
    return bool((lp[0] > lp[1:]).all())


def gen_correct(generated: Sequence[int], gold: int, window: int = 4) -> tuple[bool, bool]:
    """``(tolerant, strict)``: gold among the first ``window`` generated tokens (any
    wrapping words allowed) / the answer is exactly the gold token."""
    return gold in list(generated)[:window], list(generated) == [gold]


def score_knowledge(model: Any, world: World, device: str = "cpu") -> dict[str, Any]:
    """Every held-out fact: LL ranking vs 3 distractors and vs every other value of the
    relation (``ll_pool_acc``: 24 or ``n_entities`` candidates), tolerant and strict
    generation."""
    fn = logits_fn(model)
    recs = [world.fact_record(f) for f in world.facts_of("heldout")]
    lps = first_token_logprobs(fn, recs, device)
    gens = greedy(fn, recs, max_new=4, device=device)
    ll = [rank_correct(lp, r["candidates"]) for lp, r in zip(lps, recs)]
    ll_pool = [rank_correct(lp, r["pool"]) for lp, r in zip(lps, recs)]
    gc = [gen_correct(g, r["candidates"][0]) for g, r in zip(gens, recs)]
    n = len(recs)
    return {
        "n": n,
        "ll_acc": sum(ll) / n,
        "ll_pool_acc": sum(ll_pool) / n,
        "gen_acc": sum(t for t, _ in gc) / n,
        "gen_strict_acc": sum(s for _, s in gc) / n,
        "gold_logprob": statistics.fmean(float(lp[r["candidates"][0]]) for lp, r in zip(lps, recs)),
        "examples": [
            {"q": world.decode(r["prompt"][2:-1]), "gold": world.decode(r["candidates"][:1]),
             "gen": world.decode(g)}
            for r, g in list(zip(recs, gens))[:12]
        ],
    }  # fmt: skip


def score_downstream(model: Any, records: Sequence[dict], device: str = "cpu") -> dict[str, Any]:
    """Exact match of the greedy answer per task; macro mean over tasks."""
    max_new = max(len(r["answer"]) for r in records) + 1
    gens = greedy(logits_fn(model), records, max_new=max_new, device=device)
    per: dict[str, list[bool]] = {}
    for g, r in zip(gens, records):
        per.setdefault(r["task"], []).append(g == r["answer"][:-1])
    per_task = {t: sum(v) / len(v) for t, v in per.items()}
    return {"n": len(records), "macro": statistics.fmean(per_task.values()), "per_task": per_task}


class ShareRecorder:
    """Router weight on the knowledge group per decoder layer, token mean over inputs.

    Set as ``recorder`` of every adapted linear; call the base LM directly (the
    ``LoRAMoEModel`` forward installs its own recorder). Shares are averaged over the
    adapted linears of a layer.
    """

    def __init__(self) -> None:
        self.sums: dict[int, list[float]] = {}

    def record(self, layer: Any, routing: Any) -> None:
        from loramoe_ds.model.losses import knowledge_group

        p_TE = routing.probs_TE.float()
        k_E = knowledge_group(routing.num_experts, p_TE.device, routing.num_null)
        acc = self.sums.setdefault(layer.layer_idx, [0.0, 0.0])
        acc[0] += float(p_TE[:, k_E].sum())
        acc[1] += p_TE.shape[0]

    def shares(self) -> list[float]:
        return [s / n for _, (s, n) in sorted(self.sums.items())]


@torch.no_grad()
def knowledge_shares(model: Any, records: Sequence[dict], device: str = "cpu") -> list[float]:
    """Per layer: mean router weight on experts ``[0, E/2)`` over the tokens (prompt
    and answer) of ``records`` (unpadded, grouped by length)."""
    rec = ShareRecorder()
    layers = model.moe_layers()
    was_training = model.training
    model.eval()
    for layer in layers:
        layer.recorder = rec
    try:
        seqs = [r["prompt"] + r["answer"] for r in records]
        groups: dict[int, list[list[int]]] = {}
        for s in seqs:
            groups.setdefault(len(s), []).append(s)
        for group in groups.values():
            model.base(input_ids=torch.tensor(group, device=device))
    finally:
        for layer in layers:
            layer.recorder = None
    model.train(was_training)
    return rec.shares()
