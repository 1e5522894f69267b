"""Rank 0's metric reporting: each logged step goes to every tracker of ``output.report_to``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loramoe_ds.train_loop.trackers import RUN_ENDS, TRACKERS, Tracker


class MetricsLogger:
    """Starts the trackers (:mod:`~loramoe_ds.train_loop.trackers`) and fans each row out
    to them; a no-op on ranks other than 0, which start none.

    Args:
        out_dir: Run output directory (``metrics.csv``, ``tb/`` and the trackers'
            files go there).
        enabled: False on non-zero ranks.
        fields: CSV columns, ``step`` first (the loop passes
            :func:`loramoe_ds.train_loop.step_metrics.csv_fields`).
        report_to: The trackers (``output.report_to``).
        config: The run config (:meth:`loramoe_ds.config.RunConfig.to_dict`), reported
            once by every tracker.
        run_name: The run's name in wandb and mlflow (default: the directory's name).

    Raises:
        ValueError: An unknown tracker name.
    """

    def __init__(
        self,
        out_dir: str | Path,
        enabled: bool = True,
        fields: Sequence[str] | None = None,
        report_to: Sequence[str] = ("csv", "tensorboard"),
        config: Mapping[str, Any] | None = None,
        run_name: str | None = None,
    ):
        from loramoe_ds.train_loop.step_metrics import csv_fields

        unknown = [n for n in report_to if n not in TRACKERS]
        if unknown:
            raise ValueError(f"output.report_to={list(report_to)!r}: valid {list(TRACKERS)}")
        self.enabled = enabled
        self.trackers: list[Tracker] = []
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        kw = {
            "out": out,
            "config": dict(config or {}),
            "fields": tuple(fields) if fields is not None else csv_fields(),
            "run_name": run_name or out.resolve().name,
        }
        try:
            for name in report_to:
                self.trackers.append(TRACKERS[name](**kw))
        except BaseException:
            self.close("failed")
            raise

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Report one optimizer step's row to every tracker."""
        for t in self.trackers:
            t.log(step, values)

    def close(self, end: str = "finished") -> None:
        """End every tracker's run (the ones started, if starting failed).

        Args:
            end: How the run ended, one of :data:`~loramoe_ds.train_loop.trackers.RUN_ENDS`
                (wandb and mlflow record it).
        """
        if end not in RUN_ENDS:
            raise ValueError(f"end={end!r}: valid {list(RUN_ENDS)}")
        while self.trackers:
            self.trackers.pop().close(end)
