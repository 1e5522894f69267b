"""Expert-parallel (EP) and expert-data-parallel (EDP) process groups.

Layout (identical to DeepSpeed's ``groups._create_expert_and_data_parallel``
without model/pipeline parallelism): with world size ``W`` and ``ep`` ranks per
EP group,

* EP groups are consecutive ranks ``[i*ep, (i+1)*ep)`` for ``i < W/ep``: the
  ranks that split one layer's experts between them and exchange tokens with
  all-to-all;
* EDP groups are the ranks at stride ``ep``: ``{j, j+ep, j+2*ep, ...}`` for
  ``j < ep``: the replicas of one expert shard, whose gradients are all-reduced.

Rank ``r`` has EP rank ``r % ep`` and EDP rank ``r // ep``; it holds experts
``[ep_rank * E/ep, (ep_rank+1) * E/ep)`` of every sharded layer (E experts) and
the whole bank of every replicated one (:mod:`loramoe_ds.parallel.layout`).

The groups are built with ``torch.distributed.new_group`` (every rank creates
every group, in the same order, as ``new_group`` requires) rather than through
DeepSpeed's private ``groups`` module, so that DeepSpeed's engine never mistakes
this run for a native ``deepspeed.moe`` run (which ZeRO-3 refuses).
:func:`validate_ep` checks the user's numbers *before* any process-group work;
:func:`init_process_group` is the one place the default process group starts.

Timeouts (no hang): every collective of the default and EP/EDP groups gives up
after ``parallel.timeout_s``, so a dead or silent peer makes the other ranks
fail within a bounded time instead of the machine's default. Work that only
rank 0 does while the others wait -- tokenising the dataset, building the data
cache, writing and verifying checkpoints -- may take far longer than one step's
collective: those waits run on :func:`rank0_group`, a gloo side group with
``parallel.rank0_timeout_s`` (gloo also keeps the waiting ranks off the NCCL
watchdog).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from loramoe_ds.placement import layer_placements

DEFAULT_TIMEOUT_S = 1800
"""``parallel.timeout_s``: seconds a collective of a step or checkpoint waits for a peer."""
DEFAULT_RANK0_TIMEOUT_S = 7200
"""``parallel.rank0_timeout_s``: seconds the other ranks wait for rank-0-only work."""

_timeouts = {"timeout_s": DEFAULT_TIMEOUT_S, "rank0_timeout_s": DEFAULT_RANK0_TIMEOUT_S}
_rank0_group: dict[str, Any] = {}
"""``{"world": default group, "group": side group}``: rebuilt when the default group changes."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_ep(
    ep_size: int,
    world_size: int,
    experts_per_layer: list[int],
    placements: Sequence[str] | None = None,
) -> list[str]:
    """Check ``ep_size`` against the world and resolve each decoder layer's placement.

    Call before creating any process group, so bad input fails fast and the same
    way on every rank. Any expert count is accepted: a layer whose count
    ``ep_size`` does not divide is replicated
    (:func:`~loramoe_ds.placement.layer_placements`, the placement rule).

    Args:
        ep_size: Ranks per expert-parallel group.
        world_size: Total ranks W.
        experts_per_layer: Expert count of each decoder layer (the resolved
            allocation, bottom to top).
        placements: Optional explicit placement per decoder layer
            (``"sharded"`` / ``"replicated"``).

    Returns:
        The placement of each decoder layer.

    Raises:
        ValueError: Naming the offending value and the valid choices.
    """
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size={ep_size!r}: must be an int >= 1")
    if world_size % ep_size:
        raise ValueError(
            f"ep_size={ep_size} does not divide the world size {world_size}; "
            f"valid ep_size values: {_divisors(world_size)}"
        )
    return layer_placements(experts_per_layer, ep_size, placements)


