"""The cost side of a plan: model shapes from the ``meta`` device, the auto choices, their table.

:func:`model_shapes` reads an injected model built on ``meta`` (no weights) into a
:class:`~loramoe_ds.cost_model.ModelShapes`; :func:`workload` turns the run
config into a :class:`~loramoe_ds.cost_model.Workload`; :func:`resolve_auto`
applies ``parallel.ep_size: auto`` and ``parallel.zero_stage: auto``;
:func:`describe_options` is the part of ``--dry-run`` that prints every option
with its predicted bytes and memory. The arithmetic is
:mod:`loramoe_ds.cost_model`.

Decoder-layer module order (Llama, Qwen2, Mistral): input norm, q/k/v
(parallel), o, post-attention norm, gate/up (parallel), down. A base module's
weight is needed in backward when a trainable tensor lies upstream of it
(:attr:`~loramoe_ds.cost_model.ModelShapes.base_backward`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from loramoe_ds import cost_model as cm

STAGE_OF = {
    "input_layernorm": 0,
    "q_proj": 1,
    "k_proj": 1,
    "v_proj": 1,
    "o_proj": 2,
    "post_attention_layernorm": 3,
    "gate_proj": 4,
    "up_proj": 4,
    "down_proj": 5,
}
"""Execution stage of a decoder-layer module (parallel branches share a stage)."""
LAST_STAGE = max(STAGE_OF.values())
"""The MLP's output projection: its output reaches the layer's output through a residual add."""

_LAYER = re.compile(r"\.layers\.(\d+)\.")
DEFAULT_GPU_GIB = 80.0
"""Memory assumed per rank for a cluster dry run without ``parallel.memory_budget_gb``."""

# Step-time assumptions of a cluster dry run (``--gpus-per-node``): H100 SXM nodes
# (docs/scaling.md states and discusses each).
ACHIEVED_FLOPS = 400e12
"""FLOP/s one H100 achieves on these matmuls: 40% of its 989 TFLOP/s dense bf16 peak."""
INTRA_NODE_BW = 150e9
"""Bytes/s one GPU sends in a ring collective inside a node (NVLink 4: 450 GB/s peak
per direction; a third of it achieved at these message sizes)."""
INTER_NODE_BW = 0.8 * 400e9 / 8
"""Bytes/s of a node's one 400 Gb/s link, 80% achieved (40 GB/s): a ring collective
spanning nodes runs at it (each inter-node hop of the ring carries one rank's
stream); an all-to-all spanning nodes shares it among the node's GPUs."""


def _stage(name: str) -> int:
    for key, st in STAGE_OF.items():
        if f".{key}." in f".{name}." or name.endswith(key):
            return st
    return 0


def _runs_backward(name: str, is_embed: bool, i0: int | None, first: dict[int, int]) -> bool:
    """Whether a frozen base module runs in backward (module docstring)."""
    if is_embed or i0 is None:
        return False
    mt = _LAYER.search(f".{name}.")
    if mt is None:
        return True  # final norm, LM head: downstream of every adapter
    li = int(mt.group(1))
    return li > i0 or (li == i0 and _stage(name) > first[i0])


def model_shapes(model, hf_cfg) -> cm.ModelShapes:
    """The :class:`~loramoe_ds.cost_model.ModelShapes` of an injected model (on ``meta``)."""
    layers = model.moe_layers()
    linears = []
    first: dict[int, int] = {}
    for m in layers:
        idx = int(_LAYER.search(f".{m.name}.").group(1))
        first[idx] = min(first.get(idx, 99), _stage(m.name))
    i0 = min(first) if first else None
    for m in layers:
        idx = int(_LAYER.search(f".{m.name}.").group(1))
        bank = m.experts
        linears.append(
            cm.LinearShape(
                idx,
                m.in_features,
                m.out_features,
                bank.num_experts,
                m.router.weight.shape[0],
                bank.rank,
                _runs_backward(m.name, False, i0, first),
                _stage(m.name) == LAST_STAGE,
            )  # fmt: skip
        )
    sizes, bwd, in_layer = [], [], []
    embed = model.base.get_input_embeddings().weight
    head = model.base.get_output_embeddings().weight
    head_index = 0
    layer_params: dict[int, int] = {}
    for name, p in model.base.named_parameters():
        if p.requires_grad:
            continue
        n = p.numel()
        if p is head:
            head_index = len(sizes)
        mt = _LAYER.search(f".{name}")
        sizes.append(n)
        in_layer.append(mt is not None)
        if mt is not None:
            li = int(mt.group(1))
            layer_params[li] = layer_params.get(li, 0) + n
        bwd.append(_runs_backward(name, p is embed, i0, first))
    lin_index = {m.name: i for i, m in enumerate(layers)}
    mods = []
    embed_module = model.base.get_input_embeddings()
    for order, (name, mod) in enumerate(model.base.named_modules()):
        own = list(mod.parameters(recurse=False))
        if not own:
            continue
        kind = {"Router": "router", "ExpertBank": "bank"}.get(type(mod).__name__, "base")
        parent = name.rsplit(".", 1)[0]
        mt = _LAYER.search(f".{name}.")
        layer = int(mt.group(1)) if mt else -1
        # forward order: by layer, stage, then as registered (a wrapper's base, router, bank)
        key = (layer if layer >= 0 else (-1 if mod is embed_module else 10**9), _stage(name), order)
        mods.append((key, cm.ModuleShape(
            params=tuple((id(q), q.numel()) for q in own),
            layer=layer,
            kind=kind,
            linear=lin_index.get(parent, -1) if kind != "base" else -1,
            backward=kind != "base" or _runs_backward(name, own[0] is embed, i0, first),
            name=name,
        )))  # fmt: skip
    modules = tuple(m for _, m in sorted(mods, key=lambda km: km[0]))
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    return cm.ModelShapes(
        base_params=tuple(sizes),
        base_backward=tuple(bwd),
        base_in_layer=tuple(in_layer),
        embed_params=embed.numel(),
        head_index=head_index,
        layer_params=max(layer_params.values(), default=0),
        linears=tuple(linears),
        modules=modules,
        num_layers=len(layer_params) or hf_cfg.num_hidden_layers,
        hidden=hf_cfg.hidden_size,
        intermediate=hf_cfg.intermediate_size,
        heads=hf_cfg.num_attention_heads,
        kv_heads=getattr(hf_cfg, "num_key_value_heads", None) or hf_cfg.num_attention_heads,
        head_dim=head_dim,
        vocab=hf_cfg.vocab_size,
    )


