"""The one learning-rate schedule of routers and experts: linear warm-up, then cosine decay.

For optimizer step ``n = 1 .. T`` (``T = train.max_steps``, ``W =
train.warmup_steps``, ``m = train.min_lr_ratio``, peak ``lr = train.lr``)::

    lr_n = lr * n / W                                          n <= W  (warm-up)
    lr_n = lr * (m + (1 - m) * (1 + cos(pi * p_n)) / 2)        n >  W  (decay)
    p_n  = min(1, (n - W) / (T - W))

Every warm-up step has ``lr_n >= lr / W > 0``, so every optimizer step moves the
weights; step ``W`` reaches the peak and step ``T`` ends at ``m * lr``. ``W = 0``
starts the decay at step 1.

Why not DeepSpeed's ``WarmupCosineLR`` (0.19): it is constructed before the
first step and sets the LR of "iteration -1", which it defines as 0.0, and its
iteration 0 (used by optimizer step 2) is ``warmup_min_ratio``. With the ratio 0
the first two updates did nothing, and no ``warmup_min_ratio`` can make step 1
move. :class:`WarmupCosineLR` here follows DeepSpeed's scheduler protocol
(``step``, ``get_lr``, ``get_last_lr``, ``state_dict`` with the same
``last_batch_iteration`` key, so older checkpoints resume). The run's
``train.*`` settings become an :class:`LRSchedule`, which the trainer hands to
``deepspeed.initialize(lr_scheduler=...)``; DeepSpeed calls it with the
routers' optimizer and steps the schedule once per optimizer step, after the
update. The expert-parallel banks take the engine's current LR, so routers and
experts follow the same ``lr_n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

NAME = "LoRAMoEWarmupCosineLR"
"""The schedule's name (error messages)."""


def lr_ratio(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """``lr_n / lr`` of optimizer step ``step`` (1-based); see the module formula.

    Args:
        step: Optimizer step ``n >= 1``.
        warmup: Warm-up steps ``W >= 0``.
        total: Total steps ``T >= 1``.
        min_ratio: Final ratio ``m`` in [0, 1].
    """
    if step <= warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * (1.0 + math.cos(math.pi * progress)) / 2.0


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a DeepSpeed (ZeRO / bf16) wrapper, as DeepSpeed's own
    schedulers find it."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    raise TypeError(f"{type(optimizer).__name__} is not a torch optimizer")


class WarmupCosineLR:
    """DeepSpeed-protocol scheduler for :func:`lr_ratio` (the optimizer's LR is the peak).

    Args:
        optimizer: The optimizer (or DeepSpeed wrapper) whose param groups'
            current ``lr`` is the peak.
        total_num_steps: ``T``.
        warmup_num_steps: ``W`` (0: no warm-up).
        cos_min_ratio: ``m``.
        last_batch_iteration: Optimizer steps already taken minus one
            (DeepSpeed's convention; -1 before the first step).
    """

    def __init__(
        self,
        optimizer: Any,
        total_num_steps: int,
        warmup_num_steps: int = 0,
        cos_min_ratio: float = 0.0,
        last_batch_iteration: int = -1,
    ) -> None:
        if total_num_steps < 1 or warmup_num_steps < 0 or not 0.0 <= cos_min_ratio <= 1.0:
            raise ValueError(
                f"{NAME}: total_num_steps={total_num_steps} must be >= 1, warmup_num_steps="
                f"{warmup_num_steps} >= 0, cos_min_ratio={cos_min_ratio} in [0, 1]"
            )
        self.optimizer = _torch_optimizer(optimizer)
        self.total_num_steps = total_num_steps
        self.warmup_num_steps = warmup_num_steps
        self.cos_min_ratio = cos_min_ratio
        self.org_lrs = [
            float(g["lr"]) if torch.is_tensor(g["lr"]) else g["lr"]
            for g in self.optimizer.param_groups
        ]
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = self._apply()

    @property
    def next_step(self) -> int:
        """The optimizer step (1-based) the current LR is for."""
        return self.last_batch_iteration + 2

    def get_lr(self) -> list[float]:
        """LR of every param group for :attr:`next_step`."""
        r = lr_ratio(
            self.next_step, self.warmup_num_steps, self.total_num_steps, self.cos_min_ratio
        )
        return [lr * r for lr in self.org_lrs]

    def _apply(self) -> list[float]:
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        return lrs

    def step(self, last_batch_iteration: int | None = None) -> None:
        """Called by DeepSpeed after each optimizer step: set the next step's LR."""
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = self._apply()

    def get_last_lr(self) -> list[float]:
        return self._last_lr

    def state_dict(self) -> dict[str, int]:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.last_batch_iteration = sd["last_batch_iteration"]
        self._last_lr = self._apply()


@dataclass(frozen=True)
class LRSchedule:
    """The run's LR schedule settings; calling it builds the scheduler for an optimizer.

    Attributes:
        total_steps: ``T`` (``train.max_steps``).
        warmup_steps: ``W`` (``train.warmup_steps``).
        min_lr_ratio: ``m`` (``train.min_lr_ratio``).
    """

    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __call__(self, optimizer: Any) -> WarmupCosineLR:
        """:class:`WarmupCosineLR` over ``optimizer`` (whose current LR is the peak)."""
        return WarmupCosineLR(optimizer, self.total_steps, self.warmup_steps, self.min_lr_ratio)
