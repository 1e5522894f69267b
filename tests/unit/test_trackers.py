"""``output.report_to``: every tracker reports the step-metric schema and the run config.

Each backend is read back with its own reader and compared with the CSV of the same
run: TensorBoard's event files (``EventAccumulator``), wandb in offline mode (its
``.wandb`` transaction log through ``wandb leet inspect --json``), mlflow against a
local file store (``MlflowClient``). A continued run continues the same tracked run.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launching import free_port, launch_ranks

from loramoe_ds.config import REPORT_TO, RunConfig, load_run_config
from loramoe_ds.train_loop.logger import MetricsLogger
from loramoe_ds.train_loop.step_metrics import csv_fields
from loramoe_ds.train_loop.trackers import RUN_IDS_FILE, TRACKERS, flatten

ROOT = Path(__file__).resolve().parents[2]
FIELDS = csv_fields()
CONFIG = load_run_config(None, ["train.lr=3e-4", "adapter.num_experts=2,4,6,8"]).to_dict()


def _row(step: int) -> dict[str, float]:
    """A row in the step-metric schema with values that differ per step and column."""
    return {name: round(step + i / 8, 6) for i, name in enumerate(FIELDS[1:])}


def _log(out: Path, report_to: list[str], steps, end="finished", **kw) -> None:
    log = MetricsLogger(out, fields=FIELDS, report_to=report_to, config=CONFIG, **kw)
    for s in steps:
        log.log(s, _row(s))
    log.close(end)


def _csv(out: Path) -> dict[int, dict[str, float]]:
    with open(out / "metrics.csv") as f:
        return {int(r["step"]): {k: float(v) for k, v in r.items() if k != "step"}
                for r in csv.DictReader(f)}  # fmt: skip


def _same_rows(got: dict, want: dict) -> None:
    """Equal steps, metric names and values (float32 in TensorBoard: rel 1e-6)."""
    assert sorted(got) == sorted(want)
    for step, row in want.items():
        assert got[step] == pytest.approx(row, rel=1e-6), step


def _as_tags(rows: dict[int, dict[str, float]]) -> dict[int, dict[str, float]]:
    return {s: {f"train/{k}": v for k, v in r.items()} for s, r in rows.items()}


# --------------------------------------------------------------------- config
def test_report_to_choices_and_default():
    assert tuple(TRACKERS) == REPORT_TO  # one tracker per choice, in the config's order
    assert RunConfig().output.report_to == ["csv", "tensorboard"]
    run = load_run_config(None, ["output.report_to=csv,mlflow"])
    assert run.output.report_to == ["csv", "mlflow"]
    assert load_run_config(None, ["output.report_to=[]"]).output.report_to == []
    with pytest.raises(ValueError, match=r"output.report_to='comet': valid values \['csv'"):
        load_run_config(None, ["output.report_to=[csv,comet]"])
    with pytest.raises(ValueError, match="output.report_to=.*named twice"):
        load_run_config(None, ["output.report_to=[csv,csv]"])


@pytest.mark.parametrize("name,package", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_missing_library_is_one_line_at_config_time(monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: import fails
    with pytest.raises(ValueError) as e:
        load_run_config(None, [f"output.report_to=csv,{name}"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("overrides: output.report_to=")
    assert f"{name!r} needs the {package!r} package" in msg
    assert "pip install -e '.[tracking]'" in msg


# ------------------------------------------------------------- csv, tensorboard
def test_csv_and_tensorboard_by_default(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log(tmp_path, ["csv", "tensorboard"], [1, 2, 3])
    rows = _csv(tmp_path)
    assert sorted(rows) == [1, 2, 3] and rows[2] == pytest.approx(_row(2))
    assert json.loads((tmp_path / "run_config.json").read_text()) == json.loads(json.dumps(CONFIG))
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    got = {}
    for t in acc.Tags()["scalars"]:
        for ev in acc.Scalars(t):
            got.setdefault(ev.step, {})[t] = ev.value
    _same_rows(got, _as_tags(rows))
    text = acc.Tensors("run_config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"lr": 0.0003' in text


def test_nothing_is_reported_off_rank_0(tmp_path):
    log = MetricsLogger(tmp_path / "out", enabled=False, report_to=["csv", "tensorboard"])
    log.log(1, _row(1))
    log.close()
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ wandb
def _wandb_records(out: Path) -> list[list[dict]]:
    """Each offline run's records, read by wandb's own reader (``wandb leet inspect``)."""
    runs = []
    for f in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        p = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(f)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr[-2000:]
        runs.append([json.loads(line) for line in p.stdout.splitlines() if line.strip()])
    return runs


def test_wandb_offline_run_matches_the_csv(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for k in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(k, raising=False)
    out = tmp_path / "run7"
    _log(out, ["csv", "wandb"], [1, 2, 3], end="preempted")
    _log(out, ["csv", "wandb"], [4, 5])  # continued in the same directory
    runs = _wandb_records(out)  # one offline directory per start, one run id
    assert len(runs) == 2
    # each start's end: preempted (marked, exit 75), then finished (exit 0)
    exits = [[r["exit"].get("exit_code", 0) for r in rs if r["type"] == "exit"] for rs in runs]
    assert exits == [[75], [0]]
    assert [any(r["type"] == "preempting" for r in rs) for rs in runs] == [True, False]
    run_id = json.loads((out / RUN_IDS_FILE).read_text())["wandb"]
    history = {}
    for records in runs:
        (run,) = [r["run"] for r in records if r["type"] == "run"]
        assert run["run_id"] == run_id and run["display_name"] == "run7"
        assert run["project"] == "loramoe-ds"
        config = {k: v for k, v in run["config"]["update"].items() if k != "_wandb"}
        assert config == json.loads(json.dumps(CONFIG))
        for r in records:
            if r["type"] == "history":
                item = r["history"]["item"]
                history[r["history"]["step"]["num"]] = {
                    k: v for k, v in item.items() if k.startswith("train/")
                }
    rows = _csv(out)
    assert sorted(rows) == [1, 2, 3, 4, 5]
    _same_rows(history, _as_tags(rows))


# ----------------------------------------------------------------------- mlflow
@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 wants an opt-in
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "issue18")
    return uri


def mlflow_runs(uri: str, experiment: str = "issue18") -> dict[str, dict[int, dict[str, float]]]:
    """``{run name: {step: {metric: value}}}`` of every run of the experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    out = {}
    for run in client.search_runs([exp.experiment_id]):
        steps: dict[int, dict[str, float]] = {}
        for key in run.data.metrics:
            for m in client.get_metric_history(run.info.run_id, key):
                steps.setdefault(m.step, {})[key] = m.value
        out[run.info.run_name] = steps
    return out