def workload(
    run,
    ds: dict[str, Any],
    world: int,
    ep_size: int,
    zero_stage: int,
    placements,
    tokens: int | None = None,
    label_tokens: int | None = None,
    cpu: bool | None = None,
) -> cm.Workload:
    """The :class:`~loramoe_ds.cost_model.Workload` of a run config at one layout.

    ``tokens`` defaults to ``micro_batch_size x data.max_length`` (the padded
    worst case; packed rows are exactly that long); ``label_tokens`` to half of it;
    ``cpu`` (gloo ranks: their all-gather copy, the sparse expert dropout) to
    ``DS_ACCELERATOR=cpu``.
    """
    from loramoe_ds.model.moe_linear import SPARSE_DROPOUT_MAX_P
    from loramoe_ds.train_loop.step_metrics import STEP_METRICS

    t, a = run.train, run.adapter
    aux = bool(a.lbc_beta or a.load_balance_coef or a.z_loss_coef or a.router_supervision_coef)
    if cpu is None:
        cpu = os.environ.get("DS_ACCELERATOR") == "cpu"  # as loramoe_ds/plan.py reads it
    zero = ds.get("zero_optimization", {})
    T = tokens if tokens is not None else t.micro_batch_size * run.data.max_length
    b = 2 if t.precision == "bf16" else 4
    return cm.Workload(
        tokens=T,
        seq_len=run.data.max_length,
        label_tokens=label_tokens if label_tokens is not None else T // 2,
        gas=t.grad_accum,
        world=world,
        ep_size=ep_size,
        zero_stage=zero_stage,
        placements=tuple(placements),
        router=a.router,
        top_k=a.top_k,
        param_bytes=b,
        act_bytes=b,
        activation_checkpointing=t.activation_checkpointing,
        aux_global=a.aux_loss_scope == "global_batch",
        records=t.micro_batch_size,
        token_mean=t.loss_reduction == "token_mean",
        metrics=len(STEP_METRICS) + 3,
        persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 100_000)),
        max_reuse_distance=int(zero.get("stage3_max_reuse_distance", 1_000_000_000)),
        reduce_bucket=int(zero.get("reduce_bucket_size", 500_000_000)),
        max_live=int(zero.get("stage3_max_live_parameters", 1_000_000_000)),
        prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", 50_000_000)),
        dropout=a.dropout > 0,
        router_outputs=(3 if aux else 1)
        + (1 if cpu and 0 < a.dropout <= SPARSE_DROPOUT_MAX_P else 0),
        aux_losses=aux,
        gather_copy=cpu,
    )


@dataclass
class Option:
    """One candidate layout and its predicted cost."""

    ep_size: int
    zero_stage: int
    placements: list[str]
    cost: cm.Cost
    fits: bool


def memory_budget(run, gpus_per_node: int | None) -> tuple[float, str]:
    """Bytes one rank may hold, and where the number comes from."""
    given = run.parallel.memory_budget_gb
    if given is not None:
        return given * cm.GIB, f"parallel.memory_budget_gb={given}"
    try:
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.get_device_properties(0).total_memory
            return float(n), "this machine's GPU"
    except Exception:  # noqa: BLE001 -- no usable CUDA: fall through
        pass
    if gpus_per_node:
        return DEFAULT_GPU_GIB * cm.GIB, f"{DEFAULT_GPU_GIB:.0f} GiB assumed per GPU"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return ram / max(local, 1), f"host RAM / {local} local rank(s)"


