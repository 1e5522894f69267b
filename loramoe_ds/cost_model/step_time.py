"""Predicted FLOPs and step time of one optimizer step on one rank."""

from __future__ import annotations

from loramoe_ds.cost_model.collectives import COLLECTIVES
from loramoe_ds.cost_model.workload import Cost, ModelShapes, Workload


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
