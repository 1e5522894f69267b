"""The cost model's inputs and output: a model's shapes, one step's workload, the cost.

Shape legend: W world size, P ``ep_size``, L = E/P local experts, E experts of a
layer, R LoRA rank, D / O input / output width of an adapted linear, K top-k,
T token rows per micro-batch per rank (micro-batch x padded length), G GAS
micro-batches per optimizer step, b bytes of a base / engine parameter element
(2 in bf16, 4 in fp32), a bytes of an activation element.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loramoe_ds.placement import SHARDED

GIB = 2**30


def pad(n: int, w: int) -> int:
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
    ends_layer: bool = False
    """Whether its output reaches the decoder layer's output through operations
    that save nothing for backward (the MLP's output projection of a pre-norm
    layer: a residual add). Non-reentrant activation checkpointing stops its
    recompute once every saved tensor is rebuilt, so such a soft linear's
    returned rows are not exchanged again in the recompute."""

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
        name: Its dotted name in the base model (``model.layers.3.mlp.gate_proj.base``):
            the modules enclosing it, whose hooks ZeRO-3 runs too
            (:func:`~loramoe_ds.cost_model.zero3.zero3_trace`).
    """

    params: tuple[tuple[int, int], ...]
    layer: int
    kind: str
    linear: int = -1
    backward: bool = True
    name: str = ""


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
        max_live: ZeRO-3 ``stage3_max_live_parameters``: the gathered elements
            the prefetcher fills up to.
        prefetch_bucket: ZeRO-3 ``stage3_prefetch_bucket_size`` (0: no prefetch).
        dropout: Whether the expert input dropout is on (one more saved copy of x).
        router_outputs: Tensors of a router's output that get a gradient: ZeRO-3
            runs the router's backward pre-hook once for each (logits,
            probabilities and gates with an auxiliary loss on, the gates alone
            without; plus the dropped-out input under the CPU's sparse dropout).
        aux_losses: Whether a router auxiliary loss is on: the wrapper model's
            forward then reads every router weight, and ZeRO-3 holds them as its
            external parameters (gathered at its forward and backward).
        gather_copy: Whether the process group all-gathers through a temporary of
            the output's size (gloo, measured: docs/benchmarks.md): each all-gather
            holds its output twice while it runs.
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
    max_live: int = 1_000_000_000
    prefetch_bucket: int = 50_000_000
    dropout: bool = False
    router_outputs: int = 3
    aux_losses: bool = True
    gather_copy: bool = False


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


def input_needs_grad(lin: LinearShape, w: Workload) -> bool:
    """Whether ``lin``'s input needs a gradient in this workload: a trainable tensor
    upstream (:attr:`LinearShape.input_grad`), or activation checkpointing, under
    which transformers makes the embedding's output require grad
    (``enable_input_require_grads``), so every input does."""
    return lin.input_grad or w.activation_checkpointing


def split_linears(shapes: ModelShapes, w: Workload) -> tuple[list[LinearShape], list[LinearShape]]:
    """The adapted linears whose banks are EP shards under ``w``, and the rest (engine)."""
    P = w.ep_size
    place = list(w.placements)
    assert len(place) == shapes.num_layers, (place, shapes.num_layers)
    sharded = [lin for lin in shapes.linears if place[lin.layer] == SHARDED and P > 1]
    rep = [lin for lin in shapes.linears if not (place[lin.layer] == SHARDED and P > 1)]
    return sharded, rep


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