def options(
    run, ds, shapes: cm.ModelShapes, world: int, budget: float, ds_stage=None
) -> list[Option]:
    """Every (ep_size, ZeRO stage) candidate with its placements and cost.

    ``parallel.ep_size: auto`` tries every divisor of the world size that divides
    some layer's expert count, placing each layer by :func:`cost_model.choose_placements
    <loramoe_ds.cost_model.choose_placements>`; a fixed ``ep_size`` keeps the
    layout's default rule (:func:`~loramoe_ds.placement.layer_placements`).
    ``zero_stage: auto`` tries 2 and 3 unless the DeepSpeed JSON (``ds_stage``) fixes it.
    """
    from loramoe_ds.config.run import AUTO
    from loramoe_ds.placement import layer_placements

    out = []
    ep_fixed, stage_fixed = run.parallel.ep_size, run.parallel.zero_stage
    if stage_fixed == AUTO and ds_stage is not None:
        stage_fixed = ds_stage
    stages = [2, 3] if stage_fixed == AUTO else [int(stage_fixed)]
    counts = shapes.layer_counts()
    if ep_fixed == AUTO:
        eps = [d for d in range(1, world + 1) if world % d == 0]
        eps = [p for p in eps if p == 1 or any(e and e % p == 0 for e in counts)]
    else:
        eps = [ep_fixed]
    for z in stages:
        for p in eps:
            if ep_fixed == AUTO:
                probe = workload(run, ds, world, p, z, [cm.REPLICATED] * shapes.num_layers)
                place = cm.choose_placements(shapes, probe)
            else:
                place = layer_placements(counts, p)
            if ep_fixed == AUTO and p > 1 and cm.SHARDED not in place:
                continue  # no layer sharded: the same layout as ep_size 1
            w = workload(run, ds, world, p, z, place)
            cost = cm.predict(shapes, w)
            fits = cost.peak_memory(w.activation_checkpointing) <= budget
            out.append(Option(p, z, place, cost, fits))
    return out


def pick(opts: list[Option], stage_auto: bool, checkpointing: bool = False) -> Option:
    """The chosen option: ZeRO-2 unless only ZeRO-3 fits; then the fewest wire bytes.

    When nothing fits, the option needing the least memory.
    """
    fitting = [o for o in opts if o.fits]
    if not fitting:
        return min(opts, key=lambda o: (o.cost.peak_memory(checkpointing), o.cost.total_wire))
    if stage_auto and any(o.zero_stage == 2 for o in fitting):
        fitting = [o for o in fitting if o.zero_stage == 2]
    return min(fitting, key=lambda o: (o.cost.total_wire, o.ep_size))


def describe_options(
    opts: list[Option],
    chosen: Option,
    budget: float,
    where: str,
    checkpointing: bool,
    gpus_per_node: int | None = None,
) -> list[str]:
    """The ``--dry-run`` table: every option's predicted bytes by collective and memory."""
    names = sorted({k for o in opts for k in o.cost.bytes})
    mem_items = ["base", "adapter", "grads", "optimizer", "zero_buffers",
                 "activations_no_ckpt", "activations_ckpt"]  # fmt: skip
    if not any(o.fits for o in opts):
        need = min(o.cost.peak_memory(checkpointing) for o in opts)
        lines0 = [
            f"warning: no option fits the memory budget ({cm.human_bytes(budget)} per rank; "
            f"the smallest needs {cm.human_bytes(need)}): more ranks, "
            "train.activation_checkpointing, a smaller micro-batch or CPU offload"
        ]
    else:
        lines0 = []
    lines = lines0 + [
        "predicted per rank per optimizer step (loramoe_ds/cost_model/; bytes = collective "
        f"buffers, wire = sent over a ring; memory budget {cm.human_bytes(budget)} from {where}):"
    ]
    for o in opts:
        mark = "->" if o is chosen else "  "
        n_sh = sum(p == cm.SHARDED for p in o.placements)
        lines.append(
            f"{mark} ep_size {o.ep_size}, ZeRO-{o.zero_stage}: {n_sh}/{len(o.placements)} layers "
            f"sharded; wire {cm.human_bytes(o.cost.total_wire)}; peak memory "
            f"{cm.human_bytes(o.cost.peak_memory(checkpointing))}"
            + ("" if o.fits else " (does not fit)")
        )
        if gpus_per_node:
            w = o.cost.workload
            t = cm.step_seconds(o.cost, w, gpus_per_node, INTRA_NODE_BW, INTER_NODE_BW,
                                ACHIEVED_FLOPS)  # fmt: skip
            lines.append(
                f"     step time (H100, no overlap): compute {t['compute']:.3f} s + comm "
                f"{t['comm']:.3f} s = {t['total']:.3f} s ({o.cost.flops / 1e12:.1f} TFLOP)"
            )
        lines.append(
            "     bytes: "
            + ", ".join(
                f"{k} {cm.human_bytes(o.cost.bytes[k])}" for k in names if k in o.cost.bytes
            )
        )
        lines.append(
            "     memory: "
            + ", ".join(f"{k} {cm.human_bytes(o.cost.memory[k])}" for k in mem_items)
        )
    return lines