def test_mlflow_file_store_matches_the_csv(tmp_path, mlflow_store):
    from mlflow import MlflowClient

    out = tmp_path / "run8"
    _log(out, ["csv", "mlflow"], [1, 2, 3], end="preempted", run_name="first")
    run_id = json.loads((out / RUN_IDS_FILE).read_text())["mlflow"]
    assert MlflowClient(mlflow_store).get_run(run_id).info.status == "KILLED"
    _log(out, ["csv", "mlflow"], [4], run_name="ignored on resume")
    rows = _csv(out)
    runs = mlflow_runs(mlflow_store)
    assert list(runs) == ["first"]  # continued, not a second run
    assert sorted(rows) == [1, 2, 3, 4]
    _same_rows(runs["first"], _as_tags(rows))
    client = MlflowClient(mlflow_store)
    run = client.get_run(json.loads((out / RUN_IDS_FILE).read_text())["mlflow"])
    assert run.info.status == "FINISHED"
    want = {k: str(v) for k, v in flatten(json.loads(json.dumps(CONFIG))).items()}
    assert run.data.params == want and run.data.params["train.lr"] == "0.0003"
    path = client.download_artifacts(run.info.run_id, "run_config.json", str(tmp_path))
    assert json.loads(Path(path).read_text()) == json.loads(json.dumps(CONFIG))


@pytest.mark.parametrize("end,status", [("failed", "FAILED"), ("preempted", "KILLED")])
def test_mlflow_records_how_the_run_ended(tmp_path, mlflow_store, end, status):
    from mlflow import MlflowClient

    out = tmp_path / "run9"
    _log(out, ["mlflow"], [1], end=end)
    run_id = json.loads((out / RUN_IDS_FILE).read_text())["mlflow"]
    assert MlflowClient(mlflow_store).get_run(run_id).info.status == status


def test_an_unknown_run_end_is_refused(tmp_path):
    log = MetricsLogger(tmp_path, fields=FIELDS, report_to=["csv"], config=CONFIG)
    with pytest.raises(
        ValueError, match=r"end='crashed': valid \['finished', 'preempted', 'failed'\]"
    ):
        log.close("crashed")
    log.close()


_VERDICT = """
import os, sys, torch.distributed as dist
from loramoe_ds.config import load_run_config
from loramoe_ds.plan import Plan
from loramoe_ds.run import start_metrics
from loramoe_ds.train_loop.trackers import TrackerStartError
dist.init_process_group("gloo")
run = load_run_config(None, ["output.dir=" + sys.argv[1], "output.report_to=[csv,mlflow]"])
try:
    start_metrics(Plan(run, {}, 2, dist.get_rank(), 1, [1], None, None))
except TrackerStartError as e:
    print("raised:", e)
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_a_tracker_rank_0_cannot_start_stops_every_rank(tmp_path):
    """2 gloo ranks: rank 0's mlflow refuses its store; both ranks raise the same line."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2", "PYTHONPATH": str(ROOT),
           "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}"}  # fmt: skip
    env.pop("MLFLOW_ALLOW_FILE_STORE", None)
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", _VERDICT, str(out)]
    results = launch_ranks(
        [cmd, cmd], [{**env, "RANK": str(r)} for r in (0, 1)], timeout=240, cwd=ROOT
    )
    for code, text in results:
        assert code == 0, text[-3000:]
        (line,) = [x for x in text.splitlines() if x.startswith("raised:")]
        assert "output.report_to=['csv', 'mlflow']: rank 0 could not start tracking: " in line
        assert "MlflowException" in line and "MLFLOW_ALLOW_FILE_STORE" in line
    assert not (out / RUN_IDS_FILE).exists()
