"""Metrics sinks on rank 0: stdout (via the progress bar), CSV and TensorBoard."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


class MetricsLogger:
    """Append-only CSV + TensorBoard writer; a no-op on ranks other than 0.

    The CSV is opened in append mode so a resumed run continues the same file
    (with the header it was started with); each row carries the optimizer step,
    so repeated or lost steps are visible.

    Args:
        out_dir: Run output directory (``metrics.csv`` and ``tb/`` go there).
        enabled: False on non-zero ranks.
        fields: CSV columns, ``step`` first (the loop passes
            :func:`loramoe_ds.train_loop.step_metrics.csv_fields`).
    """

    def __init__(
        self, out_dir: str | Path, enabled: bool = True, fields: Sequence[str] | None = None
    ):
        from loramoe_ds.train_loop.step_metrics import csv_fields

        self.enabled = enabled
        self.fields = tuple(fields) if fields is not None else csv_fields()
        self._csv = self._writer = self._tb = None
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.csv"
        new = not path.exists() or path.stat().st_size == 0
        if not new:  # a resumed run keeps the columns the file started with
            with open(path, newline="") as f:
                header = next(csv.reader(f), None)
            if header:
                self.fields = tuple(header)
        self._csv = open(path, "a", newline="")  # noqa: SIM115 - closed in close()
        self._writer = csv.DictWriter(self._csv, fieldnames=self.fields, extrasaction="ignore")
        if new:
            self._writer.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tb"))
        except Exception:  # tensorboard missing: CSV still works
            self._tb = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._writer.writerow({"step": step, **values})
        self._csv.flush()
        if self._tb is not None:
            for k, v in values.items():
                if v is not None:
                    self._tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self._csv is not None:
            self._csv.close()
        if self._tb is not None:
            self._tb.close()
