"""The plan of a training run: everything resolved and checked before any process group.

Configs, the DeepSpeed JSON, the expert-parallel layout, the base model's
config and the checkpoint to resume are checked in :func:`make_plan`, on one
process and in seconds; :meth:`Plan.describe` is what ``--dry-run`` prints.
The run itself is :mod:`loramoe_ds.run`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loramoe_ds.base_model import from_config, hf_config
from loramoe_ds.config import RunConfig, resolve_ds_config
from loramoe_ds.config.run import AUTO
from loramoe_ds.lr_schedule import LRSchedule, lr_ratio
from loramoe_ds.model.inject import num_decoder_layers
from loramoe_ds.parallel.settings import OptimizerSettings
from loramoe_ds.placement import layer_placements


@dataclass
class Plan:
    """Everything resolved before process groups start."""

    run: RunConfig
    ds_config: dict[str, Any]
    world_size: int
    rank: int
    num_layers: int
    experts_per_layer: list[int]
    model_dir: str | None
    hf_config: Any
    gpus_per_node: int | None = None
    """Ranks per node of the planned topology (``--gpus-per-node``), when known."""
    param_counts: tuple[int, int, int, int] | None = None
    """:func:`count_parameters` of this plan (filled by :func:`make_plan`)."""
    cost: PlanCost | None = None
    """The cost model's options and choice (:func:`resolve_layout`; filled by :func:`make_plan`)."""
    placements: list[str] | None = None
    """Each decoder layer's bank placement, ``"sharded"`` / ``"replicated"``
    (:func:`~loramoe_ds.placement.layer_placements`; filled by :func:`make_plan`,
    handed to the trainer)."""

    @property
    def optim(self) -> OptimizerSettings:
        """AdamW settings and joint clip of routers and experts (``train.*``)."""
        t = self.run.train
        return OptimizerSettings(
            lr=t.lr,
            weight_decay=t.weight_decay,
            grad_clip=t.grad_clip,
            router_lr_scale=t.router_lr_scale,
        )

    @property
    def lr_schedule(self) -> LRSchedule:
        """Linear warm-up from lr/W at step 1, cosine decay: every step moves (``train.*``)."""
        t = self.run.train
        return LRSchedule(t.max_steps, t.warmup_steps, t.min_lr_ratio)

    @property
    def layer_placements(self) -> list[str]:
        """:attr:`placements`, or the default rule's when not yet resolved."""
        if self.placements is not None:
            return self.placements
        return layer_placements(self.experts_per_layer, self.run.parallel.ep_size)

    def describe_placements(self) -> str:
        """One line: each run of decoder layers with the same bank count and placement."""
        ep, spans = self.run.parallel.ep_size, []
        for i, (e, p) in enumerate(zip(self.experts_per_layer, self.layer_placements)):
            if spans and spans[-1][2:] == [e, p]:
                spans[-1][1] = i
            else:
                spans.append([i, i, e, p])
        parts = []
        for lo, hi, e, p in spans:
            where = f"layer {lo}" if lo == hi else f"layers {lo}-{hi}"
            how = f"sharded, {e // ep} per EP rank" if p == "sharded" else "replicated"
            parts.append(f"{where}: {e} experts {how}")
        return f"expert placement (ep_size {ep}): " + "; ".join(parts)

    def describe(self) -> str:
        """The human-readable plan printed by ``--dry-run``."""
        run, W, ep = self.run, self.world_size, self.run.parallel.ep_size
        ep_groups = [list(range(i * ep, (i + 1) * ep)) for i in range(W // ep)]
        edp_groups = [list(range(j, W, ep)) for j in range(ep)]
        n_base, n_router, n_expert, per_linear = self.param_counts or count_parameters(self)
        stage = run.parallel.zero_stage
        placed = self.layer_placements
        counts = self.experts_per_layer
        t = run.train
        lines = [f"world size {W}: {W // ep} expert-parallel group(s) of {ep}"]
        if self.gpus_per_node:
            G = self.gpus_per_node
            lines.append(
                f"  {W // G} node(s) x {G} GPUs; "
                + (
                    "every EP group within one node"
                    if G % ep == 0
                    else "EP groups span nodes (expert all-to-all crosses the network; "
                    "an ep_size dividing the GPUs per node keeps it inside a node)"
                )
            )
        lines += [
            f"  EP groups  {ep_groups}",
            f"  EDP groups {edp_groups}",
            f"model {run.model.name}: {self.num_layers} layers; adapter router={run.adapter.router}"
            + (f" top_k={run.adapter.top_k}" if run.adapter.router == "topk" else "")
            + f" rank={run.adapter.rank} targets={list(run.adapter.target_modules)}",
            f"aux losses ({run.adapter.aux_loss_scope}): LBC {run.adapter.lbc_variant} "
            f"beta={run.adapter.lbc_beta} delta={run.adapter.lbc_delta}; load balance "
            f"{run.adapter.load_balance_coef}; z-loss {run.adapter.z_loss_coef}",
            f"experts per layer {self.experts_per_layer} "
            f"(total {sum(self.experts_per_layer) * per_linear} over {per_linear} linears/layer;"
            f" {[e // ep if p == 'sharded' else e for e, p in zip(counts, placed)][:8]}..."
            " local per EP rank)",
            self.describe_placements(),
            f"parameters: frozen base {n_base:,}; trainable routers {n_router:,} + experts "
            f"{n_expert:,} ({100 * (n_router + n_expert) / max(n_base, 1):.2f}% of base)",
            f"batch: micro {run.train.micro_batch_size} x grad_accum {run.train.grad_accum} x "
            f"DP {W} = global {self.ds_config['train_batch_size']}; ZeRO stage {stage}; "
            f"{run.train.precision}",
            f"steps {t.max_steps}, lr {t.lr}: "
            + (
                f"linear warm-up from {t.lr * lr_ratio(1, t.warmup_steps, t.max_steps, 0):.3g} "
                f"(step 1) to {t.lr:.3g} (step {t.warmup_steps}), "
                if t.warmup_steps
                else ""
            )
            + f"cosine to {t.lr * t.min_lr_ratio:.3g} (step {t.max_steps}); "
            f"output {run.output.dir}",
        ]
        if self.cost is not None:
            lines += self.cost.describe(t.activation_checkpointing, self.gpus_per_node)
        return "\n".join(lines)


def _meta_model(hf_cfg, adapter):
    """The injected model on the ``meta`` device (no memory, no weights)."""
    from loramoe_ds.model.inject import inject

    with torch.device("meta"):
        base = from_config(hf_cfg, init_weights=False)
        n_base = sum(p.numel() for p in base.parameters())
        return inject(base, adapter), n_base


def count_parameters(plan: Plan) -> tuple[int, int, int, int]:
    """(frozen base, router, expert, adapted linears per layer) parameter counts.

    Computed on the ``meta`` device: no memory, no weights loaded.
    """
    model, n_base = _meta_model(plan.hf_config, plan.run.adapter)
    n_router = sum(m.router.weight.numel() for m in model.moe_layers())
    n_expert = sum(sum(p.numel() for p in m.experts.parameters()) for m in model.moe_layers())
    per_linear = max(1, len(model.moe_layers()) // max(plan.num_layers, 1))
    return n_base, n_router, n_expert, per_linear


def resolve_layout(
    run: RunConfig, ds: dict[str, Any], hf_cfg, world_size: int, gpus_per_node: int | None
) -> tuple[RunConfig, PlanCost]:
    """Resolve ``parallel.ep_size`` / ``zero_stage: auto`` by the cost model.

    Returns the run config with concrete ``ep_size`` and ``zero_stage`` (the
    DeepSpeed JSON's stage filled in) and the options behind the choice.
    """
    from loramoe_ds.config.run import AUTO
    from loramoe_ds.plan_cost import memory_budget, model_shapes, options, pick

    model, _ = _meta_model(hf_cfg, run.adapter)
    shapes = model_shapes(model, hf_cfg)
    budget, where = memory_budget(run, gpus_per_node)
    zero = ds.setdefault("zero_optimization", {})
    ds_stage = zero.get("stage")
    opts = options(run, ds, shapes, world_size, budget, ds_stage)
    stage_auto = run.parallel.zero_stage == AUTO and ds_stage is None
    chosen = pick(opts, stage_auto, run.train.activation_checkpointing)
    zero.setdefault("stage", chosen.zero_stage)
    par = dataclasses.replace(run.parallel, ep_size=chosen.ep_size, zero_stage=chosen.zero_stage)
    auto = run.parallel.ep_size == AUTO or run.parallel.zero_stage == AUTO
    run = dataclasses.replace(run, parallel=par)
    return run, PlanCost(shapes, opts, chosen, budget, where, auto)


@dataclass
class PlanCost:
    """The cost model's view of a plan: every option considered and the one taken."""

    shapes: Any
    options: list
    chosen: Any
    budget: float
    budget_source: str
    auto: bool
    """Whether ``ep_size`` or ``zero_stage`` was ``auto`` (the choice was the plan's)."""

    def choice(self) -> str:
        """One line: the layout the plan took and the rule it took it by."""
        c = self.chosen
        return (
            f"auto layout: ep_size {c.ep_size}, ZeRO-{c.zero_stage} (the fewest predicted "
            "wire bytes per step among the options that fit; ZeRO-3 only when no ZeRO-2 "
            "option fits or the DeepSpeed JSON asks for it)"
        )

    def describe(self, checkpointing: bool, gpus_per_node: int | None = None) -> list[str]:
        from loramoe_ds.plan_cost import describe_options

        head = [self.choice()] if self.auto else []
        return head + describe_options(
            self.options,
            self.chosen,
            self.budget,
            self.budget_source,
            checkpointing,
            gpus_per_node,
        )


def make_plan(
    run: RunConfig,
    ds_user: dict[str, Any],
    world_size: int,
    rank: int,
    gpus_per_node: int | None = None,
    resume: str | None = None,
) -> Plan:
    """Validate everything that needs no process group.

    Also counts the parameters (on the ``meta`` device) and, on rank 0, prints
    one warning line when the adapter has more parameters than the base model
    (usually a ``num_experts`` or ``rank`` typo).

    Args:
        run: The validated run config.
        ds_user: The user's DeepSpeed JSON (``{}`` when none).
        world_size: Ranks of the job (or of the planned job, for a dry run).
        rank: This process's rank.
        gpus_per_node: Ranks per node of a planned topology (dry run), if known.
        resume: The launcher's ``--resume`` (``auto``, ``none`` or a checkpoint
            directory): a checkpoint this topology and config cannot continue is
            refused here, naming both topologies (:func:`check_resume_plan`).

    Raises:
        ValueError: Config / DeepSpeed JSON disagreement, an ``ep_size`` that
            does not divide the world size, or a
            checkpoint to resume that this run cannot continue.
    """
    import sys

    from loramoe_ds.parallel.groups import validate_ep

    ds = resolve_ds_config(run, ds_user, world_size)
    hf_cfg, model_dir = hf_config(run)
    n_layers = num_decoder_layers(hf_cfg)
    counts = run.adapter.layer_experts(n_layers)
    auto_ep = run.parallel.ep_size == AUTO
    if not auto_ep:  # a bad fixed ep_size is refused before the cost model runs
        validate_ep(run.parallel.ep_size, world_size, counts)
    run, cost = resolve_layout(run, ds, hf_cfg, world_size, gpus_per_node)
    if resume not in (None, "none"):
        check_resume_plan(run, ds, world_size, counts, hf_cfg, resume)
    placements = validate_ep(
        run.parallel.ep_size, world_size, counts, cost.chosen.placements if auto_ep else None
    )
    plan = Plan(run, ds, world_size, rank, n_layers, counts, model_dir, hf_cfg, gpus_per_node)
    plan.placements = placements
    plan.cost = cost
    plan.param_counts = count_parameters(plan)
    n_base, n_router, n_expert, _ = plan.param_counts
    if rank == 0 and n_router + n_expert > n_base:
        print(
            f"warning: the adapter has {n_router + n_expert:,} trainable parameters, "
            f"{(n_router + n_expert) / max(n_base, 1):.1f}x the base model's {n_base:,} "
            f"(experts per layer {sorted(set(counts))}, rank {run.adapter.rank}, "
            f"{len(run.adapter.target_modules)} target modules); check adapter.num_experts "
            "and adapter.rank",
            file=sys.stderr,
            flush=True,
        )
    return plan


def check_accelerator(precision: str, environ: Mapping[str, str] | None = None) -> None:
    """Refuse a bf16 run that would silently fall back to the CPU and gloo.

    DeepSpeed picks its accelerator by what torch sees: with a CPU-only torch
    build (or no visible GPU) a bf16 GPU job would train on the CPU, over gloo,
    more than 15x slower than fp32 there. ``DS_ACCELERATOR=cpu`` says the CPU is
    meant (tests, the CPU demo) and passes.

    Raises:
        ValueError: ``train.precision=bf16`` and torch sees no CUDA device.
    """
    environ = os.environ if environ is None else environ
    if precision != "bf16" or environ.get("DS_ACCELERATOR") == "cpu":
        return
    if torch.cuda.is_available():
        return
    build = (
        "a CPU-only build"
        if torch.version.cuda is None
        else f"built for CUDA {torch.version.cuda}, but no GPU is visible"
    )
    raise ValueError(
        f"train.precision=bf16: torch {torch.__version__} ({build}) sees no CUDA device, so "
        "DeepSpeed would train on the CPU over gloo; install a CUDA build of torch (check "
        "CUDA_VISIBLE_DEVICES and nvidia-smi), or set DS_ACCELERATOR=cpu to use the CPU on "
        "purpose (train.precision=fp32 is much faster there)"
    )


def check_attention(attn_implementation: str) -> None:
    """Refuse ``flash_attention_2`` where it cannot run, before any process group.

    Raises:
        ValueError: The ``flash-attn`` package is missing, or torch sees no GPU.
    """
    if not attn_implementation.startswith("flash"):
        return
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            f"model.attn_implementation={attn_implementation}: the flash-attn package is not "
            "installed (pip install .[flash], on a CUDA machine); or use sdpa"
        )
    if not torch.cuda.is_available():
        raise ValueError(
            f"model.attn_implementation={attn_implementation}: flash attention runs on CUDA "
            "GPUs only and torch sees none; use sdpa"
        )


def checkpoint_source(run: RunConfig, resume: str) -> Path:
    """Where ``--resume`` looks: ``output.dir/checkpoints`` for ``auto``, else the directory."""
    return Path(run.output.dir) / "checkpoints" if resume == "auto" else Path(resume)


def check_resume_plan(run, ds, world_size, counts, hf_cfg, resume: str) -> None:
    """Refuse, before any heavy work, a checkpoint this run cannot continue.

    Reads only the checkpoint's JSON (:func:`loramoe_ds.parallel.checkpoint.check_resume`);
    nothing to resume (``auto`` without ``latest``) passes.
    """
    from loramoe_ds.parallel.checkpoint import base_identity, check_resume

    now = {
        "world_size": world_size,
        "ep_size": run.parallel.ep_size,
        "experts_per_layer": counts,
        "adapter": run.adapter.to_dict(),
        "base": base_identity(hf_cfg),
        "train_batch_size": int(ds["train_batch_size"]),
    }
    src = checkpoint_source(run, resume)
    if resume != "auto" and not src.is_dir():
        raise ValueError(f"--resume {resume}: no such checkpoint directory")
    check_resume(src, now)
