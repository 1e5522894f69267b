"""DeepSpeed training of a LoRA-expert model: ZeRO base, expert-parallel banks, one step.

Length: one class, :class:`MoETrainer`, whose private step parts share and check one
phase of the step; they stay together in this file.

Shape legend: E experts of a layer, L = E/P local experts, P = ep_size, W world
size, R rank, D / O input / output width of an adapted linear.

The API the launcher calls::

    trainer = MoETrainer.build(model_factory, adapter_cfg, ds_config, ep_size, seed,
                               optim=OptimizerSettings(...), lr_schedule=LRSchedule(...))
    for micro_batches in steps:                 # this rank's GAS micro-batches of one step
        result = trainer.train_step(micro_batches)  # StepResult: outputs, N_step, lr, grad_norm
        trainer.global_step                     # optimizer steps taken
    trainer.save(dir, client_state)             # collective, atomic (parallel/checkpoint/)
    client_state = trainer.load(dir)            # collective; None when nothing to resume
    trainer.export_adapter(path)                # collective; rank 0 writes safetensors

:meth:`MoETrainer.train_step` is the one way to train: it runs the GAS
micro-batches, synchronises the gradients once, lets an optional ``grad_hook``
read them (:meth:`MoETrainer.full_adapter_grads`), clips jointly and steps both
optimizers and the schedule. Its parts are private and check their order (a
second synchronisation, a gradient read outside the hook, an optimizer step off
the accumulation boundary raise ``RuntimeError``).

What :meth:`MoETrainer.build` does, in order:

1. :func:`~loramoe_ds.parallel.groups.validate_ep` (world size from the
   launcher's ``WORLD_SIZE``, layer count from the model factory run on the
   ``meta`` device or ``num_layers``) -- *before* any process-group work.
2. :func:`~loramoe_ds.parallel.groups.init_process_group` (a no-op when the
   run started it); EP / EDP groups
   (:mod:`~loramoe_ds.parallel.groups`).
3. The base model from ``model_factory()`` -- under ``deepspeed.zero.Init`` for
   ZeRO stage 3, so it is born partitioned -- frozen.
4. ``torch.manual_seed(seed)`` then :func:`~loramoe_ds.model.inject.inject` on
   every rank: routers and full expert banks are identical on all ranks (the
   routers become ZeRO parameters inside ``deepspeed.initialize``). An optional
   full adapter state (``init_state``) overwrites them.
5. :meth:`AdapterLayout.build <loramoe_ds.parallel.layout.AdapterLayout.build>`
   records who owns each router and expert tensor, placing each decoder
   layer's banks by :func:`~loramoe_ds.placement.layer_placements`
   (``placements``, or by default: sharded where ``ep_size > 1`` divides the
   layer's expert count, replicated elsewhere). A *sharded* bank is cut to its
   local shard (global experts ``[ep_rank*L, (ep_rank+1)*L)``), the layer gets
   ``layer.experts = None`` and an
   :class:`~loramoe_ds.parallel.dispatch.EPDispatcher` owning the shard, which
   is therefore *not* an engine parameter. A *replicated* bank (every bank when
   ``ep_size == 1``) stays in the model as an ordinary trainable parameter that
   DeepSpeed/ZeRO manages like the routers (ZeRO-3 partitions and gathers it;
   its layer computes locally, no all-to-all).
6. ``deepspeed.initialize(optimizer=AdamW(...), lr_scheduler=lr_schedule)``
   over the engine's trainable parameters (routers + replicated banks),
   both built from the typed settings (:class:`OptimizerSettings`; the
   DeepSpeed JSON carries only DeepSpeed's own settings: ZeRO, precision,
   batch sizes, buckets). DeepSpeed's ``gradient_clipping`` is
   ``optim.grad_clip`` when no bank is sharded and 0 otherwise ("EP mode"),
   where the trainer clips.
7. EP mode only: an :class:`~loramoe_ds.parallel.expert_optimizer.ExpertOptimizer`
   (AdamW over the local shards with the same settings, the EDP reduction and
   the shards' share of the norm).

One optimizer step in EP mode, after the last backward (the engine is at the
accumulation boundary): the expert grads are reduced
(:meth:`ExpertOptimizer.sync_grads
<loramoe_ds.parallel.expert_optimizer.ExpertOptimizer.sync_grads>`: sum over
EDP, divided by W); joint clipping, ``|g|^2 = |g_engine|^2 + sum_EP
|g_expert_shard|^2`` (engine grads -- routers and replicated banks -- from
``safe_get_full_grad``, already DP-averaged), ``c = max_norm / (|g| + 1e-6)``,
and when ``c < 1`` engine tensors (``safe_set_full_grad``) and experts are
multiplied by ``c`` -- the formula of ``torch.nn.utils.clip_grad_norm_`` and of
DeepSpeed; the expert AdamW steps at the experts' LR the engine is about to use
(``engine.get_lr()[0]``, the routers' group, divided by ``train.router_lr_scale``);
then ``engine.step()`` steps the engine tensors and the schedule. With no sharded
bank DeepSpeed does all of this itself (its clipping then sees every trainable
parameter).

Precision (docs/design.md, "Precision"): fp32 on CPU; ``bf16`` in the DeepSpeed
config for GPUs. Then the frozen base and every engine parameter (routers; banks
when replicated) are bf16, with fp32 master weights and Adam state in DeepSpeed's
optimizer, in every ZeRO stage: :func:`~loramoe_ds.model.inject.inject` gives
routers and banks the base's dtype, because under ZeRO-3 DeepSpeed does not cast
parameters made after ``zero.Init``. EP banks are fp32 (their own AdamW);
activations travel in bf16 and the banks are cast to it for the expert compute.
Router logits and softmax are fp32 (:mod:`~loramoe_ds.model.router`).

Losses (``loss_reduction``): ``token_mean`` (default) makes the LM loss of an
optimizer step the summed token CE over every labelled token of all ranks and GAS
micro-batches divided by their count, exactly (:mod:`loramoe_ds.parallel.token_mean`);
``micro_batch_mean`` is the mean over ranks and micro-batches of each
micro-batch's own token mean.

Activation checkpointing (``activation_checkpointing=True``): transformers'
non-reentrant checkpoint around every decoder layer of the base model
(``activation_checkpointing_enable(..., {"use_reentrant": False})``). The
backward recomputes each layer's forward -- including the ZeRO-3 parameter
gathers and, in EP mode, the expert all-to-alls, in the same layer order on every
rank -- and the routing recorded for the auxiliary losses keeps its autograd
graph (the model raises if a reentrant setup would drop it).
"""

