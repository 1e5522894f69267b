"""DeepSpeed training of a LoRA-expert model: ZeRO base, expert-parallel banks, one schedule.

Shape legend: E experts of a layer, L = E/P local experts, P = ep_size, W world
size, R rank, D / O input / output width of an adapted linear.

The API the launcher calls::

    trainer = MoETrainer.build(model_factory, adapter_cfg, ds_config, ep_size, seed)
    for micro_batches in steps:                 # this rank's GAS micro-batches of one step
        result = trainer.train_step(micro_batches)  # StepResult: outputs, N_step, lr, grad_norm
        trainer.global_step                     # optimizer steps taken
    trainer.save(dir, client_state)             # collective, atomic (checkpoint.py)
    client_state = trainer.load(dir)            # collective; None when nothing to resume
    trainer.export_adapter(path)                # collective; rank 0 writes safetensors

What :meth:`MoETrainer.build` does, in order:

1. :func:`~loramoe_ds.parallel.groups.validate_ep` (world size from the
   launcher's ``WORLD_SIZE``, layer count from the model factory run on the
   ``meta`` device or ``num_layers``) -- *before* any process-group work.
2. ``deepspeed.init_distributed``; EP / EDP groups
   (:mod:`~loramoe_ds.parallel.groups`).
3. The base model from ``model_factory()`` -- under ``deepspeed.zero.Init`` for
   ZeRO stage 3, so it is born partitioned -- frozen.
4. ``torch.manual_seed(seed)`` then :func:`~loramoe_ds.model.inject.inject` on
   every rank: routers and full expert banks are identical on all ranks (the
   routers become ZeRO parameters inside ``deepspeed.initialize``). An optional
   full adapter state (``init_state``) overwrites them.
5. ``ep_size > 1``: each adapted linear's bank is cut to its local shard
   (global experts ``[ep_rank*L, (ep_rank+1)*L)``), ``layer.experts = None`` and
   an :class:`~loramoe_ds.parallel.dispatch.EPDispatcher` owning the shard is
   attached. The banks are therefore *not* engine parameters.
   ``ep_size == 1`` ("replicated"): the banks stay in the model as ordinary
   trainable parameters that DeepSpeed/ZeRO manages like the routers (ZeRO-3
   partitions and gathers them; no all-to-all, no expert optimizer).
6. ``deepspeed.initialize`` with a client ``torch.optim.AdamW`` over the
   engine's trainable parameters (routers [+ banks when replicated]); its
   hyper-parameters come from the config's ``optimizer.params`` (``type`` Adam
   or AdamW; ``weight_decay`` defaults to 0.0 explicitly, never torch's 0.01).
   The config's ``scheduler`` drives the one LR schedule.
7. EP only: an expert optimizer, ``torch.optim.AdamW`` over the local shards
   with the same betas, eps and weight decay.

One optimizer step (at ``engine.is_gradient_accumulation_boundary()``, EP mode):

* expert grads (accumulated over the GAS micro-batches, each loss scaled by
  1/GAS by ``engine.backward``) are summed over the EDP group and divided by the
  **full world size** W: the all-to-all backward already summed every EP rank's
  loss into each local expert, so ``sum_EDP / W = (1/W) sum_ranks dloss_r/dtheta``,
  the same data-parallel mean ZeRO gives the routers;
* joint clipping. DeepSpeed's clipping only sees engine parameters, so it is
  turned off (``gradient_clipping`` is taken out of the config handed to
  DeepSpeed) and done here: ``|g|^2 = |g_router|^2 + sum_EP |g_expert_shard|^2``
  (router grads from ``safe_get_full_grad``, already DP-averaged; each expert
  counted once: the shard norms are summed over the EP group only, EDP replicas
  being identical), ``c = max_norm / (|g| + 1e-6)``; when ``c < 1`` both
  routers (``safe_set_full_grad``) and experts are multiplied by ``c`` -- the
  formula of ``torch.nn.utils.clip_grad_norm_`` and of DeepSpeed;
* the expert optimizer takes ``lr = engine.get_lr()[0]`` (the LR the engine is
  about to use) and steps; then ``engine.step()`` steps the routers and the
  schedule.

In replicated mode DeepSpeed does all of this itself (its clipping then sees
every trainable parameter).

Precision: fp32 on CPU; ``bf16`` in the DeepSpeed config for GPUs (engine
parameters bf16 with fp32 master weights; EP banks are fp32 master weights,
activations travel in bf16 and are cast for the expert compute).

Losses (``loss_reduction``): ``token_mean`` (default) makes the LM loss of an
optimizer step the summed token CE over every labelled token of all ranks and GAS
micro-batches divided by their count, exactly (:mod:`loramoe_ds.parallel.step`,
:meth:`MoETrainer.train_step`); ``micro_batch_mean`` is the mean over ranks and
micro-batches of each micro-batch's own token mean (``train_micro_batch`` /
``forward_backward`` without ``num_items_in_batch``).

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
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from loramoe_ds.config import AdapterConfig
from loramoe_ds.model.experts import ExpertBank
from loramoe_ds.model.inject import LoRAMoEModel, _num_layers, inject
from loramoe_ds.parallel import checkpoint as ckpt
from loramoe_ds.parallel.checkpoint import gather_adapter, load_full_state
from loramoe_ds.parallel.dispatch import CommStats, EPDispatcher
from loramoe_ds.parallel.groups import ExpertGroups, create_expert_groups, validate_ep
from loramoe_ds.parallel.step import LOSS_REDUCTIONS, StepResult

CLIP_EPS = 1e-6


def _optim_hparams(ds_config: dict) -> dict[str, Any]:
    """AdamW hyper-parameters from the DeepSpeed config's ``optimizer`` section."""
    opt = ds_config.get("optimizer") or {}
    kind = str(opt.get("type", "AdamW")).lower()
    if kind not in ("adam", "adamw"):
        raise ValueError(
            f"optimizer.type={opt.get('type')!r}: loramoe-ds trains with AdamW; use 'AdamW'"
        )
    params = dict(opt.get("params") or {})
    unknown = sorted(
        set(params) - {"lr", "betas", "eps", "weight_decay", "torch_adam", "adam_w_mode"}
    )
    if unknown:
        raise ValueError(
            f"optimizer.params {unknown} not supported; use lr, betas, eps, weight_decay"
        )
    return {
        "lr": float(params.get("lr", 1e-4)),
        "betas": tuple(params.get("betas", (0.9, 0.999))),
        "eps": float(params.get("eps", 1e-8)),
        "weight_decay": float(params.get("weight_decay", 0.0)),
    }


