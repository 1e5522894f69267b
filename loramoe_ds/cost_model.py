"""Predicted bytes and memory of one optimizer step, per rank, from shapes alone.

Pure arithmetic: no torch.distributed, no DeepSpeed, no tensors. The plan
(:mod:`loramoe_ds.plan`) builds a :class:`ModelShapes` from the model on the
``meta`` device and a :class:`Workload` from the configs; :func:`predict` gives
a :class:`Cost`; :func:`choose_placements` and :func:`choose_zero_stage` are the
``parallel.ep_size: auto`` / ``parallel.zero_stage: auto`` rules. Measured
against real runs by ``bench/plan_check.py`` (docs/benchmarks.md).

Shape legend: W world size, P ``ep_size``, L = E/P local experts, E experts of a
layer, R LoRA rank, D / O input / output width of an adapted linear, K top-k,
T token rows per micro-batch per rank (micro-batch x padded length), G GAS
micro-batches per optimizer step, b bytes of a base / engine parameter element
(2 in bf16, 4 in fp32), a bytes of an activation element.

**Byte convention.** A collective's bytes are its full buffer, as handed to
``torch.distributed``: ``all_reduce`` / ``broadcast`` the tensor,
``all_gather*`` the gathered output, ``reduce_scatter*`` the unreduced input,
``all_to_all_single`` the rows this rank hands in (its rows to itself
included). What crosses the wire per rank is :func:`wire_bytes` (ring
algorithms): ``(n-1)/n`` of the buffer for all-gather, reduce-scatter and
all-to-all over n ranks, ``2(n-1)/n`` for all-reduce.

**Per optimizer step, per rank** (the code path each term follows):

* ``zero3_param_allgather`` (ZeRO-3; DeepSpeed 0.19.8 ``partition_parameters``):
  every engine parameter (frozen base, routers, replicated banks) larger than
  ``stage3_param_persistence_threshold`` is all-gathered to ``ceil(n/W)*W``
  elements at its module's forward, again at its backward (all but the input
  embedding, whose backward needs no weight), and once more per decoder layer
  when activation checkpointing recomputes it: ``G * (fwd + bwd [+ recompute])``.
  Persistent parameters (at most the threshold) are all-gathered once per step,
  after the optimizer step.
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
  plus the reverse in backward (plus the forward again when recomputed). Soft:
  every token once per EP rank with its L gates, ``P*T*(D+L)`` out and
  ``P*T*O`` back; top-k (dropless): ``T*K*D`` out, ``T*K*O`` back; elements of
  ``a`` bytes.
* ``expert_grad_allreduce``: the local shards' fp32 gradients, summed over the
  EDP group (W/P ranks) once per step.
* ``grad_norm_allreduce``: the shards' squared norm, 4 bytes over the EP group.
* ``token_mean_allreduce``: ``N_step``, 8 bytes (``train.loss_reduction=token_mean``).
* ``metrics_allreduce``: the step metrics, 8 bytes per value, once per step.
* ``aux_scope`` (``adapter.aux_loss_scope=global_batch``): per micro-batch, the
  row counts (8 bytes per rank), the padded rows of the aux-loss sums
  all-gathered, and their all-reduce in backward.

The EP-vs-replicated crossover of docs/benchmarks.md (top-k at P = W:
``T* = 3 E R / (2 K)`` tokens per rank) is this model's comparison of
``ep_rows_a2a`` with the replicated bank's ZeRO-3 traffic, layer by layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from loramoe_ds.placement import REPLICATED, SHARDED

GIB = 2**30


def _pad(n: int, w: int) -> int:
    """ZeRO's partitioned size of ``n`` elements over ``w`` ranks, gathered: ``ceil(n/w)*w``."""
    return -(-n // w) * w


@dataclass(frozen=True)
class LinearShape:
    """One adapted linear.

    Attributes:
        layer: Its decoder layer.
        d_in: D.
        d_out: O.
        experts: E, the bank's experts.
        slots: Router rows (E plus null experts).
        rank: R.
    """

    layer: int
    d_in: int
    d_out: int
    experts: int
    slots: int
    rank: int
    input_grad: bool = True
    """Whether the gradient of its input is needed (a trainable tensor upstream);
    when not, the backward of a top-k dispatch returns no input rows."""

    @property
    def bank_params(self) -> int:
        """``E * R * (D + O)``."""
        return self.experts * self.rank * (self.d_in + self.d_out)

    @property
    def router_params(self) -> int:
        return self.slots * self.d_in


@dataclass(frozen=True)
class ModuleShape:
    """One module holding parameters, in forward order (the unit ZeRO-3 gathers).

    Attributes:
        params: ``(parameter id, elements)`` of its own parameters (tied weights
            share an id).
        layer: Its decoder layer, or -1 outside the decoder layers.
        kind: ``base`` (frozen), ``router`` or ``bank`` (an adapted linear's experts).
        linear: Index of its adapted linear in :attr:`ModelShapes.linears` (routers,
            banks), else -1.
        backward: Whether it runs in backward (base modules: some trainable tensor
            upstream; routers and banks always).
    """

    params: tuple[tuple[int, int], ...]
    layer: int
    kind: str
    linear: int = -1
    backward: bool = True


@dataclass(frozen=True)
class ModelShapes:
    """What the cost model needs of a model (from the ``meta`` device, no weights).

    Attributes:
        base_params: Element count of every frozen base parameter.
        base_backward: Per base parameter: whether its module runs in backward,
            i.e. the gradient of its input is needed (some trainable tensor lies
            upstream of it). The input embedding never does; in the first
            adapted decoder layer only the modules after its first adapted one.
        base_in_layer: Per base parameter: whether it belongs to a decoder layer
            (recomputed under activation checkpointing).
        embed_params: Elements of the input embedding.
        head_index: Index in :attr:`base_params` of the LM head's weight (the
            embedding's index when the two are tied: then it is used, and
            gathered, twice in forward).
        layer_params: Elements of the base parameters of one decoder layer.
        linears: Every adapted linear.
        modules: Every module with parameters, in forward order (ZeRO-3's trace).
        num_layers, hidden, intermediate, heads, kv_heads, head_dim, vocab:
            The decoder's shapes (activations and FLOPs).
    """

    base_params: tuple[int, ...]
    base_backward: tuple[bool, ...]
    base_in_layer: tuple[bool, ...]
    embed_params: int
    head_index: int
    layer_params: int
    linears: tuple[LinearShape, ...]
    modules: tuple[ModuleShape, ...]
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def n_base(self) -> int:
        return sum(self.base_params)

    def layer_counts(self) -> list[int]:
        """Experts of each decoder layer (its first adapted linear's bank)."""
        out: dict[int, int] = {}
        for lin in self.linears:
            out.setdefault(lin.layer, lin.experts)
        return [out.get(i, 0) for i in range(self.num_layers)]


@dataclass(frozen=True)
class Workload:
    """One optimizer step's shape and the parallel layout.

    Attributes:
        tokens: T, token rows per micro-batch per rank (micro-batch x padded length).
        seq_len: S, the padded row length (attention activations).
        label_tokens: Labelled positions per micro-batch per rank (the LM head runs there).
        gas: G.
        world: W.
        ep_size: P.
        zero_stage: 0-3.
        placements: One of ``sharded`` / ``replicated`` per decoder layer.
        router: ``soft`` or ``topk``.
        top_k: K (top-k).
        param_bytes: b (2 bf16, 4 fp32).
        act_bytes: a.
        activation_checkpointing: Recompute each decoder layer in backward.
        aux_global: ``aux_loss_scope=global_batch``.
        records: Records per micro-batch per rank (the aux-loss rows).
        token_mean: ``loss_reduction=token_mean``.
        metrics: Values reduced per step (``train_loop.step_metrics``).
        persistence_threshold: ZeRO-3 ``stage3_param_persistence_threshold``.
        max_reuse_distance: ZeRO-3 ``stage3_max_reuse_distance``.
        reduce_bucket: ZeRO ``reduce_bucket_size`` (elements).
        dropout: Whether the expert input dropout is on (one more saved copy of x).
    """

    tokens: int
    seq_len: int
    label_tokens: int
    gas: int
    world: int
    ep_size: int
    zero_stage: int
    placements: tuple[str, ...]
    router: str = "soft"
    top_k: int = 2
    param_bytes: int = 4
    act_bytes: int = 4
    activation_checkpointing: bool = False
    aux_global: bool = False
    records: int = 1
    token_mean: bool = True
    metrics: int = 12
    persistence_threshold: int = 100_000
    max_reuse_distance: int = 1_000_000_000
    reduce_bucket: int = 500_000_000
    dropout: bool = False


@dataclass
class Cost:
    """Predicted per-rank bytes per optimizer step (by collective) and memory (by item)."""

    bytes: dict[str, float] = field(default_factory=dict)
    wire: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    flops: float = 0.0
    workload: Workload | None = None

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    @property
    def total_wire(self) -> float:
        return sum(self.wire.values())

    def peak_memory(self, checkpointing: bool) -> float:
        """Resident state plus the activations of one micro-batch."""
        skip = "activations_no_ckpt" if checkpointing else "activations_ckpt"
        return sum(v for k, v in self.memory.items() if k != skip)


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
    "aux_scope": ("all_gather", "world"),
}