from __future__ import annotations

import copy
import enum
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from loramoe_ds.base_model import enable_activation_checkpointing, factory_num_layers
from loramoe_ds.config import LOSS_REDUCTIONS, AdapterConfig, check_choice
from loramoe_ds.model.adapter_io import copy_adapter_state
from loramoe_ds.model.experts import ExpertBank
from loramoe_ds.model.inject import inject
from loramoe_ds.model.lm import LoRAMoEModel
from loramoe_ds.parallel import checkpoint as ckpt
from loramoe_ds.parallel import nonfinite, zero_state
from loramoe_ds.parallel.dispatch import CommStats
from loramoe_ds.parallel.expert_optimizer import ExpertOptimizer
from loramoe_ds.parallel.groups import (
    ExpertGroups,
    create_expert_groups,
    init_process_group,
    validate_ep,
)
from loramoe_ds.parallel.layout import AdapterLayout
from loramoe_ds.parallel.settings import OptimizerSettings
from loramoe_ds.parallel.token_mean import (
    count_label_tokens,
    micro_batch_divisor,
    step_label_tokens,
)
from loramoe_ds.placement import SHARDED

CLIP_EPS = 1e-6
NOT_DEEPSPEED_KEYS = ("optimizer", "scheduler", "gradient_clipping")
"""DeepSpeed JSON sections the trainer refuses: they come from :class:`OptimizerSettings`
and ``lr_schedule``."""

LRScheduleFactory = Callable[[torch.optim.Optimizer], Any]
"""Builds the LR schedule (DeepSpeed's scheduler protocol) from the routers' optimizer."""


@dataclass
class StepResult:
    """One optimizer step of :meth:`MoETrainer.train_step` on this rank.

    Attributes:
        outputs: The model output of each of this rank's G micro-batches (0-dim
            loss tensors, graphs already freed by the backward).
        batches: This rank's micro-batches (as given).
        label_tokens: ``N_step``, labelled tokens of the step over all ranks and
            micro-batches.
        lr: The learning rate of this update.
        grad_norm: Gradient norm before clipping (``None`` if unknown or dropped).
        nonfinite: The first non-finite term on any rank when the step was dropped
            without an update (:mod:`loramoe_ds.parallel.nonfinite`), else ``None``.
    """

    outputs: list[Any]
    batches: list[dict[str, torch.Tensor]]
    label_tokens: int
    lr: float
    grad_norm: float | None
    nonfinite: str | None = None


