"""The placement of each decoder layer's expert banks under expert parallelism: the one rule.

Pure (standard library only), so the plan, the cost model and the process-group
checks use it before any process group or model exists. A decoder layer's banks
are either :data:`SHARDED` over the EP group (E / P experts per rank, tokens by
all-to-all) or :data:`REPLICATED` (every rank holds the whole bank as an engine
parameter and computes its own tokens' mixture). Why replication rather than
uneven shards, and what each costs: docs/design.md, "Placement rule".
:class:`~loramoe_ds.parallel.layout.AdapterLayout` applies the result.
"""

from __future__ import annotations

from collections.abc import Sequence

SHARDED = "sharded"
"""Placement: the bank is split over the EP group (E / P experts per rank, all-to-all)."""
REPLICATED = "replicated"
"""Placement: every rank holds the whole bank as an engine parameter (local mixture)."""
PLACEMENTS = (SHARDED, REPLICATED)
"""The placements of a decoder layer's banks (``placements`` lists one per layer)."""


def layer_placements(
    counts: Sequence[int], ep_size: int, placements: Sequence[str] | None = None
) -> list[str]:
    """The placement of each decoder layer's banks: the one rule (module docstring).

    Pure; call before any process group (``validate_ep`` does).

    Args:
        counts: Expert count of each decoder layer, bottom to top.
        ep_size: P, ranks per EP group.
        placements: An explicit placement per decoder layer (:data:`PLACEMENTS`),
            or ``None`` for the default: :data:`SHARDED` where ``P > 1`` divides
            the layer's count, :data:`REPLICATED` elsewhere.

    Returns:
        One of :data:`PLACEMENTS` per decoder layer.

    Raises:
        ValueError: ``placements`` of the wrong length, with an unknown value,
            or sharding a layer whose count ``P`` does not divide (or ``P == 1``).
    """
    counts = list(counts)
    if placements is None:
        return [SHARDED if ep_size > 1 and n % ep_size == 0 else REPLICATED for n in counts]
    placements = list(placements)
    if len(placements) != len(counts):
        raise ValueError(
            f"placements={placements}: {len(placements)} entries for {len(counts)} decoder "
            f"layers (experts per layer {counts}); give one of {list(PLACEMENTS)} per layer"
        )
    for i, (p, n) in enumerate(zip(placements, counts)):
        if p not in PLACEMENTS:
            raise ValueError(f"placements[{i}]={p!r}: must be one of {list(PLACEMENTS)}")
        if p == SHARDED and (ep_size == 1 or n % ep_size):
            raise ValueError(
                f"placements[{i}]={p!r}: layer {i} has {n} experts, which ep_size={ep_size} "
                f"cannot split evenly{' (no expert-parallel group)' if ep_size == 1 else ''}; "
                f"use {REPLICATED!r} for it"
            )
    return placements
