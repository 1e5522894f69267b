"""ZeRO-3 for a model: the hooks DeepSpeed runs in one micro-batch, and what they gather.

:func:`zero3_trace` writes the trace of module hooks of one micro-batch for a
:class:`~loramoe_ds.cost_model.workload.ModelShapes` (HF Llama's module tree
with the adapter's wrappers, forward, backward and the recompute of activation
checkpointing); :func:`zero3_schedule` replays it through
:func:`~loramoe_ds.cost_model.coordinator.coordinate` (DeepSpeed 0.19.8's
parameter coordinator) with the workload's ZeRO-3 settings.
"""

from __future__ import annotations

from loramoe_ds.cost_model.coordinator import Fetch, Gathers, Release, coordinate
from loramoe_ds.cost_model.workload import ModelShapes, ModuleShape, Workload, input_needs_grad
from loramoe_ds.placement import SHARDED


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


def _layer_backward(
    fwd: list[tuple], ckpt: bool, router_fetches: int, runs_bwd, input_grad
) -> list[tuple]:
    """One decoder layer's backward hooks, from its forward (:func:`zero3_trace`).

    ``runs_bwd(m)``: whether a leaf's output needs a gradient (its pre-hook runs);
    ``input_grad(m)``: whether its input does (its post-hook runs; a container's
    when its first leaf's does).
    """
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
    # a container's input is its first leaf's (in forward order)
    first: dict[str, ModuleShape] = {}
    for _, p, m in fwd:
        for c in [p, *_enclosing(p)] if m is not None else ():
            first.setdefault(c, m)
    fed = {c for c, m in first.items() if input_grad(m)}
    out: list[tuple] = []
    for k, p, m in keep:
        if k == "R" and m is None and p.endswith(".self_attn"):
            continue  # its post-backward hook never runs (called with keyword arguments)
        if k == "R" and p not in fed and not p.endswith("act_fn"):
            continue  # no input of it needs a gradient: released at the end of backward
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
    # stops at the last saved tensor, inside the layer's last linear (its wrapper's
    # dispatch after the router, a replicated bank, a plain linear), so the closing
    # post-hooks of the layer, its MLP and that linear do not run
    cut = 0
    while cut < len(out) and out[cut][0] == "F" and out[cut][2] is None:
        cut += 1
    if cut < len(out) and out[cut][0] == "F" and out[cut][2].kind in ("base", "bank"):
        cut += 1  # a wrapper's first leaf in backward is its router or replicated bank
    rec = list(fwd[1:])  # the layer's own pre-hook does not run again
    while rec and rec[-1][0] == "R" and rec[-1][2] is None:
        rec.pop()
    if rec and rec[-1][0] == "R" and rec[-1][2].kind != "router":
        rec.pop()  # it stops inside the last leaf (a bank, a plain linear), not after a router
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
    router, replicated bank), the final norm, the LM head (its weight the
    embedding's when they are tied). Backward: the wrapper, the causal LM, the LM head, the
    decoder, the final norm, each layer top-down in reverse (each router fetched
    once per output tensor with a gradient, ``w.router_outputs``; the attention's
    post-hook never runs), the embedding under activation checkpointing (its post-hook
    never runs: its input, the token ids, needs no gradient). Activation
    checkpointing inserts each layer's recompute (:func:`_layer_backward`) and
    runs every base module's backward, the embedding's included (transformers
    makes the embedding's output require grad then, ``enable_input_require_grads``);
    without it a base module runs backward only with a trainable tensor upstream
    (``ModuleShape.backward``). Banks of sharded layers are not engine
    parameters: left out.

    Checked hook by hook against DeepSpeed's own (bench/plan_check.py
    ``PLAN_CHECK_HOOKS=1``): SmolLM2 and the tiny model with activation
    checkpointing, the tiny model without it (soft routing, sharded layers), and
    CI's cases (tests/distributed/test_plan_check.py: soft with and without
    checkpointing, mixed-placement top-k). Not checked: a model without an
    auxiliary loss (the wrapper then holds no router).
    """
    ckpt = w.activation_checkpointing
    sharded = {i for i, p in enumerate(w.placements) if p == SHARDED and w.ep_size > 1}
    mods = [
        m for m in shapes.modules
        if not (m.kind == "bank" and shapes.linears[m.linear].layer in sharded)
    ]  # fmt: skip

    def runs_bwd(m: ModuleShape) -> bool:
        return m.backward or (ckpt and m.kind == "base")

    def input_grad(m: ModuleShape) -> bool:
        if m.kind == "base":
            return runs_bwd(m)
        return input_needs_grad(shapes.linears[m.linear], w)

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
        for k, p, m in _layer_backward(fwd[i], ckpt, k_router, runs_bwd, input_grad):
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
