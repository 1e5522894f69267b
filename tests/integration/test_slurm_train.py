"""launcher/train.py under a real local Slurm: sbatch runs, preemption requeues and resumes.

Uses the private single-node Slurm of ``slurm_cluster.py`` (started and torn down
by the fixture). The job is the tiny 2-rank ZeRO-3 / ep_size 2 run on the demo data.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 400


def _env(cluster, tmp_path: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRAIN_CMD"):
        env.pop(k, None)
    env.update(
        SLURM_CONF=cluster.env["SLURM_CONF"],
        LOG_DIR=str(tmp_path),
        LORAMOE_VENV=str(Path(sys.executable).parent.parent),
        HF_HUB_OFFLINE="1",
    )
    return env


def _submit(cluster, tmp_path: Path, out: Path, overrides: list[str]) -> int:
    res = subprocess.run(
        ["bash", str(REPO / "slurm" / "submit.sh"), "--nodes", "1", "--gpus-per-node", "2",
         "--cpu", "--time", "00:10:00", "--job-name", "train", "--config",
         str(REPO / "configs" / "tiny.yaml"), "--", "--deepspeed",
         str(REPO / "ds_configs" / "zero3_cpu.json"), f"output.dir={out}", *overrides],
        cwd=REPO, env=_env(cluster, tmp_path), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    return int(res.stdout.strip().split()[-1])


def _log(tmp_path: Path, job_id: int) -> str:
    p = tmp_path / f"train-{job_id}.out"
    return p.read_text() if p.exists() else "<no job log>"


def _steps(out: Path) -> list[int]:
    with open(out / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


@pytest.mark.slurm
def test_sbatch_trains_and_checkpoints(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    job = _submit(slurm_cluster, tmp_path, out, ["train.max_steps=4", "output.save_every=2"])
    info = slurm_cluster.wait_done(job, timeout=TIMEOUT)
    log = _log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert _steps(out) == [1, 2, 3, 4]
    assert (out / "checkpoints" / "latest").read_text().strip() == "global_step4"
    assert (out / "checkpoints" / "global_step4" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slurm
def test_sbatch_preemption_checkpoints_requeues_resumes(slurm_cluster, tmp_path):
    """USR1 mid-run: checkpoint, exit 75, requeue, resume; every step logged exactly once."""
    out = tmp_path / "run"
    steps = 60
    job = _submit(
        slurm_cluster, tmp_path, out,
        [f"train.max_steps={steps}", "output.save_every=0", "model.tiny_hidden=128"],
    )  # fmt: skip
    metrics = out / "metrics.csv"
    deadline = time.monotonic() + TIMEOUT
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        assert time.monotonic() < deadline, _log(tmp_path, job)[-4000:]
        info = slurm_cluster.job_info(job)
        assert info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), _log(tmp_path, job)
        time.sleep(0.2)
    subprocess.run(
        ["scancel", "--signal=USR1", "--batch", str(job)], env=slurm_cluster.env, check=True
    )
    info = slurm_cluster.wait_requeued_done(job, timeout=TIMEOUT)
    log = _log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    assert "[resume] from step" in log, log[-4000:]
    resumed_at = int(log.split("[resume] from step")[1].split()[0])
    assert 3 <= resumed_at < steps
    assert _steps(out) == list(range(1, steps + 1))  # nothing lost, nothing repeated
    assert (out / "checkpoints" / "latest").read_text().strip() == f"global_step{steps}"
