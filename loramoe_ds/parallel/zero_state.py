"""DeepSpeed's side of one adapter tensor: its fp32 master weight and Adam state, read and set.

The only place that touches DeepSpeed optimizer internals (ZeRO-3 fp32
partitions, ZeRO-1/2 and bf16 ``_hp_mapping`` fragments, the wrapped torch
optimizer's state), for :mod:`loramoe_ds.parallel.checkpoint`. Reading goes
through DeepSpeed's public ``safe_get_full_*`` accessors; writing slices the
full value into this rank's partition, creates Adam state on an engine that has
not stepped yet, and refreshes the working (low-precision) copies afterwards.
"""

from __future__ import annotations

import torch

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside the engine's (ZeRO / bf16) wrapper."""
    from loramoe_ds.lr_schedule import _torch_optimizer

    return _torch_optimizer(engine.optimizer)


def hp_tensors(engine) -> list[torch.Tensor]:
    """The fp32 tensors the engine's torch optimizer steps (ZeRO flat partitions or params)."""
    opt = engine.optimizer
    for attr in (
        "fp32_partitioned_groups_flat",
        "single_partition_of_fp32_groups",
        "fp32_groups_flat_partition",
    ):  # fmt: skip  ZeRO-3, ZeRO-1/2, bf16
        if hasattr(opt, attr):
            return list(getattr(opt, attr))
    return [p for g in inner_optimizer(engine).param_groups for p in g["params"]]


def adam_step(optimizer: torch.optim.Optimizer | None) -> int | None:
    """Adam steps taken (the same for every tensor of the optimizer); ``None`` before the first."""
    if optimizer is None:
        return None
    for st in optimizer.state.values():
        if "step" in st:
            return int(float(st["step"]))
    return None


def set_engine_tensor(engine, p: torch.nn.Parameter, value: torch.Tensor, key: str | None):
    """Set the fp32 master weight (``key=None``) or an Adam moment of one engine parameter."""
    opt = engine.optimizer
    value = value.to(torch.float32)
    if hasattr(p, "ds_id"):  # ZeRO-3: write this rank's slice (tolerates padded partitions)
        frag, _ = opt._get_fp32_opt_state_partition(
            p, release_swap_buffers=False, optim_state_key=key
        )
        n = frag.numel()
        flat = value.flatten()
        lo = n * opt._get_param_partition_rank(p)
        piece = flat[lo : min(lo + n, flat.numel())]
        frag.data.zero_()
        frag.data[: piece.numel()].copy_(piece.to(frag.device))
    elif getattr(p, "_hp_mapping", None) is not None:  # ZeRO-1/2, bf16 optimizer
        from deepspeed.utils import safe_set_full_optimizer_state

        if key is None:
            p.set_full_hp_param(value.to(p.device))
        else:
            safe_set_full_optimizer_state(p, value.to(p.device), key)
    elif hasattr(p, "_hp_mapping"):  # a partition owning no fragment of p
        return
    elif key is None:
        with torch.no_grad():
            p.data.copy_(value.to(p.device, p.dtype))
    else:
        inner_optimizer(engine).state[p][key].copy_(value.to(p.device))


def init_adam_state(optimizer: torch.optim.Optimizer, tensors, step: int) -> None:
    """Create torch AdamW state (zero moments, ``step``) for ``tensors`` of ``optimizer``."""
    on_device = any(g.get("capturable") or g.get("fused") for g in optimizer.param_groups)
    torch_adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    for t in tensors:
        st = optimizer.state[t]
        if torch_adam:  # torch keeps the step as a 0-dim tensor; DeepSpeed's CPU Adam an int
            dev = t.device if on_device else "cpu"
            st["step"] = torch.tensor(float(step), dtype=torch.float32, device=dev)
        else:
            st["step"] = int(step)
        for k in ADAM_KEYS:
            if k not in st:
                st[k] = torch.zeros_like(t, memory_format=torch.preserve_format)


def refresh_low_precision(engine) -> None:
    """Copy the fp32 master weights into the working copies the forward reads."""
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        for i in range(len(opt.fp32_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(i)
        if opt.persistent_parameters:
            opt.persistent_parameters[0].all_gather(opt.persistent_parameters)
    elif hasattr(opt, "update_lp_params"):  # ZeRO-1/2, bf16 optimizer
        opt.update_lp_params()


def link_adam_state(engine) -> None:
    """ZeRO-1/2 and bf16: point each parameter's fragment at the (new) Adam state tensors."""
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