def _world_size_from_env() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _count_layers(model_factory: Callable[[], nn.Module], num_layers: int | None) -> int:
    if num_layers is not None:
        return num_layers
    n = getattr(model_factory, "num_layers", None)
    if isinstance(n, int):
        return n
    try:
        with torch.device("meta"):
            probe = model_factory()
        return _num_layers(probe)
    except Exception as exc:  # noqa: BLE001 - any factory failure means "tell us"
        raise ValueError(
            "cannot determine the model's number of decoder layers before initialising "
            f"distributed training ({exc}); pass num_layers= to MoETrainer.build"
        ) from exc


def shard_banks(model: LoRAMoEModel, groups: ExpertGroups, stats: CommStats) -> list[ExpertBank]:
    """Replace each layer's full bank by an EP dispatcher that owns its local shard.

    Rank with EP rank ``p`` keeps experts ``[p*L, (p+1)*L)``; ``layer.experts``
    becomes ``None``, so the bank is not a parameter of the model.

    Returns:
        The local shard banks, in ``model.moe_layers()`` order.
    """
    banks = []
    for layer in model.moe_layers():
        full = layer.experts
        assert full is not None, f"{layer.name}: bank already detached"
        L = full.num_experts // groups.ep_size
        lo = groups.ep_rank * L
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
        banks.append(shard)
    return banks


