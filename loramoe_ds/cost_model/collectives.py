"""Bytes each collective moves in one optimizer step, per rank (DeepSpeed 0.19.8, this code).

**Byte convention.** A collective's bytes are its full buffer, as handed to
``torch.distributed``: ``all_reduce`` / ``broadcast`` the tensor,
``all_gather*`` the gathered output, ``reduce_scatter*`` the unreduced input,
``all_to_all_single`` the rows this rank hands in (its rows to itself
included). What crosses the wire per rank is :func:`wire_bytes` (ring
algorithms): ``(n-1)/n`` of the buffer for all-gather, reduce-scatter and
all-to-all over n ranks, ``2(n-1)/n`` for all-reduce.

**Per optimizer step, per rank** (the code path each term follows):

* ``zero3_param_allgather`` (ZeRO-3; DeepSpeed 0.19.8 ``partition_parameters``):
  the engine parameters (frozen base, routers, replicated banks) larger than
  ``stage3_param_persistence_threshold``, all-gathered to ``ceil(n/W)*W``
  elements whenever a module needs one that is not gathered: ``G`` times what
  :mod:`~loramoe_ds.cost_model.zero3` counts in one micro-batch (a replay of
  DeepSpeed's coordinator over every module hook of forward, backward and the
  recompute: reuse distance, prefetcher, the recompute's release). Persistent
  parameters (at most the threshold) are all-gathered once per step, after the
  optimizer step.
* ``engine_grad_reduce``: the gradients of the trainable engine parameters
  (routers, replicated banks), ``reduce_scatter`` of ``ceil(n/W)*W`` elements in
  the gradient dtype at every micro-batch's backward (ZeRO-2 and 3 reduce as the
  gradients arrive).
* ``clip_grad_allgather`` (expert parallelism with sharded layers): the joint
  clip reads every engine gradient in full (``safe_get_full_grad``): one fp32
  all-gather of ``ceil(n/W)*W`` elements each, once per step (ZeRO-3; under
  ZeRO-2 the partitions are gathered by DeepSpeed's norm instead, not counted).
* ``ep_counts_a2a``: per sharded linear and micro-batch forward (and recompute):
  int64 counts, P (soft) or E (top-k) of them.
* ``ep_rows_a2a``: per sharded linear and micro-batch, forward out and back
  plus the reverse in backward (plus the forward again when recomputed, less
  the return of a soft linear that ends its layer: :func:`rows_bytes`). Soft:
  every token once per EP rank with its L gates, ``P*T*(D+L)`` out and
  ``P*T*O`` back; top-k (dropless): ``T*K*D`` out, ``T*K*O`` back; elements of
  ``a`` bytes.
* ``expert_grad_allreduce``: the local shards' fp32 gradients, summed over the
  EDP group (W/P ranks) once per step.
* ``grad_norm_allreduce``: the shards' squared norm, 4 bytes over the EP group.
* ``token_mean_allreduce``: ``N_step``, 8 bytes (``train.loss_reduction=token_mean``).
* ``metrics_allreduce``: the step metrics, 8 bytes per value, once per step.
* ``nonfinite_allreduce``: the index of the first non-finite term
  (``parallel/nonfinite.py``), one int64 (8 bytes) per step.
* ``aux_scope`` (``adapter.aux_loss_scope=global_batch``): per micro-batch, the
  row counts (8 bytes per rank), the padded rows of the aux-loss sums
  all-gathered, and their all-reduce in backward.

The EP-vs-replicated crossover of docs/benchmarks.md (top-k at P = W:
``T* = 3 E R / (2 K)`` tokens per rank) is this model's comparison of
``ep_rows_a2a`` with the replicated bank's ZeRO-3 traffic, layer by layer.
"""

from __future__ import annotations

from loramoe_ds.cost_model.workload import (
    LinearShape,
    ModelShapes,
    Workload,
    input_needs_grad,
    pad,
    split_linears,
)
from loramoe_ds.cost_model.zero3 import zero3_gathered_elements


def wire_bytes(kind: str, buffer: float, n: int) -> float:
    """Bytes one rank sends for a ring collective over ``n`` ranks (module docstring)."""
    if n <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2 * (n - 1) / n * buffer
    return (n - 1) / n * buffer


