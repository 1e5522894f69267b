"""The expert-parallel banks' side of an optimizer step: EDP reduction, norm share, AdamW.

Shape legend: W world size, P = ``ep_size``, L local experts of a layer.

In expert-parallel mode (P > 1) each rank holds the L local experts of every
adapted linear whose bank is *sharded*
(:meth:`~loramoe_ds.parallel.layout.AdapterLayout.build`; a *replicated* bank is
an engine parameter, DeepSpeed's like the routers); the shards are not
DeepSpeed parameters, so DeepSpeed neither reduces, clips nor steps them.
:class:`ExpertOptimizer` does, once per optimizer step, in this order:

1. :meth:`~ExpertOptimizer.sync_grads`: the local grads (accumulated over the
   GAS micro-batches, each loss scaled by 1/GAS by ``engine.backward``) are
   summed over the EDP group and divided by the **full world size** W. The
   all-to-all backward already summed every EP rank's loss into each local
   expert, so ``sum_EDP / W = (1/W) sum_ranks dloss_r/dtheta``, the same
   data-parallel mean ZeRO gives the routers.
2. :meth:`~ExpertOptimizer.sq_norm`: this rank's share of the joint squared
   norm, ``sum_EP |g_shard|^2`` (each expert counted once: the shard norms are
   summed over the EP group only, EDP replicas being identical).
3. :meth:`~ExpertOptimizer.scale_grads` when the trainer clips.
4. :meth:`~ExpertOptimizer.step` at the LR the engine is about to use.

Each call checks that it comes in this order: a second reduction (which would
halve the gradients) or a step before the reduction raises ``RuntimeError``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from loramoe_ds.model.experts import ExpertBank
from loramoe_ds.parallel.groups import ExpertGroups
from loramoe_ds.parallel.settings import OptimizerSettings


class ExpertOptimizer:
    """AdamW over this rank's expert shards, with the EDP reduction and their norm share.

    Args:
        banks: The local expert shards of the sharded layers, in
            ``model.moe_layers()`` order (moved to ``device`` here).
        groups: The EP / EDP groups.
        settings: The AdamW hyper-parameters (the same as the routers').
        device: Where the shards live.

    Attributes:
        banks: The local shards.
        adamw: The ``torch.optim.AdamW`` over them (checkpoints read its state).
    """

    def __init__(
        self,
        banks: list[ExpertBank],
        groups: ExpertGroups,
        settings: OptimizerSettings,
        device: torch.device,
    ) -> None:
        assert banks, "an ExpertOptimizer needs local expert shards (expert-parallel mode)"
        for b in banks:
            b.to(device)
        self.banks = banks
        self.groups = groups
        self.adamw = torch.optim.AdamW(self.params(), **settings.adamw_kwargs())
        self._flat: torch.Tensor | None = None

    def params(self) -> list[nn.Parameter]:
        """The local shard parameters (``lora_A``, ``lora_B`` of each bank)."""
        return [p for b in self.banks for p in b.parameters()]

    @property
    def synced(self) -> bool:
        """Whether the gradients of the current step are reduced (and not yet stepped)."""
        return self._flat is not None

    def sync_grads(self) -> None:
        """Sum the local grads over EDP and divide by W (collective, once per step).

        Raises:
            RuntimeError: If this step's gradients are already reduced.
        """
        if self._flat is not None:
            raise RuntimeError(
                "expert gradients are already synchronised for this step; a second "
                "reduction would divide them by the world size twice"
            )
        params = self.params()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).float() for p in params])
        if self.groups.edp_size > 1:
            dist.all_reduce(flat, group=self.groups.edp_group)
        flat /= self.groups.world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n
        self._flat = flat

    def _require_synced(self, what: str) -> torch.Tensor:
        if self._flat is None:
            raise RuntimeError(
                f"{what} before the expert gradients of this step are synchronised "
                "(MoETrainer.train_step does both in order)"
            )
        return self._flat

    def sq_norm(self, device: torch.device) -> torch.Tensor:
        """``sum_EP |g_shard|^2`` of the synchronised grads, fp32 on ``device`` (collective)."""
        ex = self._require_synced("the expert gradient norm is read").pow(2).sum().to(device)
        if self.groups.ep_size > 1:
            dist.all_reduce(ex, group=self.groups.ep_group)
        return ex

    def scale_grads(self, coef: float) -> None:
        """Multiply the synchronised grads by ``coef`` (the joint clip)."""
        self._require_synced("the expert gradients are clipped")
        for p in self.params():
            p.grad.mul_(coef)

    def step(self, lr: float) -> None:
        """AdamW at ``lr``, then zero the grads (ends the step).

        Raises:
            RuntimeError: Before :meth:`sync_grads` of this step.
        """
        self._require_synced("the expert optimizer steps")
        for group in self.adamw.param_groups:
            group["lr"] = lr
        self.adamw.step()
        self.adamw.zero_grad(set_to_none=True)
        self._flat = None

    def drop(self) -> None:
        """End the step without an update: discard its gradients (a dropped non-finite step)."""
        self.adamw.zero_grad(set_to_none=True)
        self._flat = None
