"""The ``auto`` rules: each layer's placement (EP shards vs replicated bank) and the ZeRO stage."""

from __future__ import annotations

from loramoe_ds.cost_model.collectives import rows_bytes, wire_bytes
from loramoe_ds.cost_model.workload import ModelShapes, Workload
from loramoe_ds.placement import REPLICATED, SHARDED


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
        rows = G * sum(rows_bytes(lin, w, passes) for lin in lins)
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