class MoETrainer:
    """DeepSpeed engine + expert-parallel banks + expert optimizer (see module docstring).

    Build with :meth:`build`; attributes are read-only for callers.

    Attributes:
        engine: The DeepSpeed engine (module = the :class:`LoRAMoEModel`).
        model: The :class:`LoRAMoEModel` (``engine.module``).
        groups: EP/EDP topology.
        banks: Local expert shards (EP mode), in ``model.moe_layers()`` order.
        expert_optimizer: AdamW over ``banks`` (EP mode) or ``None``.
        max_grad_norm: Joint clipping threshold (0: off).
        comm: Byte counter of the all-to-alls.
    """

    def __init__(
        self,
        engine,
        model,
        groups,
        banks,
        expert_optimizer,
        max_grad_norm,
        hparams,
        loss_reduction: str = "token_mean",
    ):
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(
                f"loss_reduction={loss_reduction!r}: valid values {list(LOSS_REDUCTIONS)}"
            )
        self.loss_reduction = loss_reduction
        self.engine = engine
        self.model: LoRAMoEModel = model
        self.groups: ExpertGroups = groups
        self.banks: list[ExpertBank] = banks
        self.expert_optimizer: torch.optim.Optimizer | None = expert_optimizer
        self.max_grad_norm = max_grad_norm
        self.hparams = hparams
        self.comm = CommStats()
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
        num_layers: int | None = None,
        init_state: dict[str, torch.Tensor] | None = None,
        loss_reduction: str = "token_mean",
        activation_checkpointing: bool = False,
    ) -> MoETrainer:
        """Build the engine, the expert shards and the expert optimizer (collective).

        Args:
            model_factory: Returns the base causal LM (called under
                ``deepspeed.zero.Init`` for ZeRO-3; weights load inside it).
            adapter_cfg: The LoRA-expert configuration.
            ds_config: DeepSpeed config dict (not modified). ``optimizer`` (AdamW
                params) and ``gradient_clipping`` are interpreted here.
            ep_size: Ranks per expert-parallel group (1: experts replicated as
                ZeRO parameters).
            seed: Seed for the adapter init (same on all ranks) and, offset by
                the rank, for dropout afterwards.
            num_layers: Decoder layers, when the factory cannot run on ``meta``.
            init_state: Optional full adapter state (export naming) to start from.
            loss_reduction: ``token_mean`` or ``micro_batch_mean`` (module docstring).
            activation_checkpointing: Non-reentrant checkpoint per decoder layer.

        Raises:
            ValueError: Bad ``ep_size`` / expert counts (before any process-group
                work), or an unsupported optimizer config.
        """
        import deepspeed

        hp = _optim_hparams(ds_config)
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(
                f"loss_reduction={loss_reduction!r}: valid values {list(LOSS_REDUCTIONS)}"
            )
        n_layers = _count_layers(model_factory, num_layers)
        counts = adapter_cfg.layer_experts(n_layers)
        validate_ep(ep_size, _world_size_from_env(), counts)

        deepspeed.init_distributed()
        groups = create_expert_groups(ep_size)

        cfg = copy.deepcopy(ds_config)
        cfg.pop("optimizer", None)
        max_norm = float(cfg.get("gradient_clipping", 0.0) or 0.0)
        if ep_size > 1:
            cfg["gradient_clipping"] = 0.0  # joint clipping done by the trainer
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
            load_full_state(model, init_state)
        if getattr(adapter_cfg, "aux_loss_scope", "micro_batch") == "global_batch":
            from loramoe_ds.parallel.aux_scope import DPGather

            model.aux_gather = DPGather()  # the world group: every rank is data-parallel
        stats = CommStats()
        banks = shard_banks(model, groups, stats) if ep_size > 1 else []

        # Dropout differs per rank from here on; the adapter init above did not.
        rank = groups.rank
        torch.manual_seed(seed + 1000 + rank)
        random.seed(seed + 1000 + rank)
        np.random.seed((seed + 1000 + rank) % 2**32)

        engine_params = [p for p in model.parameters() if p.requires_grad]
        client_opt = torch.optim.AdamW(engine_params, **hp)
        from loramoe_ds import lr_schedule

        if (cfg.get("scheduler") or {}).get("type") == lr_schedule.NAME:
            lr_schedule.register()  # in every process, not only where make_plan ran
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client_opt, config=cfg)
        got_wd = engine.optimizer.param_groups[0]["weight_decay"]
        assert got_wd == hp["weight_decay"], (got_wd, hp)

        expert_opt = None
        if banks:
            for b in banks:
                b.to(engine.device)
            expert_opt = torch.optim.AdamW([p for b in banks for p in b.parameters()], **hp)
        trainer = cls(engine, model, groups, banks, expert_opt, max_norm, hp, loss_reduction)
        return trainer

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
        return bool(self.banks)

    def expert_params(self) -> list[nn.Parameter]:
        """Local expert shard parameters (EP mode; empty when replicated)."""
        return [p for b in self.banks for p in b.parameters()]

    def router_params(self) -> list[nn.Parameter]:
        return [layer.router.weight for layer in self.model.moe_layers()]

    # -- training --------------------------------------------------------
    def forward_backward(
        self, batch: dict[str, torch.Tensor], num_items_in_batch: float | None = None
    ):
        """Forward and ``engine.backward`` one micro-batch (no optimizer step).

        Args:
            batch: This rank's micro-batch.
            num_items_in_batch: Divide the micro-batch's summed token CE by this
                instead of its own labelled count (token-mean reduction).
        """
        batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        if num_items_in_batch is not None:
            batch["num_items_in_batch"] = num_items_in_batch
        out = self.engine(**batch)
        self.engine.backward(out.loss)
        return out

    def accumulate(self, micro_batches: Sequence[dict[str, torch.Tensor]]) -> tuple[list, int]:
        """Forward/backward the GAS micro-batches of one step, stopping before the update.

        See :func:`loramoe_ds.parallel.step.accumulate`; call :meth:`optimizer_step`
        after it (and :meth:`sync_expert_grads` / :meth:`full_adapter_grads` if wanted).

        Returns:
            ``(outputs, N_step)``.
        """
        from loramoe_ds.parallel.step import accumulate

        return accumulate(self, micro_batches)

    def train_step(self, micro_batches: Sequence[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step from this rank's GAS micro-batches (collective).

        Returns:
            A :class:`~loramoe_ds.parallel.step.StepResult` (reduce it over ranks
            with :mod:`loramoe_ds.train_loop.metrics`).
        """
        outputs, n_step = self.accumulate(micro_batches)
        lr = float(self.engine.get_lr()[0])
        norm = self.optimizer_step()
        return StepResult(outputs, list(micro_batches), n_step, lr, norm)

    def train_micro_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One micro-batch; steps every optimizer at the gradient-accumulation boundary.

        Args:
            batch: ``input_ids, attention_mask, labels, task_type`` of this rank.

        Returns:
            This rank's ``loss, lm_loss, lbc, lb, z`` and, on a boundary,
            ``lr`` and ``grad_norm`` (the joint norm before clipping).
        """
        out = self.forward_backward(batch)
        stats = {
            "loss": out.loss.item(),
            "lm_loss": out.lm_loss.item(),
            "lbc": out.lbc_loss.item(),
            "lb": out.load_balance_loss.item(),
            "z": out.z_loss.item(),
        }
        if self.engine.is_gradient_accumulation_boundary():
            stats["lr"] = float(self.engine.get_lr()[0])
            norm = self.optimizer_step()
            if norm is not None:
                stats["grad_norm"] = float(norm)
        else:
            self.engine.step()  # DeepSpeed counts the micro-step; no update
        return stats

    def sync_expert_grads(self) -> torch.Tensor | None:
        """Sum local expert grads over EDP and divide by W (collective).

        Returns:
            The flat synchronised fp32 grad of the local shards (``None`` when
            replicated).
        """
        params = self.expert_params()
        if not params:
            return None
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
        return flat

    def clip_joint(self, flat_expert_grad: torch.Tensor) -> float:
        """Joint router + expert grad norm; clip both by one coefficient (collective).

        Returns:
            The norm before clipping.
        """
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

        router_grads = [(p, safe_get_full_grad(p)) for p in self.router_params()]
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for _, g in router_grads:
            if g is not None:
                sq += g.float().pow(2).sum()
        ex = flat_expert_grad.pow(2).sum().to(sq.device)
        if self.groups.ep_size > 1:
            dist.all_reduce(ex, group=self.groups.ep_group)
        norm = float(torch.sqrt(sq + ex))
        if self.max_grad_norm > 0:
            coef = self.max_grad_norm / (norm + CLIP_EPS)
            if coef < 1.0:
                for p, g in router_grads:
                    if g is not None:
                        safe_set_full_grad(p, g * coef)
                for p in self.expert_params():
                    p.grad.mul_(coef)
        return norm

    def optimizer_step(self, flat_expert_grad: torch.Tensor | None = None) -> float | None:
        """At a GAS boundary, after the last backward: sync, clip and step everything.

        EP mode: :meth:`sync_expert_grads` (unless its result is passed in),
        :meth:`clip_joint`, expert AdamW at ``engine.get_lr()[0]``, then
        ``engine.step()`` (routers + LR schedule). Replicated mode:
        ``engine.step()`` (DeepSpeed clips and steps all parameters).

        Returns:
            The grad norm before clipping (joint in EP mode; DeepSpeed's in
            replicated mode, ``None`` if it has none).
        """
        norm = None
        if self.expert_optimizer is not None:
            if flat_expert_grad is None:
                flat_expert_grad = self.sync_expert_grads()
            norm = self.clip_joint(flat_expert_grad)
            lr = float(self.engine.get_lr()[0])
            for group in self.expert_optimizer.param_groups:
                group["lr"] = lr
            self.expert_optimizer.step()
            self.expert_optimizer.zero_grad(set_to_none=True)
        self.engine.step()
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def full_adapter_grads(self) -> dict[str, torch.Tensor]:
        """Every trainable gradient, unsharded, fp32, CPU (collective).

        Call at a GAS boundary after the backward (and, in EP mode, after
        :meth:`sync_expert_grads`) and before :meth:`optimizer_step`.
        """
        from deepspeed.utils import safe_get_full_grad

        def full(p):
            g = safe_get_full_grad(p)
            return torch.zeros(p.shape) if g is None else g.detach().float().cpu().clone()

        def local(p):
            return (torch.zeros_like(p) if p.grad is None else p.grad).float().contiguous()

        return gather_adapter(self.model, self.groups, full, local)

    # -- state -----------------------------------------------------------
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


def enable_activation_checkpointing(base: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer of a transformers model.

    Raises:
        ValueError: If the architecture has no checkpointable decoder layers.
    """
    kwargs = {"use_reentrant": False}
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"train.activation_checkpointing: {type(base).__name__} does not support "
            "activation checkpointing in transformers"
        )
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.23
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.train()
