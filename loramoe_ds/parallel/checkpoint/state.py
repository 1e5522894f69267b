"""The adapter's tensors and Adam state, gathered to full tensors and scattered back (collective).

Saving gathers through the trainer's :class:`~loramoe_ds.parallel.layout.AdapterLayout`:
routers and replicated banks from DeepSpeed's partitioned fp32 master weights
and Adam moments (``safe_get_full_fp32_param`` /
``safe_get_full_optimizer_state``), sharded banks and their expert-AdamW moments
by an all-gather over the EP group. Loading slices what this rank owns under the
*new* topology and placement (a bank sharded when saved may be replicated now,
or the reverse: the checkpoint holds full tensors): engine parameters through
:mod:`~loramoe_ds.parallel.zero_state` (the working low-precision copy is
refreshed), EP shards as global experts ``[ep_rank * L, (ep_rank + 1) * L)``.
"""

from __future__ import annotations

from typing import Any

import torch

from loramoe_ds.parallel import zero_state
from loramoe_ds.parallel.checkpoint.format import base_identity
from loramoe_ds.parallel.zero_state import ADAM_KEYS


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu().clone()


def full_adapter_state(trainer) -> dict[str, torch.Tensor]:
    """All routers and experts, unsharded, fp32 master weights, CPU (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    def full(p):
        v = safe_get_full_fp32_param(p)
        return _cpu(p if v is None else v)

    return trainer.layout.gather(full, lambda p: p.detach().float())


def full_optimizer_state(trainer) -> dict[str, Any] | None:
    """Adam step and moments of every adapter tensor, unsharded, CPU (collective).

    Returns ``None`` before the first optimizer step (no Adam state exists yet).
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = zero_state.inner_optimizer(trainer.engine)
    expert_adamw = trainer.expert_optimizer.adamw if trainer.expert_optimizer else None
    step_e, step_x = zero_state.adam_step(inner), zero_state.adam_step(expert_adamw)
    if step_e is None:
        return None
    out: dict[str, Any] = {}
    for key in ADAM_KEYS:

        def full(p, key=key):
            v = safe_get_full_optimizer_state(p, key)
            return _cpu(inner.state[p][key] if v is None else v)

        def local(p, key=key):
            return expert_adamw.state[p][key].detach().float()

        out[key] = trainer.layout.gather(full, local)
    engine_names = set(trainer.layout.engine_params())
    out["step"] = {n: step_e if n in engine_names else step_x for n in out["exp_avg"]}
    return out


def load_engine_state(trainer, params, optim) -> None:
    engine = trainer.engine
    named = trainer.layout.engine_params()
    for n, p in named.items():
        zero_state.set_engine_tensor(engine, p, params[n], None)
    if optim is not None:
        steps = {optim["step"][n] for n in named}
        if len(steps) != 1:
            raise ValueError(f"checkpoint: engine tensors have different Adam steps {steps}")
        zero_state.init_adam_state(
            zero_state.inner_optimizer(engine), zero_state.hp_tensors(engine), steps.pop()
        )
        zero_state.link_adam_state(engine)
        for key in ADAM_KEYS:
            for n, p in named.items():
                zero_state.set_engine_tensor(engine, p, optim[key][n], key)
    zero_state.refresh_low_precision(engine)


def load_expert_state(trainer, params, optim) -> None:
    opt = trainer.expert_optimizer.adamw if trainer.expert_optimizer else None
    with torch.no_grad():
        for n, (p, lo, L) in trainer.layout.local_shards().items():
            p.copy_(params[n][lo : lo + L].to(p.device, p.dtype))
            if optim is not None:
                zero_state.init_adam_state(opt, [p], optim["step"][n])
                for key in ADAM_KEYS:
                    opt.state[p][key].copy_(optim[key][n][lo : lo + L].to(p.device))


def current_topology(trainer) -> dict:
    g, e = trainer.groups, trainer.engine
    return {
        "world_size": g.world_size,
        "ep_size": g.ep_size,
        "experts_per_layer": trainer.model.experts_per_layer,
        "adapter": trainer.model.cfg.to_dict(),
        "base": base_identity(getattr(trainer.model.base, "config", None)),
        "train_batch_size": int(e.train_batch_size()),
    }
