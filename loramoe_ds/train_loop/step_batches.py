"""Feed a resumable loader to the trainer one optimizer step (GAS micro-batches) at a time."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


def step_batches(loader: Iterable[dict[str, Any]], gas: int) -> Iterator[list[dict[str, Any]]]:
    """Yield lists of ``gas`` consecutive micro-batches, running through epochs forever.

    Iterating ``loader`` once is one epoch (the resumable loaders of
    :mod:`loramoe_ds.data` continue at their saved position); a step may take its
    micro-batches from two epochs. The caller stops after the last step it wants:
    the loader's ``state_dict()`` then counts exactly the batches handed out.

    Raises:
        ValueError: If ``gas < 1``, or two passes in a row yield no batch (a
            resumed loader may sit at the end of an epoch: one empty pass is fine).
    """
    if gas < 1:
        raise ValueError(f"gas={gas}: must be >= 1")
    group: list[dict[str, Any]] = []
    empty_passes = 0
    while True:
        got = False
        for batch in loader:
            got = True
            group.append(batch)
            if len(group) == gas:
                yield group
                group = []
        empty_passes = 0 if got else empty_passes + 1
        if empty_passes >= 2:
            raise ValueError("the data loader yields no batch: no data for this rank")
