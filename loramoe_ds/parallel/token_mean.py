"""The LM loss of one optimizer step as the token mean over the whole global batch.

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

import torch
import torch.distributed as dist

IGNORE_INDEX = -100


def count_label_tokens(labels_BS: torch.Tensor) -> int:
    """Labelled positions of a batch: targets ``labels[:, 1:]`` that are not -100.

    The model predicts ``labels[t]`` from tokens ``< t`` (transformers' shift), so
    the first position never carries a loss.
    """
    return int((labels_BS[..., 1:] != IGNORE_INDEX).sum())


def step_label_tokens(micro_batches: Sequence[dict[str, torch.Tensor]], device) -> int:
    """``N_step``: labelled tokens of these micro-batches summed over all ranks (collective)."""
    n = sum(count_label_tokens(b["labels"]) for b in micro_batches)
    t = torch.tensor([n], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return int(t.item())


def micro_batch_divisor(
    loss_reduction: str, n_step: int, world_size: int, gas: int
) -> float | None:
    """``num_items_in_batch`` of every micro-batch of a step (``None``: its own token mean).

    ``token_mean``: ``N_step / (W * G)`` (at least 1 token, so an all-prompt step
    stays finite); ``micro_batch_mean``: ``None`` (the choices:
    :data:`loramoe_ds.config.LOSS_REDUCTIONS`, checked by the config and by
    :meth:`~loramoe_ds.parallel.engine.MoETrainer.build`).
    """
    if loss_reduction == "token_mean":
        return max(n_step, 1) / (world_size * gas)
    return None
