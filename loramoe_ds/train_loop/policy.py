"""Checkpoint policy: when to save, which checkpoints to keep, when to stop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Decision:
    """What to do after an optimizer step.

    Attributes:
        save: Write a checkpoint now.
        stop: Leave the loop after the save.
        preempted: The stop is a preemption (or ``stop_after``): the run is not
            finished, the launcher exits 75 ("requeue me") and no adapter is exported.
    """

    save: bool
    stop: bool
    preempted: bool


@dataclass(frozen=True)
class CheckpointPolicy:
    """Save every ``save_every`` steps, at the end and on preemption; keep the newest ``keep``.

    Attributes:
        max_steps: Optimizer steps of the whole run (the last one is saved, then stop).
        save_every: Periodic checkpoints (0: only at the end and on preemption).
        keep: Checkpoints kept on disk (0: keep all).
        stop_after: Stop as if preempted after this many steps of this invocation
            (testing aid), ``None``: never.
    """

    max_steps: int
    save_every: int = 0
    keep: int = 2
    stop_after: int | None = None

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.save_every < 0 or self.keep < 0:
            raise ValueError(
                f"CheckpointPolicy: max_steps={self.max_steps} (>= 1), save_every="
                f"{self.save_every} (>= 0), keep={self.keep} (>= 0)"
            )
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after={self.stop_after}: must be >= 1")

    def decide(self, step: int, steps_this_run: int, preempt_requested: bool) -> Decision:
        """After optimizer step ``step`` (1-based, global), the ``steps_this_run``-th of this run.

        Args:
            step: Optimizer steps taken so far in the whole run.
            steps_this_run: Steps taken since this invocation (re)started.
            preempt_requested: A preemption signal reached any rank (the caller
                agrees on it collectively).
        """
        preempted = preempt_requested or (
            self.stop_after is not None and steps_this_run >= self.stop_after
        )
        finished = step >= self.max_steps
        periodic = self.save_every > 0 and step % self.save_every == 0
        return Decision(save=preempted or finished or periodic, stop=preempted or finished,
                        preempted=preempted and not finished)  # fmt: skip

    def prune(self, ckpt_dir: str | Path) -> list[Path]:
        """Remove all but the newest ``keep`` checkpoint tags (call on one rank, after a save).

        Returns:
            The removed directories.
        """
        from loramoe_ds.parallel.checkpoint import prune_checkpoints

        return prune_checkpoints(ckpt_dir, self.keep)
