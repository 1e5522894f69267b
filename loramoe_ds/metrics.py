"""Metrics sinks on rank 0: stdout (via the progress bar), CSV and TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path


class MetricsLogger:
    """Append-only CSV + TensorBoard writer; a no-op on ranks other than 0.

    The CSV is opened in append mode so a resumed run continues the same file;
    each row carries the optimizer step, so repeated or lost steps are visible.

    Args:
        out_dir: Run output directory (``metrics.csv`` and ``tb/`` go there).
        enabled: False on non-zero ranks.
    """

    FIELDS = (
        "step",
        "loss",
        "lm_loss",
        "lbc",
        "lb",
        "z",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "elapsed_s",
    )

    def __init__(self, out_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self._csv = self._writer = self._tb = None
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.csv"
        new = not path.exists()
        self._csv = open(path, "a", newline="")  # noqa: SIM115 - closed in close()
        self._writer = csv.DictWriter(self._csv, fieldnames=self.FIELDS, extrasaction="ignore")
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
