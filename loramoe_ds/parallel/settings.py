"""The optimizer settings of a training run, handed to the trainer as one typed object.

The run config's ``train.*`` section owns them (``train.lr``, ``train.weight_decay``,
``train.grad_clip``); :meth:`~loramoe_ds.parallel.engine.MoETrainer.build` builds
the routers' AdamW (handed to ``deepspeed.initialize(optimizer=...)``) and the
expert banks' AdamW (:class:`~loramoe_ds.parallel.expert_optimizer.ExpertOptimizer`)
from the same object, so both follow one set of hyper-parameters. The DeepSpeed
JSON carries none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW hyper-parameters and the joint gradient clip of routers and experts.

    Attributes:
        lr: Peak learning rate (the LR schedule scales it).
        betas: Adam's ``(beta1, beta2)``.
        eps: Adam's epsilon.
        weight_decay: Decoupled weight decay (explicit: never torch's default 0.01).
        grad_clip: Joint gradient-norm clip over routers and experts (0: off).
        router_lr_scale: The routers' peak LR is ``router_lr_scale * lr``.
    """

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    router_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}: must be > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={self.betas}: two values in [0, 1)")
        if not self.router_lr_scale > 0:
            raise ValueError(f"router_lr_scale={self.router_lr_scale}: must be > 0")
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps}: must be > 0")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(
                f"weight_decay={self.weight_decay}, grad_clip={self.grad_clip}: must be >= 0"
            )

    def adamw_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``torch.optim.AdamW``."""
        return {
            "lr": float(self.lr),
            "betas": self.betas,
            "eps": float(self.eps),
            "weight_decay": float(self.weight_decay),
        }

    def param_groups(self, routers: list[Any], others: list[Any]) -> list[dict[str, Any]]:
        """AdamW parameter groups: the routers first (at ``router_lr_scale * lr``), then
        the other adapter tensors DeepSpeed owns (replicated banks; omitted when empty).
        With ``router_lr_scale == 1`` one group holds them all.

        The LR schedule scales every group's peak by the same ratio, so the routers'
        LR is ``router_lr_scale`` times the experts' at every step.
        """
        if self.router_lr_scale == 1.0:
            return [{"params": [*routers, *others], "lr": float(self.lr)}]
        groups = [{"params": list(routers), "lr": float(self.lr * self.router_lr_scale)}]
        if others:
            groups.append({"params": list(others), "lr": float(self.lr)})
        return groups
