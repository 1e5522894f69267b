"""What one optimizer step measures: the metric schema and its reduction over ranks.

Shape legend: B rows per micro-batch, S positions, W ranks, G GAS micro-batches.

Every logged quantity is one :class:`Metric` in :data:`STEP_METRICS`: its name
(the ``metrics.csv`` column and TensorBoard tag), how to read it from a
micro-batch's model output (:class:`~loramoe_ds.model.lm.LoRAMoEOutput`) and
batch, and how the W*G per-micro-batch values of a step combine. Adding an
auxiliary loss or a packing statistic is one line here: the CSV header, the
TensorBoard tags, the progress bar and the cross-rank reduction follow.

Reductions (sums run over the G micro-batches of every rank; one all-reduce):

* ``mean``: ``sum / (W*G)`` -- the aux losses and the total loss, whose
  gradients DeepSpeed averages over micro-steps and ranks;
* ``sum``: the step total (tokens, labelled tokens);
* ``per_label_token``: ``sum / N_step`` -- the LM loss: summed token CE over all
  labelled tokens of the step divided by their count (the true global token mean,
  whatever ``train.loss_reduction`` optimises);
* ``per_slot``: ``sum / (sum of B*S)`` -- e.g. the padding fraction.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

REDUCTIONS = ("mean", "sum", "per_label_token", "per_slot")


@dataclass(frozen=True)
class Metric:
    """One per-step metric.

    Attributes:
        name: Column in ``metrics.csv`` / TensorBoard tag ``train/<name>``.
        value: ``(output, batch) -> number`` for one micro-batch of one rank.
        reduce: One of :data:`REDUCTIONS` (module docstring).
        bar: Progress-bar label, or ``None`` to leave it off the bar.
        fmt: Format spec on the bar.
    """

    name: str
    value: Callable[[Any, Mapping[str, Any]], Any]
    reduce: str
    bar: str | None = None
    fmt: str = ".3f"

    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"Metric {self.name!r}: reduce={self.reduce!r}, valid {REDUCTIONS}")


def real_tokens(batch: Mapping[str, Any]) -> torch.Tensor:
    """Non-padding tokens of a batch: ``seq_ids >= 0`` when packed, else the attention mask."""
    if batch.get("seq_ids") is not None:
        return (batch["seq_ids"] >= 0).sum()
    if batch.get("attention_mask") is not None:
        return batch["attention_mask"].sum()
    return torch.tensor(batch["input_ids"].numel())


def _slots(batch: Mapping[str, Any]) -> int:
    return batch["input_ids"].numel()


STEP_METRICS: tuple[Metric, ...] = (
    Metric("loss", lambda o, b: o.loss, "mean", bar="loss"),
    Metric("lm_loss", lambda o, b: o.lm_loss_sum, "per_label_token", bar="lm"),
    Metric("lbc", lambda o, b: o.lbc_loss, "mean", bar="lbc"),
    Metric("sup", lambda o, b: o.router_supervision_loss, "mean", bar="sup"),
    Metric("lb", lambda o, b: o.load_balance_loss, "mean", bar="lb", fmt=".2f"),
    Metric("z", lambda o, b: o.z_loss, "mean", bar="z", fmt=".1f"),
    Metric("tokens", lambda o, b: real_tokens(b), "sum"),
    Metric("label_tokens", lambda o, b: o.num_label_tokens, "sum"),
    Metric("pad_frac", lambda o, b: _slots(b) - real_tokens(b), "per_slot", bar="pad", fmt=".2f"),
)
"""The per-step metrics, in CSV column order."""

RUN_FIELDS = ("lr", "grad_norm", "tokens_per_s", "elapsed_s")
"""Per-step values that are not reductions of micro-batch values."""


def csv_fields(metrics: Sequence[Metric] = STEP_METRICS) -> tuple[str, ...]:
    """The ``metrics.csv`` header: step, every metric, then :data:`RUN_FIELDS`."""
    return ("step", *(m.name for m in metrics), *RUN_FIELDS)


def _number(v: Any) -> float:
    if v is None:
        return 0.0
    return float(v.detach().float().item()) if torch.is_tensor(v) else float(v)


def reduce_step(
    outputs: Sequence[Any],
    batches: Sequence[Mapping[str, Any]],
    metrics: Sequence[Metric] = STEP_METRICS,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Combine this step's micro-batch values over micro-batches and ranks (collective).

    Args:
        outputs: This rank's model outputs of the step (one per micro-batch).
        batches: The matching micro-batches.
        metrics: The schema.
        device: Where the all-reduce runs (NCCL needs the accelerator).

    Returns:
        ``{metric name: value}`` -- identical on every rank.
    """
    if len(outputs) != len(batches):
        raise ValueError(f"{len(outputs)} outputs for {len(batches)} batches")
    sums = [sum(_number(m.value(o, b)) for o, b in zip(outputs, batches)) for m in metrics]
    n_micro = float(len(batches))
    slots = float(sum(_slots(b) for b in batches))
    n_label = sum(_number(o.num_label_tokens) for o in outputs)
    t = torch.tensor([*sums, n_micro, slots, n_label], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    vals = t.tolist()
    n_micro, slots, n_label = vals[-3:]
    denom = {"mean": n_micro, "sum": 1.0, "per_label_token": max(n_label, 1.0), "per_slot": slots}
    return {m.name: v / max(denom[m.reduce], 1e-12) for m, v in zip(metrics, vals)}


class MetricsAccumulator:
    """Turns each :class:`~loramoe_ds.parallel.engine.StepResult` into one logged row.

    Args:
        metrics: The schema (default :data:`STEP_METRICS`).
        device: Device of the cross-rank reduction.
    """

    def __init__(self, metrics: Sequence[Metric] = STEP_METRICS, device=None) -> None:
        self.metrics = tuple(metrics)
        self.device = device
        self.t0 = time.time()
        self.tokens = 0.0

    def step(self, result: Any) -> dict[str, float]:
        """The row of one optimizer step (collective: every rank calls it)."""
        row = reduce_step(result.outputs, result.batches, self.metrics, self.device)
        self.tokens += row.get("tokens", 0.0)
        elapsed = time.time() - self.t0
        row.update(
            lr=float(result.lr),
            grad_norm=float(result.grad_norm or 0.0),
            tokens_per_s=self.tokens / max(elapsed, 1e-9),
            elapsed_s=elapsed,
        )
        return row

    def postfix(self, row: Mapping[str, float]) -> dict[str, str]:
        """Progress-bar fields of a row."""
        bar = {m.bar: format(row[m.name], m.fmt) for m in self.metrics if m.bar}
        bar["tok_s"] = f"{row['tokens_per_s']:.0f}"
        return bar
