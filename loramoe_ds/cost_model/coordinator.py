"""DeepSpeed 0.19.8's ``PartitionedParameterCoordinator`` (ZeRO-3), replayed over a hook trace.

:func:`coordinate` replays a trace of module fetches and releases (DeepSpeed's
hooks, in their order: :func:`~loramoe_ds.cost_model.zero3.zero3_trace` writes
it for a model) through the coordinator's rules and counts the all-gathers and
the elements held gathered.

**The coordinator's rules** (``partitioned_param_coordinator.py``), per
micro-batch, once the module trace is complete (from the second micro-batch of
the first step on):

* *Fetch* of module ``m`` at step ``s`` (every module's forward pre-hook and
  backward pre-hook, containers and parameterless modules included; ``s``
  counts the fetches of the micro-batch): its parameters that are not gathered
  are all-gathered (``ceil(n/W)*W`` elements each). The *parameter queue* (every
  fetch of the micro-batch, in order, expanded to its parameters with the step
  of that fetch) is popped past ``m``'s own entries unless an earlier pop took
  them already; each popped entry sets ``last[p]`` to its step. Then the
  *prefetcher* pops on while it has gathered fewer than
  ``min(max_live - live, bucket)`` elements (``stage3_max_live_parameters``,
  ``stage3_prefetch_bucket_size``; ``live`` the gathered non-persistent
  elements, unpadded): every popped entry raises ``last[p]`` to its step, and a
  parameter not gathered is gathered now (the one that crosses the limit
  included).
* *Release* of ``m`` after its forward or backward (post-hooks), with ``s`` the
  fetches so far: its non-persistent parameters are released except those with
  ``last[p] > s`` (the prefetcher has looked past that use already) and those
  that a module within ``stage3_max_reuse_distance`` elements of the trace from
  ``s`` on uses again. After a backward, every frozen parameter fetched during
  an activation-checkpointing recompute while this module was the newest
  module in backward (``ds_recompute_parameters``) is released too, whatever
  ``last`` and the reuse distance say. A parameter is released only when every
  module that fetched it has been released since (``ds_active_sub_modules``).
* At the end of backward, modules fetched in backward whose post-hook never ran
  (no input of theirs needs a gradient: the embedding, the containers above
  it) release their parameters (``release_backward_leftovers``).
* Parameters of at most ``stage3_param_persistence_threshold`` elements stay
  gathered; they are all-gathered once per optimizer step, after it
  (``_post_step``). ``live``, the queue and ``last`` restart with each
  micro-batch's forward; what is gathered carries over (nothing, in practice).

**Memory** (``partition_parameters.py``): a call gathering one parameter
gathers into that parameter's own buffer; a call gathering several (a module's
or a prefetch) gathers into one flat buffer and, at the first wait on any of
them, copies every one out of it, and the buffer stays until the last of them
has been waited on (popped from the in-flight registry by its module's fetch):
until then they are held twice. On gloo, ``all_gather_into_tensor`` gathers
into a temporary of the output's size and copies it out (measured: a 108 MiB
gather grows the resident set by 110 MiB while it runs): with ``gather_copy``
the running call's output counts twice too. The peak is the most held at once,
in elements.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Fetch:
    """A module's pre-hook (forward or backward): its own parameters are needed now.

    Attributes:
        module: The module's key (its fetches and releases share it).
        params: ``(parameter id, elements)`` of its own parameters (tied
            weights share an id); empty for containers.
        forward: Forward pre-hook (the recompute's included) or backward.
        recompute: Run by activation checkpointing's recompute, in backward.
    """

    module: int
    params: tuple[tuple[int, int], ...] = ()
    forward: bool = True
    recompute: bool = False


@dataclass(frozen=True)
class Release:
    """A module's post-hook (forward or backward): its parameters may be released."""

    module: int
    forward: bool = True


@dataclass
class Gathers:
    """What :func:`coordinate` found, in elements (padded to ``ceil(n/W)*W``).

    Attributes:
        per_micro: Gathered in each micro-batch.
        persistent: The persistent parameters, gathered once per optimizer step.
        peak: The most gathered at once (non-persistent and persistent).
    """

    per_micro: list[int]
    persistent: int
    peak: int


def coordinate(
    trace: list[Fetch | Release],
    *,
    world: int,
    micro_batches: int = 1,
    frozen: frozenset[int] | None = None,
    persistence_threshold: int = 0,
    max_reuse_distance: int = 0,
    max_live: int = 10**18,
    prefetch_bucket: int = 0,
    gather_copy: bool = False,
) -> Gathers:
    """Replay ``trace`` (one micro-batch) ``micro_batches`` times (module docstring).

    Args:
        trace: One micro-batch's fetches and releases, in hook order.
        world: W (the padding of a gather).
        micro_batches: Micro-batches replayed (what is gathered carries over).
        frozen: Ids of the frozen parameters (the recompute's release); None: all.
        persistence_threshold, max_reuse_distance, max_live, prefetch_bucket: The
            ZeRO-3 settings (module docstring).
    """
    c = _Coordinator(trace, world, frozen, persistence_threshold, max_reuse_distance,
                     max_live, prefetch_bucket, gather_copy)  # fmt: skip
    per_micro = [c.micro_batch() for _ in range(micro_batches)]
    persistent = sum(c.pad(p) for p in c.persist)
    return Gathers(per_micro, persistent, c.peak + persistent)


_NEVER = -(10**10)


class _Coordinator:
    """The state of DeepSpeed's coordinator over :func:`coordinate`'s replay."""

    def __init__(self, trace, world, frozen, thr, reuse, max_live, bucket, copy=False) -> None:
        self.trace, self.world, self.frozen, self.copy = trace, world, frozen, copy
        self.reuse, self.max_live, self.bucket = reuse, max_live, bucket
        fetches = [e for e in trace if isinstance(e, Fetch)]
        self.sizes = {p: n for e in fetches for p, n in e.params}
        self.persist = {p for p, n in self.sizes.items() if n <= thr}
        self.owned = {e.module: {p for p, _ in e.params} for e in fetches}
        # the queue: every fetch expanded to its parameters (sorted: DeepSpeed sorts by id)
        self.order = [(p, s) for s, e in enumerate(fetches) for p in sorted(self.owned[e.module])]
        # the reuse scan: elements fetched before step s, each parameter's fetch steps
        self.prefix = [0]
        for e in fetches:
            self.prefix.append(self.prefix[-1] + sum(n for _, n in e.params))
        self.uses: dict[int, list[int]] = {}
        for s, e in enumerate(fetches):
            for p, _ in e.params:
                self.uses.setdefault(p, []).append(s)
        self.gathered: set[int] = set()
        self.active: dict[int, set[int]] = {}  # ds_active_sub_modules
        self.held = 0  # gathered non-persistent elements (padded) and waited flat buffers
        self.peak = 0

    def pad(self, p: int) -> int:
        return -(-self.sizes[p] // self.world) * self.world

    def reused(self, p: int, step: int) -> bool:
        """Whether a fetch from ``step`` on uses ``p`` before ``reuse`` elements are scanned."""
        nxt = next((s for s in self.uses[p] if s >= step), None)
        return nxt is not None and self.prefix[nxt] - self.prefix[step] < self.reuse

    def micro_batch(self) -> int:
        """Replay one micro-batch; the elements it gathers."""
        self.count = self.live = self.step = 0
        self.queue = deque(self.order)
        self.last: dict[int, int] = {}
        self.in_bwd: dict[int, None] = {}  # modules in backward, in insertion order
        self.recomputed: dict[int, set[int]] = {}
        self.inflight: dict[int, list] = {}  # parameter -> its gather [flat elements, waiting]
        for e in self.trace:
            if isinstance(e, Fetch):
                self.fetch(e)
            else:
                self.release(e.module, e.forward)
        # backward_epilogue: modules whose backward post-hook never ran (no input of
        # theirs needs a gradient: the embedding, the containers above it)
        for m in reversed(self.in_bwd):
            self.drop(m, self.owned.get(m, set()) | self.recomputed.pop(m, set()), set())
        return self.count

    def gather(self, ps: set[int]) -> None:
        """One all-gather call: several parameters share a flat buffer (module docstring)."""
        ps = {p for p in ps if p not in self.gathered and p not in self.persist}
        flat = [sum(self.pad(p) for p in ps), set(ps)] if len(ps) > 1 else None
        for p in ps:
            self.gathered.add(p)
            self.count += self.pad(p)
            self.live += self.sizes[p]
            self.held += self.pad(p)
            if flat:
                self.inflight[p] = flat
        # one call for several parameters, one per parameter for a single one
        calls = [flat[0]] if flat else [self.pad(p) for p in ps]
        if self.copy and calls:
            self.peak = max(self.peak, self.held + max(calls))

    def wait(self, ps: set[int]) -> None:
        """The fetch waits on its parameters: a flat buffer stays until its last is waited."""
        freed = 0
        for p in ps:
            flat = self.inflight.pop(p, None)
            if flat is None:
                continue
            if flat[0] > 0:  # the first wait copies every parameter out of the buffer
                self.held += flat[0]
                flat[0] = -flat[0]
            flat[1].discard(p)
            if not flat[1]:
                freed -= flat[0]
        self.peak = max(self.peak, self.held)
        self.held -= freed

    def fetch(self, e: Fetch) -> None:
        own = {p for p, _ in e.params}
        if not e.forward:
            self.in_bwd.setdefault(e.module, None)
        self.gather(own)
        for p in own:
            self.active.setdefault(p, set()).add(e.module)
            if (
                e.forward
                and e.recompute
                and self.in_bwd
                and (self.frozen is None or p in self.frozen)
            ):
                owner = next(reversed(self.in_bwd))  # ds_recompute_parameters
                self.recomputed.setdefault(owner, set()).add(p)
                self.active[p].add(owner)
        self.wait(own)
        todo = {p for p in own if self.last.get(p, _NEVER) < self.step}
        popped: set[int] = set()
        while self.queue and len(popped) < len(todo):
            p, s = self.queue.popleft()
            self.last[p] = s
            popped.add(p)
        if popped != todo:
            raise ValueError(f"trace out of order at fetch {self.step}: {popped} != {todo}")
        if self.bucket > 0:  # the prefetcher
            limit = min(self.max_live - self.live, self.bucket)
            ahead: set[int] = set()
            taken = 0
            while self.queue and taken < limit:
                p, s = self.queue.popleft()
                self.last[p] = max(self.last.get(p, _NEVER), s)
                if p not in self.gathered and p not in self.persist and p not in ahead:
                    ahead.add(p)
                    taken += self.sizes[p]
            self.gather(ahead)
        self.step += 1
        self.peak = max(self.peak, self.held)

    def release(self, m: int, forward: bool) -> None:
        own = self.owned.get(m, set())
        keep = {p for p in own if self.last.get(p, _NEVER) > self.step or self.reused(p, self.step)}
        extra: set[int] = set()
        if not forward:
            extra = self.recomputed.pop(m, set())
            self.in_bwd.pop(m, None)
        self.drop(m, own | extra, keep - extra)

    def drop(self, m: int, ps: set[int], keep: set[int]) -> None:
        """``m`` lets go of ``ps``; those no other module holds are released, but ``keep``."""
        for p in ps:
            self.active.get(p, set()).discard(m)
            if p in keep or p in self.persist or p not in self.gathered or self.active[p]:
                continue
            self.gathered.discard(p)
            self.live -= self.sizes[p]
            self.held -= self.pad(p)
