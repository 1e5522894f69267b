"""One optimizer step with the LM loss as the token mean over the whole global batch.

Shape legend: B rows per micro-batch, S positions, W ranks (world size), G GAS
micro-batches of one optimizer step.

With ``loss_reduction="token_mean"`` the LM loss of an optimizer step is

    L_lm = sum over every labelled token of all W ranks and G micro-batches of CE / N_step

(what transformers' ``num_items_in_batch`` and torchtune do): a long sample
weighs by its tokens, and the objective does not change with the micro-batch
size or the world size. The trainer gets the G micro-batches of the step at once,
all-reduces their labelled-token count once (``N_step``) and runs each micro-batch
with ``num_items_in_batch = N_step / (W * G)``, i.e. micro-batch loss
``CE_sum(r, m) * W * G / N_step``. ``engine.backward`` scales each loss by
``1 / G`` and the data-parallel gradient is the mean over the W ranks (expert
shards: summed over EDP and divided by W, see :mod:`loramoe_ds.parallel.engine`),
so the gradient is

    (1/W) sum_r (1/G) sum_m W*G*dCE_sum(r, m)/N_step = d/dtheta [sum CE / N_step]

exactly, whatever the label counts of the ranks and micro-batches. The
auxiliary losses stay per micro-step (averaged over ranks and micro-batches).
``micro_batch_mean`` passes no ``num_items_in_batch``: each micro-batch's LM
loss is its own token mean and the objective the mean of those means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

IGNORE_INDEX = -100
LOSS_REDUCTIONS = ("token_mean", "micro_batch_mean")


def count_label_tokens(labels_BS: torch.Tensor) -> int:
    """Labelled positions of a batch: targets ``labels[:, 1:]`` that are not -100.

    The model predicts ``labels[t]`` from tokens ``< t`` (transformers' shift), so
    the first position never carries a loss.
    """
    return int((labels_BS[..., 1:] != IGNORE_INDEX).sum())


@dataclass
class StepResult:
    """One optimizer step of ``MoETrainer.train_step`` on this rank.

    Attributes:
        outputs: The model output of each of this rank's G micro-batches (0-dim
            loss tensors, graphs already freed by the backward).
        batches: This rank's micro-batches (as given).
        label_tokens: ``N_step``, labelled tokens of the step over all ranks and
            micro-batches.
        lr: The learning rate of this update.
        grad_norm: Gradient norm before clipping (``None`` if unknown).
    """

    outputs: list[Any]
    batches: list[dict[str, torch.Tensor]]
    label_tokens: int
    lr: float
    grad_norm: float | None


def step_label_tokens(micro_batches: Sequence[dict[str, torch.Tensor]], device) -> int:
    """``N_step``: labelled tokens of these micro-batches summed over all ranks (collective)."""
    n = sum(count_label_tokens(b["labels"]) for b in micro_batches)
    t = torch.tensor([n], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return int(t.item())


def accumulate(
    trainer: Any, micro_batches: Sequence[dict[str, torch.Tensor]]
) -> tuple[list[Any], int]:
    """Forward/backward the G micro-batches of one step (collective); no update.

    ``trainer`` is the :class:`~loramoe_ds.parallel.engine.MoETrainer` (not
    imported here: the engine imports this module). Afterwards the engine is at
    the accumulation boundary: the caller steps with ``trainer.optimizer_step()``.

    Returns:
        ``(outputs, N_step)``.

    Raises:
        ValueError: If the number of micro-batches is not the engine's GAS.
        RuntimeError: If the model's labelled-token count disagrees with
            :func:`count_label_tokens` (the denominator would be wrong).
    """
    G = int(trainer.engine.gradient_accumulation_steps())
    if len(micro_batches) != G:
        raise ValueError(
            f"train_step got {len(micro_batches)} micro-batches; gradient_accumulation_steps is {G}"
        )
    n_step = step_label_tokens(micro_batches, trainer.device)
    num_items = None
    if trainer.loss_reduction == "token_mean":
        num_items = max(n_step, 1) / (trainer.groups.world_size * G)
    outputs = []
    for i, b in enumerate(micro_batches):
        out = trainer.forward_backward(b, num_items)
        want = count_label_tokens(b["labels"])
        if out.num_label_tokens is not None and int(out.num_label_tokens) != want:
            raise RuntimeError(
                f"the model counted {int(out.num_label_tokens)} labelled tokens, the "
                f"trainer {want}: the token-mean denominator would be wrong"
            )
        outputs.append(out)
        if i < G - 1:
            trainer.engine.step()  # DeepSpeed counts the micro-step; no update
    return outputs, n_step
