"""Predicted bytes and memory of one optimizer step, per rank, from shapes alone.

Pure arithmetic: no torch.distributed, no DeepSpeed, no tensors. The plan
(:mod:`loramoe_ds.plan`) builds a :class:`ModelShapes` from the model on the
``meta`` device and a :class:`Workload` from the configs; :func:`predict` gives
a :class:`Cost`; :func:`choose_placements` and :func:`choose_zero_stage` are the
``parallel.ep_size: auto`` / ``parallel.zero_stage: auto`` rules. Measured
against real runs by ``bench/plan_check.py`` (docs/benchmarks.md).

The package, one concept per module:

* :mod:`~loramoe_ds.cost_model.workload`: the shapes, the workload, the
  :class:`Cost` (shape legend);
* :mod:`~loramoe_ds.cost_model.collectives`: bytes by collective (the byte
  convention, every term and the code path it follows);
* :mod:`~loramoe_ds.cost_model.zero3`: ZeRO-3's gathers and gathered peak: the
  model's module hooks, replayed through
  :mod:`~loramoe_ds.cost_model.coordinator` (DeepSpeed's parameter coordinator);
* :mod:`~loramoe_ds.cost_model.memory`: memory by item, activations;
* :mod:`~loramoe_ds.cost_model.step_time`: FLOPs, step time from stated
  bandwidths;
* :mod:`~loramoe_ds.cost_model.choose`: the per-layer placement and the ZeRO
  stage.
"""

from __future__ import annotations

from loramoe_ds.cost_model.choose import choose_placements, choose_zero_stage, layer_bytes
from loramoe_ds.cost_model.collectives import COLLECTIVES, collective_bytes, wire_bytes
from loramoe_ds.cost_model.coordinator import coordinate
from loramoe_ds.cost_model.memory import activations, memory
from loramoe_ds.cost_model.step_time import flops, step_seconds
from loramoe_ds.cost_model.workload import (
    GIB,
    Cost,
    LinearShape,
    ModelShapes,
    ModuleShape,
    Workload,
    gib,
    human_bytes,
    split_linears,
)
from loramoe_ds.cost_model.zero3 import (
    zero3_gathered_elements,
    zero3_live_peak,
    zero3_schedule,
    zero3_trace,
)
from loramoe_ds.placement import REPLICATED, SHARDED


def predict(shapes: ModelShapes, w: Workload) -> Cost:
    """Bytes per collective and memory per item of one optimizer step on one rank.

    Args:
        shapes: The model.
        w: The workload and layout (``w.placements`` one per decoder layer).

    Returns:
        The :class:`Cost` (:mod:`~loramoe_ds.cost_model.collectives` and
        :func:`~loramoe_ds.cost_model.memory.memory` for every term).
    """
    by, wire = collective_bytes(shapes, w)
    sharded, rep = split_linears(shapes, w)
    return Cost(by, wire, memory(shapes, w, sharded, rep), flops(shapes, w), w)


__all__ = [
    "COLLECTIVES",
    "GIB",
    "REPLICATED",
    "SHARDED",
    "Cost",
    "LinearShape",
    "ModelShapes",
    "ModuleShape",
    "Workload",
    "activations",
    "choose_placements",
    "choose_zero_stage",
    "collective_bytes",
    "flops",
    "gib",
    "human_bytes",
    "layer_bytes",
    "memory",
    "predict",
    "split_linears",
    "step_seconds",
    "wire_bytes",
    "coordinate",
    "zero3_gathered_elements",
    "zero3_live_peak",
    "zero3_schedule",
    "zero3_trace",
]