# collective -> (kind for wire_bytes, group: "world" | "ep" | "edp")
COLLECTIVES = {
    "zero3_param_allgather": ("all_gather", "world"),
    "engine_grad_reduce": ("reduce_scatter", "world"),
    "clip_grad_allgather": ("all_gather", "world"),
    "ep_counts_a2a": ("all_to_all", "ep"),
    "ep_rows_a2a": ("all_to_all", "ep"),
    "expert_grad_allreduce": ("all_reduce", "edp"),
    "grad_norm_allreduce": ("all_reduce", "ep"),
    "token_mean_allreduce": ("all_reduce", "world"),
    "metrics_allreduce": ("all_reduce", "world"),
    "nonfinite_allreduce": ("all_reduce", "world"),
    "aux_scope": ("all_gather", "world"),
}


def rows_bytes(lin: LinearShape, w: Workload, passes: int) -> float:
    """``ep_rows_a2a`` buffer bytes of one sharded linear, one micro-batch.

    Each forward pass (the forward, and the recompute under activation
    checkpointing) sends rows out and back; the backward reverses both, except
    that a top-k linear whose input needs no gradient gets no input rows back
    (soft: the gates travel with the rows and always need theirs; under
    activation checkpointing every input needs one). The
    recompute (non-reentrant, ``torch.utils.checkpoint``'s early stop) ends
    with the last operation that saves a tensor for backward: a soft linear
    that ends its layer (:attr:`LinearShape.ends_layer`) sums its returned
    rows, which saves nothing, so the recompute skips that return exchange.
    A top-k linear multiplies the returned rows by their gates, which saves
    them: it is recomputed in full.
    """
    P, T, a = w.ep_size, w.tokens, w.act_bytes
    fwd_passes = passes - 1
    if w.router == "soft":
        L = lin.experts // P
        skipped = P * T * lin.d_out * a if (fwd_passes > 1 and lin.ends_layer) else 0
        return passes * P * T * (lin.d_in + L + lin.d_out) * a - skipped
    fwd = T * w.top_k * (lin.d_in + lin.d_out) * a
    bwd = T * w.top_k * (lin.d_out + (lin.d_in if input_needs_grad(lin, w) else 0)) * a
    return fwd_passes * fwd + bwd


def collective_bytes(shapes: ModelShapes, w: Workload) -> tuple[dict[str, float], dict[str, float]]:
    """Buffer and wire bytes per collective of one optimizer step on one rank (module docstring).

    Args:
        shapes: The model.
        w: The workload and layout (``w.placements`` one per decoder layer).

    Returns:
        ``(buffer bytes, wire bytes)``, each keyed by the names of :data:`COLLECTIVES`.
    """
    W, P, G, b = w.world, w.ep_size, w.gas, w.param_bytes
    sharded, rep = split_linears(shapes, w)
    passes = 2 + (1 if w.activation_checkpointing else 0)  # fwd, bwd [, recompute]
    fwd_passes = 1 + (1 if w.activation_checkpointing else 0)
    by: dict[str, float] = {}

    # -- engine parameters: base, routers, replicated banks ----------------
    trainable = [lin.router_params for lin in shapes.linears] + [
        lin.experts * lin.rank * d for lin in rep for d in (lin.d_in, lin.d_out)
    ]
    if W > 1 and w.zero_stage == 3:
        by["zero3_param_allgather"] = zero3_gathered_elements(shapes, w) * b
    if W > 1 and w.zero_stage >= 2:
        by["engine_grad_reduce"] = G * sum(pad(n, W) for n in trainable) * b
        if sharded and w.zero_stage == 3:
            by["clip_grad_allgather"] = sum(pad(n, W) for n in trainable) * 4
    # -- expert parallelism ----------------------------------------------
    if sharded:
        per_counts = (P if w.router == "soft" else 0) * 8
        by["ep_counts_a2a"] = (
            G * fwd_passes * sum((per_counts or lin.experts * 8) for lin in sharded)
        )
        by["ep_rows_a2a"] = G * sum(rows_bytes(lin, w, passes) for lin in sharded)
        if W // P > 1:
            by["expert_grad_allreduce"] = sum(lin.bank_params // P for lin in sharded) * 4
        by["grad_norm_allreduce"] = 4.0
    # -- small all-reduces ----------------------------------------------
    if W > 1:
        if w.token_mean:
            by["token_mean_allreduce"] = 8.0
        by["metrics_allreduce"] = 8.0 * w.metrics
        by["nonfinite_allreduce"] = 8.0
        if w.aux_global:
            cols = sum(lin.slots for lin in shapes.linears)
            rows = W * w.records * cols * 4 * 2  # gathered, and all-reduced in backward
            by["aux_scope"] = G * fwd_passes * (W * 8 + rows)
    groups = {"world": W, "ep": P, "edp": W // P}
    wire = {k: wire_bytes(COLLECTIVES[k][0], v, groups[COLLECTIVES[k][1]]) for k, v in by.items()}
    return by, wire
