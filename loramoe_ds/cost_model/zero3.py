"""ZeRO-3's parameter gathers, simulated: DeepSpeed 0.19.8's ``PartitionedParameterCoordinator``.

Two parts. :func:`coordinate` replays a trace of module fetches and releases
(DeepSpeed's hooks, in their order) through the coordinator's rules and counts
the all-gathers and the live gathered elements; :func:`zero3_trace` writes that
trace for a :class:`~loramoe_ds.cost_model.workload.ModelShapes` (HF Llama's
module tree with the adapter's modules, forward, backward and the recompute of
activation checkpointing).

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
  ``last`` and the reuse distance say. A parameter is released only when no
  module that fetched it has been released yet (``ds_active_sub_modules``).
* Parameters of at most ``stage3_param_persistence_threshold`` elements stay
  gathered; they are all-gathered once per optimizer step, after it
  (``_post_step``). ``live``, the queue and ``last`` restart with each
  micro-batch's forward; what is gathered stays (the micro-batch's last releases
  leave nothing).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from loramoe_ds.cost_model.workload import ModelShapes, ModuleShape, Workload
from loramoe_ds.placement import SHARDED


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


def _enclosing(path: str) -> list[str]:
    """The modules whose hooks run around ``path``'s, outermost first (``model`` and the
    ``ModuleList`` of layers excepted: the first is opened by the trace, the second has no
    forward of its own)."""
    parts = path.split(".")
    out = [".".join(parts[:k]) for k in range(1, len(parts))]
    return [c for c in out if c not in ("model", "model.layers")]


def _layer_forward(leaves: list[tuple[str, ModuleShape | None]]) -> list[tuple]:
    """One decoder layer's forward hooks: ``("F" | "R", path, module or None)``.

    Containers open before their first leaf and close after their last; HF Llama's
    MLP runs ``act_fn`` (no parameters) between ``gate_proj`` and ``up_proj``.
    """
    ev: list[tuple] = []
    open_: list[str] = []

    def act_after(path: str) -> None:
        if path.endswith(".mlp.gate_proj"):
            act = path[: -len("gate_proj")] + "act_fn"
            ev.extend([("F", act, None), ("R", act, None)])

    for path, m in leaves:
        want = _enclosing(path)
        while open_ and open_[-1] not in want:
            c = open_.pop()
            ev.append(("R", c, None))
            act_after(c)
        for c in want[len(open_) :]:
            open_.append(c)
            ev.append(("F", c, None))
        ev.extend([("F", path, m), ("R", path, m)])
        act_after(path)
    while open_:
        c = open_.pop()
        ev.append(("R", c, None))
        act_after(c)
    return ev


def _layer_backward(fwd: list[tuple], ckpt: bool, router_fetches: int, runs_bwd) -> list[tuple]:
    """One decoder layer's backward hooks, from its forward (:func:`zero3_trace`)."""
    rev = [("F" if k == "R" else "R", p, m) for k, p, m in reversed(fwd)]
    # a module's backward hooks run only where a gradient flows: leaves that need
    # none are skipped, and containers left empty with them
    keep: list[tuple] = []
    for k, p, m in rev:
        if m is not None and not runs_bwd(m):
            continue
        keep.append((k, p, m))
    used = {c for _, p, m in keep if m is not None for c in _enclosing(p)}
    used |= {c[: -len("gate_proj")] + "act_fn" for c in used if c.endswith(".mlp.gate_proj")}
    keep = [e for e in keep if e[2] is not None or e[1] in used]
    out: list[tuple] = []
    for k, p, m in keep:
        if k == "R" and m is None and p.endswith(".self_attn"):
            continue  # its post-backward hook never runs (its other inputs need no gradient)
        if k == "F" and m is not None and m.kind == "router":
            out.extend([(k, p, m)] * router_fetches)
            continue
        out.append((k, p, m))
    if not ckpt:
        return out
    # the recompute (non-reentrant checkpointing) runs when the first saved tensor
    # is unpacked: after the backward pre-hooks of the containers down to the layer's
    # last module and of the leaf producing its output (a plain linear, a replicated
    # bank; a sharded bank's output is the dispatcher's), before anything else; it
    # stops at the last saved tensor, inside the last adapted linear, so the closing
    # post-hooks of the layer, its MLP and that linear do not run
    cut = 0
    while cut < len(out) and out[cut][0] == "F" and out[cut][2] is None:
        cut += 1
    if cut < len(out) and out[cut][0] == "F" and out[cut][2].kind in ("base", "bank"):
        cut += 1  # a wrapper's first leaf in backward is its router or replicated bank
    rec = list(fwd[1:])  # the layer's own pre-hook does not run again
    while rec and rec[-1][0] == "R" and rec[-1][2] is None:
        rec.pop()
    return out[:cut] + [("C" if k == "F" else "CR", p, m) for k, p, m in rec] + out[cut:]


