"""Where a run is reported: one tracker per ``output.report_to`` entry.

Every tracker receives the same two things: the run config once, when it starts
(:meth:`RunConfig.to_dict <loramoe_ds.config.RunConfig.to_dict>`), and one row per
logged optimizer step in the schema of
:mod:`~loramoe_ds.train_loop.step_metrics` (``{metric name: value}``, the columns
of :func:`~loramoe_ds.train_loop.step_metrics.csv_fields` after ``step``).

=============== ==================================== ==============================
tracker         the step metrics                     the run config
=============== ==================================== ==============================
``csv``         ``OUT/metrics.csv``, column ``name`` ``OUT/run_config.json``
``tensorboard`` ``OUT/tb/``, tag ``train/<name>``    text ``run_config``
``wandb``       history key ``train/<name>``         the run's config
``mlflow``      metric ``train/<name>``              params ``section.field`` and
                                                     artifact ``run_config.json``
=============== ==================================== ==============================

wandb and mlflow are configured by their own environment variables: wandb's
``WANDB_PROJECT`` (default ``loramoe-ds``), ``WANDB_MODE`` (``offline``: no
network), ``WANDB_DIR`` (default ``OUT``); mlflow's ``MLFLOW_TRACKING_URI``
(default: mlflow's own, ``sqlite:///mlflow.db`` in the working directory) and
``MLFLOW_EXPERIMENT_NAME`` (default ``loramoe-ds``).

A run continued in the same output directory continues the same tracked run:
the CSV is appended to (keeping the header it started with), TensorBoard adds an
event file, and wandb and mlflow reopen the run whose id is kept in
``OUT/tracking.json`` (mlflow's params stay those of the run's first start; the
current config is in ``run_config.json``).

A run ends in one of :data:`RUN_ENDS`, and wandb and mlflow record it: a
finished run as finished (wandb exit code 0, mlflow ``FINISHED``), a preempted
one as preempted (wandb ``mark_preempting`` and exit code 75, mlflow
``KILLED``), one that raised as failed (wandb exit code 1, mlflow ``FAILED``).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from loramoe_ds.launch.exit_codes import OK, PREEMPTED

RUN_IDS_FILE = "tracking.json"
"""Where the wandb and mlflow run ids of an output directory are kept (for resume)."""

DEFAULT_PROJECT = "loramoe-ds"
"""The wandb project and mlflow experiment when their environment variables are unset."""

RUN_ENDS = ("finished", "preempted", "failed")
"""How a run ends: all steps done, stopped to be resumed (exit 75), or raised."""

WANDB_EXIT_CODE = {"finished": OK, "preempted": PREEMPTED, "failed": 1}
"""The exit code wandb records for each :data:`RUN_ENDS` (non-zero: not finished)."""

MLFLOW_STATUS = {"finished": "FINISHED", "preempted": "KILLED", "failed": "FAILED"}
"""The mlflow run status of each :data:`RUN_ENDS`."""


class TrackerStartError(RuntimeError):
    """A tracker of ``output.report_to`` could not start (one line; every rank raises it)."""


def tag(name: str) -> str:
    """TensorBoard / wandb / mlflow name of step metric ``name``."""
    return f"train/{name}"


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if v is not None}


def _saved_run_id(out: Path, tracker: str) -> str | None:
    path = out / RUN_IDS_FILE
    return json.loads(path.read_text()).get(tracker) if path.is_file() else None


def _save_run_id(out: Path, tracker: str, run_id: str) -> None:
    path = out / RUN_IDS_FILE
    ids = json.loads(path.read_text()) if path.is_file() else {}
    ids[tracker] = run_id
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(ids, indent=1) + "\n")
    os.replace(tmp, path)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Tracker(Protocol):
    """One reporting backend, started with the run config (constructor)."""

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Report one optimizer step's row."""

    def close(self, end: str = "finished") -> None:
        """Flush and end the run; ``end`` is one of :data:`RUN_ENDS`."""