def ep_layout(world_size: int, ep_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """The rank lists of all EP groups and all EDP groups (pure; no communication).

    Returns:
        ``(ep_groups, edp_groups)``: ``ep_groups[i] = [i*ep, ..., (i+1)*ep - 1]``,
        ``edp_groups[j] = [j, j+ep, ...]``.
    """
    ep_groups = [list(range(i * ep_size, (i + 1) * ep_size)) for i in range(world_size // ep_size)]
    edp_groups = [list(range(j, world_size, ep_size)) for j in range(ep_size)]
    return ep_groups, edp_groups


@dataclass
class ExpertGroups:
    """This rank's view of the expert-parallel topology.

    Attributes:
        ep_size: Ranks per EP group.
        world_size: W.
        rank: Global rank.
        ep_group: Process group of this rank's EP group (``None`` when ep_size=1).
        edp_group: Process group of this rank's EDP group.
        ep_ranks: Global ranks of the EP group.
        edp_ranks: Global ranks of the EDP group.
    """

    ep_size: int
    world_size: int
    rank: int
    ep_group: Any
    edp_group: Any
    ep_ranks: list[int]
    edp_ranks: list[int]

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def edp_rank(self) -> int:
        return self.rank // self.ep_size

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep_size


def init_process_group(
    timeout_s: float | None = None, rank0_timeout_s: float | None = None
) -> None:
    """Start the default process group and the rank-0 side group (collective).

    The one place the process group is initialised (``deepspeed.init_distributed``,
    which reads ``RANK``/``WORLD_SIZE``/``MASTER_*`` as mapped by
    :mod:`loramoe_ds.launch.dist_env`), with ``timeout_s`` on every collective
    (DeepSpeed's own default would be ``DEEPSPEED_TIMEOUT``, 10 minutes). A no-op
    when the group already exists: :func:`loramoe_ds.run.prepare_data` starts it
    for several ranks before the data is read, :func:`loramoe_ds.run.train` and
    :meth:`~loramoe_ds.parallel.engine.MoETrainer.build` reuse it (or start it
    when they are the first).

    Args:
        timeout_s: ``parallel.timeout_s`` (default :data:`DEFAULT_TIMEOUT_S`).
        rank0_timeout_s: ``parallel.rank0_timeout_s`` of :func:`rank0_group`.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    import deepspeed

    if timeout_s is not None:
        _timeouts["timeout_s"] = timeout_s
    if rank0_timeout_s is not None:
        _timeouts["rank0_timeout_s"] = rank0_timeout_s
    bind_cuda_device()
    deepspeed.init_distributed(timeout=timedelta(seconds=_timeouts["timeout_s"]))
    side = rank0_group()
    if side is not None:
        dist.barrier(group=side)
        release_shm_buffer()


def shm_buffer_path() -> Path:
    """This rank's file of DeepSpeed's CPU shared-memory all-reduce (``deepspeed_shm_comm``).

    The op (built when every rank is on one host, ``LOCAL_SIZE == WORLD_SIZE``)
    names it ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    rank = os.environ.get("RANK", "0")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer() -> None:
    """Unlink this rank's shared-memory all-reduce file once every rank has mapped it.

    DeepSpeed creates one 69 MB file per rank in ``/dev/shm`` and never removes it,
    so every CPU run (and every killed rank) left its files behind until the
    memory ran out. ``init_distributed`` returns after each rank has opened the
    others' files and the barrier before this call waits for all of them: the
    mappings stay valid after the unlink, and the kernel frees the memory when
    the last process using it exits, however it exits.
    """
    shm_buffer_path().unlink(missing_ok=True)


def rank0_group() -> Any:
    """The gloo side group (all ranks) on which ranks wait for rank-0-only work.

    Created by :func:`init_process_group` with ``parallel.rank0_timeout_s``; created
    here (collectively, on first use) when a test started the default group itself.
    ``None`` without a process group.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    if _rank0_group.get("world") is not dist.group.WORLD:
        _rank0_group["group"] = dist.new_group(
            backend="gloo", timeout=timedelta(seconds=_timeouts["rank0_timeout_s"])
        )
        _rank0_group["world"] = dist.group.WORLD
    return _rank0_group["group"]


def collective_timeout() -> timedelta:
    """``parallel.timeout_s`` of this process (the default and EP/EDP groups)."""
    return timedelta(seconds=_timeouts["timeout_s"])


def bind_cuda_device() -> int | None:
    """Make ``cuda:LOCAL_RANK`` this process's current device before any collective.

    Under NCCL a collective places its tensors on the *current* device; without
    this every rank's first collective (e.g. the broadcast of the tokenised data)
    would run on cuda:0 while DeepSpeed binds the communicator to
    cuda:LOCAL_RANK. A site that shows each task only its own GPU
    (``CUDA_VISIBLE_DEVICES`` of one device) makes ``LOCAL_RANK`` out of range:
    the index is ``LOCAL_RANK % device_count``, and ``LOCAL_RANK`` is set to it
    for DeepSpeed, which indexes ``cuda:LOCAL_RANK`` itself. No-op without CUDA.

    Returns:
        The device index set, or ``None`` without CUDA.
    """
    import os

    import torch

    if not torch.cuda.is_available():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    index = local_rank % max(torch.cuda.device_count(), 1)
    torch.cuda.set_device(index)
    if index != local_rank:
        # DeepSpeed indexes cuda:LOCAL_RANK itself (the NCCL device_id at init,
        # the engine's set_device, zero.Init's device): point it at this GPU too.
        os.environ["LOCAL_RANK"] = str(index)
    return index


def create_expert_groups(ep_size: int) -> ExpertGroups:
    """Create the EP and EDP groups (collective: every rank must call it).

    Requires an initialised default process group (:func:`init_process_group`).
    Validate first with :func:`validate_ep`.
    """
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_size:
        raise ValueError(f"ep_size={ep_size} does not divide world size {world}")
    ep_groups, edp_groups = ep_layout(world, ep_size)
    my_ep = my_edp = None
    for ranks in ep_groups:  # same order on every rank
        g = dist.new_group(ranks, timeout=collective_timeout())
        if rank in ranks:
            my_ep, ep_ranks = g, ranks
    for ranks in edp_groups:
        g = dist.new_group(ranks, timeout=collective_timeout())
        if rank in ranks:
            my_edp, edp_ranks = g, ranks
    return ExpertGroups(ep_size, world, rank, my_ep, my_edp, ep_ranks, edp_ranks)