class _Phase(enum.Enum):
    """Where the trainer is inside one optimizer step."""

    IDLE = "no gradients accumulated"
    ACCUMULATED = "gradients accumulated, not synchronised"
    SYNCED = "gradients synchronised, not yet stepped"


def _world_size_from_env() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


class MoETrainer:
    """DeepSpeed engine + expert-parallel banks + expert optimizer (see module docstring).

    Build with :meth:`build`; train with :meth:`train_step`. Attributes are
    read-only for callers.

    Attributes:
        engine: The DeepSpeed engine (module = the :class:`LoRAMoEModel`).
        model: The :class:`LoRAMoEModel` (``engine.module``).
        groups: EP/EDP topology.
        layout: Who owns each router and expert tensor (:mod:`~loramoe_ds.parallel.layout`).
        expert_optimizer: The :class:`ExpertOptimizer` of the local banks (EP
            mode) or ``None`` (replicated).
        optim: The optimizer settings (AdamW and the joint clip).
        loss_reduction: ``token_mean`` or ``micro_batch_mean``.
        comm: Byte counter of the all-to-alls.
    """

    def __init__(
        self,
        engine,
        model: LoRAMoEModel,
        groups: ExpertGroups,
        layout: AdapterLayout,
        expert_optimizer: ExpertOptimizer | None,
        optim: OptimizerSettings,
        loss_reduction: str = "token_mean",
    ):
        self.loss_reduction = loss_reduction
        self.engine = engine
        self.model: LoRAMoEModel = model
        self.groups: ExpertGroups = groups
        self.layout = layout
        self.expert_optimizer = expert_optimizer
        self.optim = optim
        self.comm = CommStats()
        self._phase = _Phase.IDLE
        self._in_step = False
        for layer in self.model.moe_layers():
            if layer.dispatcher is not None:
                layer.dispatcher.stats = self.comm

    # -- construction ----------------------------------------------------
    @classmethod
    def build(
        cls,
        model_factory: Callable[[], nn.Module],
        adapter_cfg: AdapterConfig,
        ds_config: dict,
        ep_size: int = 1,
        seed: int = 0,
        *,
        optim: OptimizerSettings,
        lr_schedule: LRScheduleFactory | None = None,
        num_layers: int | None = None,
        init_state: dict[str, torch.Tensor] | None = None,
        loss_reduction: str = "token_mean",
        activation_checkpointing: bool = False,
        placements: Sequence[str] | None = None,
    ) -> MoETrainer:
        """Build the engine, the expert shards and the expert optimizer (collective).

        Args:
            model_factory: Returns the base causal LM (called under
                ``deepspeed.zero.Init`` for ZeRO-3; weights load inside it).
            adapter_cfg: The LoRA-expert configuration.
            ds_config: DeepSpeed config dict (not modified): ZeRO, precision,
                batch sizes; no ``optimizer``, ``scheduler`` or ``gradient_clipping``.
            ep_size: Ranks per expert-parallel group (1: experts replicated as
                ZeRO parameters).
            seed: Seed for the adapter init (same on all ranks) and, offset by
                the rank, for dropout afterwards.
            optim: AdamW settings and the joint gradient clip (routers and experts).
            lr_schedule: Builds the LR schedule from the routers' torch optimizer
                (e.g. :class:`~loramoe_ds.lr_schedule.LRSchedule`); ``None``: the
                constant ``optim.lr``.
            num_layers: Decoder layers, when the factory cannot run on ``meta``.
            init_state: Optional full adapter state (export naming) to start from.
            loss_reduction: ``token_mean`` or ``micro_batch_mean`` (module docstring).
            activation_checkpointing: Non-reentrant checkpoint per decoder layer.
            placements: Explicit placement of each decoder layer's banks
                (``"sharded"`` / ``"replicated"``); ``None``: the default rule
                (:func:`~loramoe_ds.placement.layer_placements`).

        Raises:
            ValueError: Bad ``ep_size`` / ``placements`` (before any process-group
                work), or optimizer settings in the DeepSpeed config.
        """
        import deepspeed

        given = [k for k in NOT_DEEPSPEED_KEYS if k in ds_config]
        if given:
            raise ValueError(
                f"ds_config: remove {given}: the optimizer, LR schedule and gradient clip "
                "are passed as optim= / lr_schedule= (train.* in the run config)"
            )
        check_choice("train.loss_reduction", loss_reduction, LOSS_REDUCTIONS)
        n_layers = factory_num_layers(model_factory, num_layers)
        counts = adapter_cfg.layer_experts(n_layers)
        per_layer = validate_ep(ep_size, _world_size_from_env(), counts, placements)

        init_process_group()  # reused when the run (or a test) started it
        groups = create_expert_groups(ep_size)

        cfg = copy.deepcopy(ds_config)
        # DeepSpeed clips what it owns only when it owns every adapter tensor.
        cfg["gradient_clipping"] = 0.0 if SHARDED in per_layer else optim.grad_clip
        stage = int(cfg.get("zero_optimization", {}).get("stage", 0))

        # zero.Init patches tensor constructors; torch._dynamo refuses to import
        # under that patch (a factory importing transformers lazily triggers it).
        import torch._dynamo  # noqa: F401

        with deepspeed.zero.Init(config_dict_or_path=cfg, enabled=stage == 3):
            base = model_factory()
        for p in base.parameters():
            p.requires_grad_(False)
        if activation_checkpointing:
            enable_activation_checkpointing(base)

        torch.manual_seed(seed)
        model = inject(base, adapter_cfg)
        if init_state is not None:
            copy_adapter_state(model, init_state, "init_state")
        if getattr(adapter_cfg, "aux_loss_scope", "micro_batch") == "global_batch":
            from loramoe_ds.parallel.aux_scope import DPGather

            model.aux_gather = DPGather()  # the world group: every rank is data-parallel
        stats = CommStats()
        layout = AdapterLayout.build(model, groups, stats, per_layer)  # cuts the shards

        # Dropout differs per rank from here on; the adapter init above did not.
        rank = groups.rank
        torch.manual_seed(seed + 1000 + rank)
        random.seed(seed + 1000 + rank)
        np.random.seed((seed + 1000 + rank) % 2**32)

        routers = layout.router_params()
        router_ids = {id(p) for p in routers}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in router_ids]
        client_opt = torch.optim.AdamW(optim.param_groups(routers, others), **optim.adamw_kwargs())
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=client_opt, lr_scheduler=lr_schedule, config=cfg
        )
        got_wd = engine.optimizer.param_groups[0]["weight_decay"]
        assert got_wd == optim.weight_decay, (got_wd, optim)

        banks = layout.local_banks()
        expert_opt = ExpertOptimizer(banks, groups, optim, engine.device) if banks else None
        return cls(engine, model, groups, layout, expert_opt, optim, loss_reduction)

    # -- properties ------------------------------------------------------
    @property
    def global_step(self) -> int:
        """Optimizer steps taken (``engine.global_steps``)."""
        return int(self.engine.global_steps)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def expert_parallel(self) -> bool:
        return self.expert_optimizer is not None

    @property
    def banks(self) -> list[ExpertBank]:
        """Local expert shards (EP mode), in ``model.moe_layers()`` order; empty when replicated."""
        return self.layout.local_banks()

    @property
    def lr(self) -> float:
        """The experts' LR of the next update (the routers': ``router_lr_scale`` times it).

        ``engine.get_lr()[0]`` is the routers' group (:meth:`OptimizerSettings.param_groups`).
        """
        return float(self.engine.get_lr()[0]) / self.optim.router_lr_scale

    def expert_params(self) -> list[nn.Parameter]:
        """Local expert shard parameters (EP mode; empty when replicated)."""
        return self.expert_optimizer.params() if self.expert_optimizer is not None else []

    def router_params(self) -> list[nn.Parameter]:
        """Every router weight (engine parameters)."""
        return self.layout.router_params()

    # -- the step --------------------------------------------------------
    def train_step(
        self,
        micro_batches: Sequence[dict[str, torch.Tensor]],
        grad_hook: Callable[[MoETrainer], None] | None = None,
    ) -> StepResult:
        """One optimizer step from this rank's GAS micro-batches (collective).

        Forward/backward of every micro-batch (the LM loss per ``loss_reduction``),
        one gradient synchronisation, ``grad_hook(self)`` if given (it may call
        :meth:`full_adapter_grads`: the synchronised, not yet clipped gradients),
        joint clipping, both optimizers and the LR schedule. A step with a
        non-finite loss or gradient on any rank is dropped on every rank instead
        (:mod:`loramoe_ds.parallel.nonfinite`; ``StepResult.nonfinite`` names the term).

        Args:
            micro_batches: Exactly ``gradient_accumulation_steps`` micro-batches.
            grad_hook: Called on every rank between the synchronisation and the clip.

        Returns:
            A :class:`StepResult` (reduce it over ranks with
            :mod:`loramoe_ds.train_loop.step_metrics`).

        Raises:
            ValueError: If the number of micro-batches is not the engine's GAS.
            RuntimeError: If called from inside a ``grad_hook``.
        """
        if self._in_step:
            raise RuntimeError("train_step was called while a train_step is running (grad_hook)")
        self._in_step = True
        try:
            outputs, n_step = self._accumulate(micro_batches)
            self._sync_grads()
            if grad_hook is not None:
                grad_hook(self)
            lr = self.lr
            bad = nonfinite.first_nonfinite(self, outputs)  # agreed on every rank
            if bad is None:
                norm = self._optimizer_step()
            else:  # dropped on every rank: no update, Adam state and LR schedule untouched
                self._require(_Phase.SYNCED, "dropping a non-finite step")
                nonfinite.drop_update(self)
                self._phase, norm = _Phase.IDLE, None
        finally:
            self._in_step = False
        return StepResult(outputs, list(micro_batches), n_step, lr, norm, bad)

    def _require(self, phase: _Phase, what: str) -> None:
        if self._phase is not phase:
            raise RuntimeError(
                f"{what} needs {phase.value}, but the step has {self._phase.value} "
                "(MoETrainer.train_step runs every part of a step in order)"
            )

    def _forward_backward(self, batch: dict[str, Any], num_items: float | None):
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        if num_items is not None:
            batch["num_items_in_batch"] = num_items
        out = self.engine(**batch)
        self.engine.backward(out.loss)
        return out

    def _accumulate(self, micro_batches: Sequence[dict[str, torch.Tensor]]) -> tuple[list, int]:
        """Forward/backward the G micro-batches of one step (collective); no update.

        Returns:
            ``(outputs, N_step)``; the engine is then at the accumulation boundary.

        Raises:
            ValueError: If the number of micro-batches is not the engine's GAS.
            RuntimeError: If the model's labelled-token count disagrees with
                :func:`~loramoe_ds.parallel.token_mean.count_label_tokens` (the
                denominator would be wrong).
        """
        G = int(self.engine.gradient_accumulation_steps())
        if len(micro_batches) != G:
            raise ValueError(
                f"train_step got {len(micro_batches)} micro-batches; "
                f"gradient_accumulation_steps is {G}"
            )
        self._require(_Phase.IDLE, "accumulating a step")
        n_step = step_label_tokens(micro_batches, self.device)
        num_items = micro_batch_divisor(self.loss_reduction, n_step, self.groups.world_size, G)
        outputs = []
        for i, b in enumerate(micro_batches):
            out = self._forward_backward(b, num_items)
            want = count_label_tokens(b["labels"])
            if out.num_label_tokens is not None and int(out.num_label_tokens) != want:
                raise RuntimeError(
                    f"the model counted {int(out.num_label_tokens)} labelled tokens, the "
                    f"trainer {want}: the token-mean denominator would be wrong"
                )
            outputs.append(out)
            if i < G - 1:
                self.engine.step()  # DeepSpeed counts the micro-step; no update
        self._phase = _Phase.ACCUMULATED
        return outputs, n_step

    def _sync_grads(self) -> None:
        """Reduce the expert grads over EDP (EP mode; DeepSpeed reduced its own in backward)."""
        if self._phase is _Phase.SYNCED:
            raise RuntimeError(
                "the gradients of this step are already synchronised; a second "
                "synchronisation would divide them by the world size twice"
            )
        self._require(_Phase.ACCUMULATED, "synchronising the gradients")
        if self.expert_optimizer is not None:
            self.expert_optimizer.sync_grads()
        self._phase = _Phase.SYNCED

    def _clip_joint(self) -> float:
        """Joint norm of every adapter grad; clip all by one coefficient (collective).

        EP mode: the routers (engine) and the expert shards (their
        :class:`ExpertOptimizer` share). Replicated mode: every engine adapter
        tensor (routers and banks), the norm DeepSpeed clips by.

        Returns:
            The norm before clipping.
        """
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

        self._require(_Phase.SYNCED, "clipping the gradients")
        engine_grads = [(p, safe_get_full_grad(p)) for p in self.layout.engine_params().values()]
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for _, g in engine_grads:
            if g is not None:
                sq += g.float().pow(2).sum()
        if self.expert_optimizer is not None:
            sq = sq + self.expert_optimizer.sq_norm(sq.device)
        norm = float(torch.sqrt(sq))
        if self.optim.grad_clip > 0:
            coef = self.optim.grad_clip / (norm + CLIP_EPS)
            if coef < 1.0:
                for p, g in engine_grads:
                    if g is not None:
                        safe_set_full_grad(p, g * coef)
                if self.expert_optimizer is not None:
                    self.expert_optimizer.scale_grads(coef)
        return norm

    def _optimizer_step(self) -> float | None:
        """Clip and step everything at the accumulation boundary, after the synchronisation.

        EP mode: :meth:`_clip_joint`, expert AdamW at :attr:`lr`, then
        ``engine.step()`` (routers + LR schedule). Replicated mode:
        ``engine.step()`` (DeepSpeed clips and steps all parameters).

        Returns:
            The grad norm before clipping (joint in EP mode; DeepSpeed's in
            replicated mode, ``None`` if it has none).
        """
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                "an optimizer step off the gradient-accumulation boundary would step the "
                "experts but not the routers"
            )
        self._require(_Phase.SYNCED, "an optimizer step")
        norm = None
        if self.expert_optimizer is not None:
            norm = self._clip_joint()
            self.expert_optimizer.step(self.lr)
        self.engine.step()
        self._phase = _Phase.IDLE
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def full_adapter_grads(self) -> dict[str, torch.Tensor]:
        """Every trainable gradient of the step, unsharded, fp32, CPU (collective).

        Only inside :meth:`train_step`'s ``grad_hook``: after the synchronisation,
        before the clip.

        Raises:
            RuntimeError: Anywhere else (the expert gradients would be unreduced
                next to averaged router gradients, or already stepped).
        """
        from deepspeed.utils import safe_get_full_grad

        self._require(_Phase.SYNCED, "reading the gradients (train_step's grad_hook)")

        def full(p):
            g = safe_get_full_grad(p)
            return torch.zeros(p.shape) if g is None else g.detach().float().cpu().clone()

        def local(p):
            return (torch.zeros_like(p) if p.grad is None else p.grad).float().contiguous()

        return self.layout.gather(full, local)

    # -- state -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The trainer's own state: optimizer-step counters, the LR and the LR schedule.

        The adapter tensors and both optimizers' Adam state travel separately
        (gathered full by :mod:`loramoe_ds.parallel.checkpoint`).
        """
        e = self.engine
        sched = getattr(e, "lr_scheduler", None)
        return {
            "global_step": int(e.global_steps),
            "global_samples": int(e.global_samples),
            "skipped_steps": int(e.skipped_steps),
            "lr": self.lr,
            "lr_scheduler": sched.state_dict() if sched is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s counters, LR schedule and LR (both optimizers)."""
        self._require(_Phase.IDLE, "loading the trainer state")
        e = self.engine
        e.global_steps = state["global_step"]
        e.global_samples = state["global_samples"]
        e.skipped_steps = state["skipped_steps"]
        e.micro_steps = state["global_step"] * int(e.gradient_accumulation_steps())
        if state["lr_scheduler"] is not None and getattr(e, "lr_scheduler", None) is not None:
            e.lr_scheduler.load_state_dict(state["lr_scheduler"])
        # The engine's group 0 holds the routers, at router_lr_scale times the experts' LR.
        for i, group in enumerate(zero_state.inner_optimizer(e).param_groups):
            group["lr"] = state["lr"] * (self.optim.router_lr_scale if i == 0 else 1.0)
        if self.expert_optimizer is not None:
            for group in self.expert_optimizer.adamw.param_groups:
                group["lr"] = state["lr"]

    def full_adapter_state(self) -> dict[str, torch.Tensor]:
        """Every router and expert tensor, experts gathered over EP (collective).

        Names as :meth:`LoRAMoEModel.adapter_named_parameters` of the unsharded
        model; values fp32 (master weights), on CPU.
        """
        return ckpt.full_adapter_state(self)

    def save(self, directory: str | Path, client_state: dict | None = None) -> Path:
        """Atomic, topology-independent checkpoint (collective); see
        :mod:`loramoe_ds.parallel.checkpoint`."""
        return ckpt.save_checkpoint(self, directory, client_state)

    def load(self, directory: str | Path, tag: str | None = None) -> dict | None:
        """Resume from ``directory`` at this topology (collective); returns the client state."""
        return ckpt.load_checkpoint(self, directory, tag)

    def export_adapter(self, path: str | Path) -> Path:
        """Gather all experts and write the safetensors adapter on rank 0 (collective)."""
        return ckpt.export_adapter(self, path)