class CsvTracker:
    """``metrics.csv`` (one row per logged step, ``step`` first) and ``run_config.json``.

    The CSV is opened in append mode so a resumed run continues the same file
    with the header it was started with; each row carries the optimizer step, so
    repeated or lost steps are visible.
    """

    def __init__(self, out: Path, config: Mapping[str, Any], fields: Sequence[str], **_: Any):
        (out / "run_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        path = out / "metrics.csv"
        self.fields = tuple(fields)
        new = not path.exists() or path.stat().st_size == 0
        if not new:  # a resumed run keeps the columns the file started with
            with open(path, newline="") as f:
                header = next(csv.reader(f), None)
            if header:
                self.fields = tuple(header)
        self._file = open(path, "a", newline="")  # noqa: SIM115 - closed in close()
        self._writer = csv.DictWriter(self._file, fieldnames=self.fields, extrasaction="ignore")
        if new:
            self._writer.writeheader()

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self._writer.writerow({"step": step, **values})
        self._file.flush()

    def close(self, end: str = "finished") -> None:
        self._file.close()


class TensorBoardTracker:
    """TensorBoard event files in ``OUT/tb``: scalars ``train/<name>``, text ``run_config``."""

    def __init__(self, out: Path, config: Mapping[str, Any], **_: Any):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(out / "tb"))
        text = json.dumps(config, indent=2, default=str)
        self._writer.add_text("run_config", "\n".join("    " + line for line in text.splitlines()))

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for k, v in _numbers(values).items():
            self._writer.add_scalar(tag(k), v, step)

    def close(self, end: str = "finished") -> None:
        self._writer.close()


class WandbTracker:
    """A Weights & Biases run (``WANDB_MODE=offline`` writes it locally, for ``wandb sync``)."""

    def __init__(self, out: Path, config: Mapping[str, Any], run_name: str, **_: Any):
        import wandb

        self._run = wandb.init(
            project=None if "WANDB_PROJECT" in os.environ else DEFAULT_PROJECT,
            dir=None if "WANDB_DIR" in os.environ else str(out),
            name=run_name,
            id=_saved_run_id(out, "wandb"),  # None: wandb makes one
            resume="allow",
            config=dict(config),
        )
        _save_run_id(out, "wandb", self._run.id)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log({tag(k): v for k, v in _numbers(values).items()}, step=step)

    def close(self, end: str = "finished") -> None:
        if end == "preempted":
            self._run.mark_preempting()
        self._run.finish(exit_code=WANDB_EXIT_CODE[end])


MLFLOW_PARAMS_PER_CALL = 100
"""mlflow accepts at most 100 params per ``log_batch``."""

MLFLOW_PARAM_CHARS = 500
"""Params are cut to this many characters (the whole config is the artifact)."""


class MlflowTracker:
    """An MLflow run through :class:`mlflow.MlflowClient` (no global active run)."""

    def __init__(self, out: Path, config: Mapping[str, Any], run_name: str, **_: Any):
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        self._client = client = MlflowClient()
        run_id = _saved_run_id(out, "mlflow")
        if run_id is not None:
            try:
                client.update_run(run_id, status="RUNNING")
            except MlflowException:  # another tracking store: start a new run
                run_id = None
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
            exp = client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
            run_id = client.create_run(exp_id, run_name=run_name).info.run_id
            params = [Param(k, str(v)[:MLFLOW_PARAM_CHARS]) for k, v in flatten(config).items()]
            for i in range(0, len(params), MLFLOW_PARAMS_PER_CALL):
                client.log_batch(run_id, params=params[i : i + MLFLOW_PARAMS_PER_CALL])
            _save_run_id(out, "mlflow", run_id)
        client.log_dict(run_id, json.loads(json.dumps(config, default=str)), "run_config.json")
        self.run_id = run_id

    def log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag(k), v, now, step) for k, v in _numbers(values).items()]
        self._client.log_batch(self.run_id, metrics=metrics)

    def close(self, end: str = "finished") -> None:
        self._client.set_terminated(self.run_id, status=MLFLOW_STATUS[end])


TRACKERS: dict[str, type] = {
    "csv": CsvTracker,
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
}
"""The tracker of each :data:`~loramoe_ds.config.run.REPORT_TO` entry."""