def _rows_bytes(lin: LinearShape, w: Workload, passes: int) -> float:
    """``ep_rows_a2a`` buffer bytes of one sharded linear, one micro-batch.

    Each forward pass (the forward, and the recompute under activation
    checkpointing) sends rows out and back; the backward reverses both, except
    that a top-k linear whose input needs no gradient gets no input rows back
    (soft: the gates travel with the rows and always need theirs).
    """
    P, T, a = w.ep_size, w.tokens, w.act_bytes
    fwd_passes = passes - 1
    if w.router == "soft":
        L = lin.experts // P
        return passes * P * T * (lin.d_in + L + lin.d_out) * a
    fwd = T * w.top_k * (lin.d_in + lin.d_out) * a
    bwd = T * w.top_k * (lin.d_out + (lin.d_in if lin.input_grad else 0)) * a
    return fwd_passes * fwd + bwd


def predict(shapes: ModelShapes, w: Workload) -> Cost:
    """Bytes per collective and memory per item of one optimizer step on one rank.

    Args:
        shapes: The model.
        w: The workload and layout (``w.placements`` one per decoder layer).

    Returns:
        The :class:`Cost` (module docstring for every term).
    """
    W, P, G, b = w.world, w.ep_size, w.gas, w.param_bytes
    place = list(w.placements)
    assert len(place) == shapes.num_layers, (place, shapes.num_layers)
    sharded = [lin for lin in shapes.linears if place[lin.layer] == SHARDED and P > 1]
    rep = [lin for lin in shapes.linears if not (place[lin.layer] == SHARDED and P > 1)]
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
        by["engine_grad_reduce"] = G * sum(_pad(n, W) for n in trainable) * b
        if sharded and w.zero_stage == 3:
            by["clip_grad_allgather"] = sum(_pad(n, W) for n in trainable) * 4
    # -- expert parallelism ----------------------------------------------
    if sharded:
        per_counts = (P if w.router == "soft" else 0) * 8
        by["ep_counts_a2a"] = (
            G * fwd_passes * sum((per_counts or lin.experts * 8) for lin in sharded)
        )
        by["ep_rows_a2a"] = G * sum(_rows_bytes(lin, w, passes) for lin in sharded)
        if W // P > 1:
            by["expert_grad_allreduce"] = sum(lin.bank_params // P for lin in sharded) * 4
        by["grad_norm_allreduce"] = 4.0
    # -- small all-reduces ----------------------------------------------
    if W > 1:
        if w.token_mean:
            by["token_mean_allreduce"] = 8.0
        by["metrics_allreduce"] = 8.0 * w.metrics
        if w.aux_global:
            cols = sum(lin.slots for lin in shapes.linears)
            rows = W * w.records * cols * 4 * 2  # gathered, and all-reduced in backward
            by["aux_scope"] = G * fwd_passes * (W * 8 + rows)
    groups = {"world": W, "ep": P, "edp": W // P}
    wire = {k: wire_bytes(COLLECTIVES[k][0], v, groups[COLLECTIVES[k][1]]) for k, v in by.items()}
    return Cost(by, wire, memory(shapes, w, sharded, rep), flops(shapes, w), w)


def zero3_trace(shapes: ModelShapes, w: Workload) -> list[ModuleShape]:
    """The modules one micro-batch fetches, in order: forward, then backward.

    Backward: the LM head, every router (the aux losses reach them first), the
    final norm, then each decoder layer top-down -- its forward again when
    activation checkpointing recomputes it, then its modules that run backward
    in reverse. Banks of sharded layers are not engine parameters: left out.
    """
    sharded = {i for i, p in enumerate(w.placements) if p == SHARDED and w.ep_size > 1}
    mods = [
        m for m in shapes.modules
        if not (m.kind == "bank" and shapes.linears[m.linear].layer in sharded)
    ]  # fmt: skip
    fwd = list(mods)
    outside = [m for m in mods if m.layer < 0]
    embed = outside[0] if outside else None
    tail = [m for m in outside if m is not embed]
    bwd: list[ModuleShape] = []
    if tail:
        bwd.append(tail[-1])  # LM head
    bwd += [m for m in reversed(mods) if m.kind == "router"]
    bwd += [m for m in reversed(tail[:-1]) if m.backward]
    for layer in reversed(range(shapes.num_layers)):
        in_layer = [m for m in mods if m.layer == layer]
        if w.activation_checkpointing:
            bwd += in_layer
        bwd += [m for m in reversed(in_layer) if m.backward and m.kind != "router"]
    return fwd + bwd


def zero3_gathered_elements(shapes: ModelShapes, w: Workload) -> int:
    """Elements ZeRO-3 all-gathers in one optimizer step (DeepSpeed 0.19.8's coordinator).

    Per micro-batch, over :func:`zero3_trace`: a non-persistent parameter is
    gathered (``ceil(n/W)*W`` elements) when its module is fetched and it is not
    available; after the module it is released unless it is used again within
    ``stage3_max_reuse_distance`` elements of the modules that follow
    (``PartitionedParameterCoordinator.__params_to_release``). Everything is
    released at the end of the micro-batch. Parameters of at most
    ``stage3_param_persistence_threshold`` elements stay gathered; they are
    gathered once per step after the optimizer step (``_post_step``).
    """
    W, thr, reuse = w.world, w.persistence_threshold, w.max_reuse_distance
    trace = zero3_trace(shapes, w)
    sizes = [sum(n for _, n in m.params) for m in trace]
    prefix = [0]
    for n in sizes:
        prefix.append(prefix[-1] + n)
    where: dict[int, list[int]] = {}
    for i, m in enumerate(trace):
        for pid, _ in m.params:
            where.setdefault(pid, []).append(i)
    avail: set[int] = set()
    per_micro = 0
    persist: dict[int, int] = {}
    for i, m in enumerate(trace):
        for pid, n in m.params:
            if n <= thr:
                persist[pid] = n
            elif pid not in avail:
                per_micro += _pad(n, W)
                avail.add(pid)
        for pid, n in m.params:
            if n <= thr:
                continue
            later = [j for j in where[pid] if j > i]
            # kept when its next use starts before the scan has traversed `reuse` elements
            if not later or prefix[later[0]] - prefix[i + 1] >= reuse:
                avail.discard(pid)
    return w.gas * per_micro + sum(_pad(n, W) for n in persist.values())


def memory(
    shapes: ModelShapes, w: Workload, sharded: Sequence[LinearShape], rep: Sequence[LinearShape]
) -> dict[str, float]:
    """Per-rank memory items in bytes (module docstring of :func:`predict`'s terms).

    * ``base``: the frozen base, ``b`` bytes per element, ``1/W`` under ZeRO-3.
    * ``adapter``: routers and replicated banks (engine, ``b``; ``1/W`` under
      ZeRO-3) and the local EP shards (fp32).
    * ``grads``: engine gradients (fp32 partition, ``1/W`` under ZeRO >= 2) and
      the local shards' fp32 gradients.
    * ``optimizer``: AdamW state: fp32 master + two moments (12 B) of the engine
      parameters (``1/W`` under ZeRO >= 1), two moments (8 B) of the local shards.
    * ``zero_buffers``: ZeRO's gradient bucket (``reduce_bucket_size`` elements
      of ``b`` bytes, allocated whole by stages 2 and 3) and, under ZeRO-3, the
      gathered working set (one decoder layer plus the
      larger of the embedding / LM head).
    * ``activations_no_ckpt`` / ``activations_ckpt``: one micro-batch's saved
      activations without / with activation checkpointing (:func:`activations`).
    """
    W, P, b = w.world, w.ep_size, w.param_bytes
    z = w.zero_stage
    n_train = sum(lin.router_params for lin in shapes.linears) + sum(lin.bank_params for lin in rep)
    n_local = sum(lin.bank_params // P for lin in sharded)
    shard3 = W if (z == 3 and W > 1) else 1
    part_opt = W if z >= 1 else 1
    part_grad = W if z >= 2 else 1
    mem = {
        "base": sum(_pad(n, shard3) for n in shapes.base_params) / shard3 * b,
        "adapter": n_train / shard3 * b + n_local * 4,
        "grads": n_train / part_grad * 4 + n_local * 4,
        "optimizer": n_train / part_opt * 12 + n_local * 8,
    }
    buffers = 0.0
    if z >= 2:  # ZeRO-2's contiguous-gradient bucket, ZeRO-3's reduce bucket: full size
        buffers += w.reduce_bucket * b
    if z == 3 and W > 1:
        buffers += (shapes.layer_params + shapes.embed_params) * b
    mem["zero_buffers"] = buffers
    no_ckpt, ckpt = activations(shapes, w, sharded)
    mem["activations_no_ckpt"], mem["activations_ckpt"] = no_ckpt, ckpt
    return mem


def activations(
    shapes: ModelShapes, w: Workload, sharded: Sequence[LinearShape] = ()
) -> tuple[float, float]:
    """Saved activations of one micro-batch, bytes: (without, with) activation checkpointing.

    Per decoder layer and token (elements of ``a`` bytes; HF Llama with SDPA
    attention; h hidden, I intermediate, kv = kv_heads * head_dim):

    * attention block: the RMSNorm's input and output (2h), q after RoPE, k, v
      (h + 2kv), the attention output (h), o_proj's input is that output; the
      residual (h): ``5h + 2kv``;
    * MLP block: RMSNorm (2h), gate and up outputs, SiLU output, down input
      (4I): ``2h + 4I``;
    * in bf16 the RMSNorms also keep an fp32 copy of their input (2 x 2h);
    * each adapted linear: the router's fp32 logits and probabilities
      (2 slots x 4 bytes), the rank-space activations before and after gating
      (2 E R), the mixture output (O), the dropped-out input when dropout is on
      (D); a sharded soft linear also keeps the rows it received (P (D + L):
      the bank's input and gates), a sharded top-k one the received rows and
      the returned rows the gates multiply (K (D + O)) and its rank-space rows
      (2 K R) instead of 2 E R.

    Plus the LM head at labelled positions (logits and their fp32 softmax:
    ``2 V`` per labelled token, 4 bytes). With checkpointing only each layer's
    input (h per token) is kept, plus one layer's full set during its recompute.
    """
    T, a = w.tokens, w.act_bytes
    h, inter = shapes.hidden, shapes.intermediate
    kv = shapes.kv_heads * shapes.head_dim
    base_layer = (5 * h + 2 * kv) + (2 * h + 4 * inter) + (4 * h if a < 4 else 0)
    per_layer = [base_layer * T * a for _ in range(shapes.num_layers)]
    sharded_ids = {id(lin) for lin in sharded}
    for lin in shapes.linears:
        el = 2 * lin.experts * lin.rank + lin.d_out + (lin.d_in if w.dropout else 0)
        if id(lin) in sharded_ids:
            P = w.ep_size
            if w.router == "soft":
                el += P * (lin.d_in + lin.experts // P)
            else:
                el += w.top_k * (lin.d_in + lin.d_out) + 2 * w.top_k * lin.rank
                el -= 2 * lin.experts * lin.rank
        per_layer[lin.layer] += T * (el * a + 2 * lin.slots * 4)
    head = w.label_tokens * shapes.vocab * 4 * 2
    no_ckpt = sum(per_layer) + head
    ckpt = shapes.num_layers * T * h * a + max(per_layer, default=0) + head
    return float(no_ckpt), float(ckpt)


def flops(shapes: ModelShapes, w: Workload) -> float:
    """FLOPs of one optimizer step on one rank (matmuls only).

    Frozen base: ``2 N T`` forward, ``2 N T`` backward (input gradients only; no
    weight gradients), ``2 N T`` more when recomputed; attention ``4 S h`` per
    token and layer forward, twice that backward. Experts: ``2 T E R (D + O)``
    (soft) or ``2 T K R (D + O)`` (top-k) forward, twice that backward (input and
    weight gradients); routers ``2 T slots D`` likewise.
    """
    T, S, G = w.tokens, w.seq_len, w.gas
    n_mat = shapes.n_base - shapes.embed_params
    fwd_mult = 2 if w.activation_checkpointing else 1
    base = 2 * n_mat * T * (fwd_mult + 1)
    attn = 4 * S * shapes.hidden * T * shapes.num_layers * (fwd_mult + 2)
    adapter = 0.0
    for lin in shapes.linears:
        k = lin.experts if w.router == "soft" else w.top_k
        adapter += 2 * T * (k * lin.rank * (lin.d_in + lin.d_out) + lin.slots * lin.d_in)
    adapter *= fwd_mult + 2
    return float(G * (base + attn + adapter))


# -- the auto rules ----------------------------------------------------------


def layer_bytes(shapes: ModelShapes, w: Workload, layer: int, placement: str) -> float:
    """Wire bytes per step of one decoder layer's banks under one placement (the choice's metric).

    Sharded: its all-to-alls (EP group) and the EDP all-reduce of its shards;
    replicated: its banks' ZeRO traffic (gradient reduce-scatter; under ZeRO-3 also
    the all-gathers of every pass). Routers and the base are the same either way.
    """
    lins = [lin for lin in shapes.linears if lin.layer == layer]
    W, P, G, b = w.world, w.ep_size, w.gas, w.param_bytes
    passes = 2 + (1 if w.activation_checkpointing else 0)
    if placement == SHARDED:
        rows = G * sum(_rows_bytes(lin, w, passes) for lin in lins)
        edp = sum(lin.bank_params // P for lin in lins) * 4
        return wire_bytes("all_to_all", rows, P) + wire_bytes("all_reduce", edp, W // P)
    n = sum(lin.bank_params for lin in lins)
    total = (
        wire_bytes("reduce_scatter", G * n * b, W)
        if w.zero_stage >= 2
        else (wire_bytes("all_reduce", G * n * 4, W))
    )
    if w.zero_stage == 3:
        total += wire_bytes("all_gather", G * passes * n * b, W)
    return total


def choose_placements(shapes: ModelShapes, w: Workload) -> list[str]:
    """Per decoder layer, the placement moving fewer bytes (sharded only where P divides E)."""
    out = []
    for i, e in enumerate(shapes.layer_counts()):
        if w.ep_size == 1 or e % w.ep_size or e == 0:
            out.append(REPLICATED)
            continue
        s = layer_bytes(shapes, w, i, SHARDED)
        r = layer_bytes(shapes, w, i, REPLICATED)
        out.append(SHARDED if s < r else REPLICATED)
    return out


def choose_zero_stage(resident_stage2: float, budget: float) -> int:
    """ZeRO-2 when the replicated base and its state fit ``budget`` bytes, else ZeRO-3."""
    return 2 if resident_stage2 <= budget else 3


def step_seconds(
    cost: Cost,
    w: Workload,
    gpus_per_node: int,
    intra_bw: float,
    inter_bw: float,
    flops_per_s: float,
) -> dict[str, float]:
    """Predicted step time: compute plus communication, no overlap (an upper bound).

    A ring collective (all-gather, reduce-scatter, all-reduce) whose group spans
    nodes runs at ``min(intra_bw, inter_bw)`` per rank: each inter-node hop of
    the ring carries one rank's stream over the node's link. An all-to-all
    spanning nodes shares the node's link among its ``gpus_per_node`` ranks.
    Inside a node everything runs at ``intra_bw``. Compute is ``cost.flops /
    flops_per_s``. Returns ``{"compute": s, "comm": s, "total": s}``.
    """
    G = max(gpus_per_node, 1)
    groups = {"world": w.world, "ep": w.ep_size, "edp": w.world // w.ep_size}
    comm = 0.0
    for name, wire in cost.wire.items():
        kind, group = COLLECTIVES[name]
        n = groups[group]
        # EP groups are consecutive ranks; an EDP group (stride P) spans nodes when W does.
        spans = (w.world > G) if group == "edp" else n > G
        if not spans:
            bw = intra_bw
        elif kind == "all_to_all":
            bw = inter_bw / G
        else:
            bw = min(intra_bw, inter_bw)
        comm += wire / bw
    compute = cost.flops / flops_per_s
    return {"compute": compute, "comm": comm, "total": compute + comm}


def gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB" if x >= GIB / 10 else f"{x / 2**20:.1f} MiB"


def human_bytes(x: float) -> str:
    if x >= GIB:
        return f"{x / GIB:.2f} GiB"
    if x >= 2**20:
        return f"{x / 2**20:.2f} MiB"
    if x >= 1024:
        return f"{x / 1024:.1f} KiB"
    return f"{x:.0f} B"


__all__ = [
    "Cost",
    "LinearShape",
    "ModelShapes",
    "Workload",
    "choose_placements",
    "choose_zero_stage",
    "math",
    "predict",
    "step_seconds",
    "wire_bytes",
]