def zero3_trace(shapes: ModelShapes, w: Workload) -> list[Fetch | Release]:
    """One micro-batch's ZeRO-3 module hooks in DeepSpeed 0.19.8's order (HF Llama).

    Every module's hooks run, containers and parameterless modules included (each
    fetch is a step of the trace and a chance for the prefetcher); the enclosing
    modules come from :attr:`~loramoe_ds.cost_model.workload.ModuleShape.name`.
    Forward: the wrapper model (its external parameters: every router weight, which
    its forward reads when an auxiliary loss is on, ``w.aux_losses``), the causal
    LM, the decoder, the input embedding, the rotary embedding, each decoder layer
    (the layer, its attention, the MLP, each adapted linear's wrapper: base,
    router, replicated bank), the final norm, the LM head (tied to the embedding:
    the same parameter). Backward: the wrapper, the causal LM, the LM head, the
    decoder, the final norm, each layer top-down in reverse (each router fetched
    once per output tensor with a gradient, ``w.router_outputs``; the attention's
    post-hook never runs), the embedding (its post-hook never runs either: its
    input, the token ids, needs no gradient). Activation checkpointing inserts
    each layer's recompute (:func:`_layer_backward`). Banks of sharded layers are
    not engine parameters: left out.

    Checked hook by hook against DeepSpeed's own (bench/plan_check.py
    ``PLAN_CHECK_HOOKS=1``): SmolLM2 and the tiny model with activation
    checkpointing (soft routing, sharded layers), and CI's mixed-placement top-k
    case (tests/distributed/test_plan_check.py). Without checkpointing the
    routers' place in backward is the reverse of forward, not checked (the aux
    losses may reach them earlier); with an auxiliary loss on the wrapper holds
    the routers through backward, so their gathers do not depend on it.
    """
    ckpt = w.activation_checkpointing
    sharded = {i for i, p in enumerate(w.placements) if p == SHARDED and w.ep_size > 1}
    mods = [
        m for m in shapes.modules
        if not (m.kind == "bank" and shapes.linears[m.linear].layer in sharded)
    ]  # fmt: skip

    def runs_bwd(m: ModuleShape) -> bool:
        return m.backward or (ckpt and m.kind == "base")

    def path(i: int, m: ModuleShape) -> str:
        if m.name:
            return m.name
        return f"model.layers.{m.layer}.m{i}" if m.layer >= 0 else f"model.m{i}"

    paths = [path(i, m) for i, m in enumerate(mods)]
    outside = [(p, m) for p, m in zip(paths, mods) if m.layer < 0]
    embed = outside[0] if outside else None
    head = outside[-1] if len(outside) > 1 else None
    norms = outside[1:-1]
    routers = tuple((pid, n) for m in mods if m.kind == "router" for pid, n in m.params)
    routers = routers if w.aux_losses else ()
    k_router = w.router_outputs
    top = [("<root>", routers), ("<lm>", ())]
    ev: list[tuple] = [("F", name, params) for name, params in top] + [("F", "model", ())]
    if embed:
        ev += [("F", embed[0], embed[1]), ("R", embed[0], embed[1])]
        ev += [("F", "model.rotary_emb", None), ("R", "model.rotary_emb", None)]
    layers = [
        [(p, m) for p, m in zip(paths, mods) if m.layer == i] for i in range(shapes.num_layers)
    ]
    fwd = [_layer_forward(leaves) for leaves in layers]
    for f in fwd:
        ev += f
    for p, m in norms:
        ev += [("F", p, m), ("R", p, m)]
    ev.append(("R", "model", None))
    if head:
        ev += [("F", head[0], head[1]), ("R", head[0], head[1])]
    ev += [("R", name, None) for name, _ in reversed(top)]
    # backward
    ev += [("B", name, params) for name, params in top]
    if head:
        ev += [("B", head[0], head[1]), ("RB", head[0], head[1])]
    ev.append(("B", "model", ()))
    for p, m in reversed(norms):
        if runs_bwd(m):
            ev += [("B", p, m), ("RB", p, m)]
    for i in reversed(range(shapes.num_layers)):
        for k, p, m in _layer_backward(fwd[i], ckpt, k_router, runs_bwd):
            ev.append({"F": ("B", p, m), "R": ("RB", p, m)}.get(k, (k, p, m)))
    if embed and (ckpt or embed[1].backward):
        ev.append(("B", embed[0], embed[1]))
    return _events(ev)


def _events(ev: list[tuple]) -> list[Fetch | Release]:
    """``(kind, path, module or params)`` -> :class:`Fetch` / :class:`Release`, keyed by path.

    Kinds: ``F`` / ``R`` forward, ``C`` / ``CR`` the recompute, ``B`` / ``RB`` backward.
    """
    keys: dict[str, int] = {}
    out: list[Fetch | Release] = []
    for kind, p, m in ev:
        key = keys.setdefault(p, len(keys))
        if kind in ("R", "CR", "RB"):
            out.append(Release(key, forward=kind != "RB"))
            continue
        params = m.params if isinstance(m, ModuleShape) else tuple(m or ())
        out.append(Fetch(key, params, forward=kind in ("F", "C"), recompute=kind == "C"))
    return out


def zero3_schedule(shapes: ModelShapes, w: Workload) -> Gathers:
    """ZeRO-3's gathers in one micro-batch: :func:`coordinate` over :func:`zero3_trace`."""
    frozen = frozenset(pid for m in shapes.modules if m.kind == "base" for pid, _ in m.params)
    return coordinate(
        zero3_trace(shapes, w),
        world=w.world,
        frozen=frozen,
        persistence_threshold=w.persistence_threshold,
        max_reuse_distance=w.max_reuse_distance,
        max_live=w.max_live,
        prefetch_bucket=w.prefetch_bucket,
        gather_copy=w.gather_copy,
    )


def zero3_gathered_elements(shapes: ModelShapes, w: Workload) -> int:
    """Elements ZeRO-3 all-gathers in one optimizer step: ``G`` micro-batches and the persistent."""
    g = zero3_schedule(shapes, w)
    return w.gas * g.per_micro[0] + g.persistent


def zero3_live_peak(shapes: ModelShapes, w: Workload) -> int:
    """The most elements ZeRO-3 holds gathered at once on a rank: parameters (the
    persistent ones included) and the flat buffers of multi-parameter gathers still
    waited on (:func:`coordinate`)."""
    return zero3_schedule(shapes, w).peak
