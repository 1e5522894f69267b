"""Who owns each adapter tensor: one object, built once, read by the engine, checkpoints and export.

Shape legend: E experts of a layer (its bank's count; a router may have more
rows, e.g. expert-less null slots), P = ``ep_size``, L = E / P local experts,
R rank, D / O input / output width of an adapted linear.

Every adapted linear has a router ``<linear>.router.weight`` and an expert bank
``<linear>.experts.lora_A`` (``E x R x D``) / ``.lora_B`` (``E x R x O``).

* Routers are always DeepSpeed (ZeRO) parameters: every rank holds them (ZeRO
  partitions them), DeepSpeed's optimizer holds their Adam state.
* Each decoder layer's banks have one *placement* (:func:`layer_placements`, in
  :mod:`loramoe_ds.placement`):

  - :data:`SHARDED`: EP rank ``p`` holds global experts ``[p*L, (p+1)*L)`` in a
    shard bank owned by the layer's
    :class:`~loramoe_ds.parallel.dispatch.EPDispatcher` (``layer.experts`` is
    ``None``; tokens travel by all-to-all); the
    :class:`~loramoe_ds.parallel.expert_optimizer.ExpertOptimizer` holds their
    Adam state; a full tensor is the EP group's shards concatenated.
  - :data:`REPLICATED`: the bank stays in the model as an engine parameter,
    like a router (every rank computes its own tokens' mixture locally;
    DeepSpeed averages its gradients over all W ranks, ZeRO partitions it and
    holds its Adam state). ``ep_size == 1`` replicates every bank.

The placement rule (docs/design.md, "Placement rule", with its costs): by
default a layer is sharded when ``P > 1`` divides its E, replicated otherwise;
an explicit per-layer list (``placements``, e.g. from a planner) overrides it,
but may shard only a layer whose E divides by P. Shards are never uneven: every
EP rank holds the same L experts of a sharded layer, so the dispatcher's
mapping (``rank = e // L``), the soft path's gate slices (width L on every
rank) and the checkpoint's slices stay those of the even case, and a bank E does
not divide is computed exactly as with ``ep_size == 1``.

:class:`AdapterLayout` records this per adapted linear (:class:`LayerLayout`)
when the trainer is built (:meth:`AdapterLayout.build`, which also cuts the
shards), so that the engine (:meth:`~AdapterLayout.router_params`,
:meth:`~AdapterLayout.engine_params`), the expert optimizer
(:meth:`~AdapterLayout.local_banks`), the checkpoint's gather and scatter
(:meth:`~AdapterLayout.gather`, :meth:`~AdapterLayout.local_shards`) and the
export all read one answer. An allocation rule that places experts
differently changes this file only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from loramoe_ds.model.experts import ExpertBank
from loramoe_ds.model.lm import LoRAMoEModel
from loramoe_ds.model.moe_linear import MoELoRALinear
from loramoe_ds.parallel.dispatch import CommStats, EPDispatcher
from loramoe_ds.parallel.groups import ExpertGroups
from loramoe_ds.placement import REPLICATED, SHARDED, layer_placements

BANK_TENSORS = ("lora_A", "lora_B")

ENGINE = "engine"
"""Owner: DeepSpeed (a ZeRO parameter; Adam state in the engine's optimizer)."""
EXPERTS = "experts"
"""Owner: this rank's expert shard (Adam state in the ExpertOptimizer)."""


@dataclass(frozen=True)
class LayerLayout:
    """One adapted linear: its router, its local bank and which experts that bank holds.

    Attributes:
        name: The linear's name (tensor names are ``<name>.router.weight``,
            ``<name>.experts.lora_A`` / ``.lora_B``).
        router: The router weight (an engine parameter).
        bank: The bank this rank holds: the full bank (replicated) or its shard.
        num_experts: ``E``, the layer's experts (from the bank, not the router).
        first_expert: The first global expert of ``bank``.
        sharded: Whether ``bank`` is an expert-parallel shard (owner
            :data:`EXPERTS`; placement :data:`SHARDED`), else the full bank, an
            engine parameter (placement :data:`REPLICATED`).
        layer_idx: The decoder layer the linear belongs to.
    """

    name: str
    router: nn.Parameter
    bank: ExpertBank
    num_experts: int
    first_expert: int
    sharded: bool
    layer_idx: int

    @property
    def num_local(self) -> int:
        """``L``, the experts of :attr:`bank`."""
        return self.bank.num_experts

    @property
    def placement(self) -> str:
        """:data:`SHARDED` or :data:`REPLICATED`."""
        return SHARDED if self.sharded else REPLICATED

    @property
    def bank_owner(self) -> str:
        """:data:`ENGINE` or :data:`EXPERTS`."""
        return EXPERTS if self.sharded else ENGINE

    def bank_names(self) -> dict[str, nn.Parameter]:
        """``{full tensor name: local parameter}`` of the bank."""
        return {f"{self.name}.experts.{t}": getattr(self.bank, t) for t in BANK_TENSORS}


@dataclass(frozen=True)
class AdapterLayout:
    """Where every router and expert tensor of the adapter lives on this rank.

    Attributes:
        layers: One :class:`LayerLayout` per adapted linear, in ``model.moe_layers()`` order.
        groups: The EP / EDP groups the shards are cut along.
    """

    layers: tuple[LayerLayout, ...]
    groups: ExpertGroups

    @classmethod
    def build(
        cls,
        model: LoRAMoEModel,
        groups: ExpertGroups,
        stats: CommStats,
        placements: Sequence[str] | None = None,
    ) -> AdapterLayout:
        """Record the layout and cut every :data:`SHARDED` bank to this rank's shard.

        Each sharded layer's full bank is replaced by an :class:`EPDispatcher`
        owning the shard (``layer.experts`` becomes ``None``, so the bank is not a
        model parameter); a replicated bank stays in the model. Call once, on the
        injected model, before ``deepspeed.initialize``.

        Args:
            model: The injected model (full banks on every rank).
            groups: The EP / EDP groups.
            stats: The dispatchers' byte counter.
            placements: Explicit placement per decoder layer (:func:`layer_placements`).
        """
        per_layer = layer_placements(model.experts_per_layer, groups.ep_size, placements)
        layers = []
        for layer in model.moe_layers():
            full = layer.experts
            assert full is not None, f"{layer.name}: bank already detached"
            E = full.num_experts
            assert E == model.experts_per_layer[layer.layer_idx], (layer.name, E)
            where = (layer.name, layer.router.weight)
            if per_layer[layer.layer_idx] == REPLICATED:
                layers.append(LayerLayout(*where, full, E, 0, False, layer.layer_idx))
                continue
            L = E // groups.ep_size
            lo = groups.ep_rank * L
            shard = _shard(layer, full, lo, L, groups, stats)
            layers.append(LayerLayout(*where, shard, E, lo, True, layer.layer_idx))
        return cls(tuple(layers), groups)

    def placements(self) -> list[str]:
        """The placement of each decoder layer that has adapted linears, bottom to top."""
        seen: dict[int, str] = {}
        for lay in self.layers:
            seen.setdefault(lay.layer_idx, lay.placement)
        return [seen[i] for i in sorted(seen)]

    @property
    def expert_parallel(self) -> bool:
        """Whether any bank is an EP shard (owner :data:`EXPERTS`)."""
        return any(lay.sharded for lay in self.layers)

    def router_params(self) -> list[nn.Parameter]:
        """Every router weight (engine parameters)."""
        return [lay.router for lay in self.layers]

    def local_banks(self) -> list[ExpertBank]:
        """The EP shards this rank holds, in layer order (empty when every bank is replicated)."""
        return [lay.bank for lay in self.layers if lay.sharded]

    def engine_params(self) -> dict[str, nn.Parameter]:
        """``{name: parameter}`` of the tensors DeepSpeed owns (routers, replicated banks)."""
        out = {}
        for lay in self.layers:
            out[f"{lay.name}.router.weight"] = lay.router
            if not lay.sharded:
                out.update(lay.bank_names())
        return out

    def local_shards(self) -> dict[str, tuple[nn.Parameter, int, int]]:
        """EP shards: ``{full name: (local parameter, first global expert, local count)}``."""
        out = {}
        for lay in self.layers:
            if lay.sharded:
                for n, p in lay.bank_names().items():
                    out[n] = (p, lay.first_expert, lay.num_local)
        return out

    def owner(self, name: str) -> str:
        """:data:`ENGINE` or :data:`EXPERTS` for a full tensor name (where its Adam state is)."""
        if name in self.local_shards():
            return EXPERTS
        assert name in self.engine_params(), f"{name} is not an adapter tensor"
        return ENGINE

    def gather(
        self,
        full: Callable[[nn.Parameter], torch.Tensor],
        local: Callable[[nn.Parameter], torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Every adapter tensor, unsharded (collective over the EP group).

        Args:
            full: ``param -> full CPU tensor`` of an engine (ZeRO) parameter.
            local: ``param -> local tensor`` of an EP shard; the EP group's shards
                are all-gathered (global expert ``ep_rank * L + i``). Replicated
                banks go through ``full``.

        Returns:
            ``{name: tensor}`` in the naming of ``LoRAMoEModel.adapter_named_parameters``.
        """
        g = self.groups
        out: dict[str, torch.Tensor] = {}
        for lay in self.layers:
            out[f"{lay.name}.router.weight"] = full(lay.router)
            for n, p in lay.bank_names().items():
                if not lay.sharded:
                    out[n] = full(p)
                    continue
                shard = local(p)
                parts = [torch.empty_like(shard) for _ in range(g.ep_size)]
                dist.all_gather(parts, shard, group=g.ep_group)
                out[n] = torch.cat(parts).cpu()
        return out


def _shard(
    layer: MoELoRALinear,
    full: ExpertBank,
    lo: int,
    L: int,
    groups: ExpertGroups,
    stats: CommStats,
) -> ExpertBank:
    """Experts ``[lo, lo + L)`` of ``full`` as an fp32 bank owned by a new EP dispatcher."""
    shard = ExpertBank(L, full.in_features, full.out_features, full.rank)
    with torch.no_grad():
        shard.lora_A.copy_(full.lora_A[lo : lo + L].float())
        shard.lora_B.copy_(full.lora_B[lo : lo + L].float())
    layer.experts = None
    layer.dispatcher = EPDispatcher(
        shard,
        full.num_experts,
        groups.ep_group,
        groups.ep_size,
        groups.ep_rank,
        capacity_factor=layer.capacity_factor,
        stats=stats,
    )
    return shard
