"""A real two-node Slurm job, preempted and requeued onto one node, resumes at world size 1.

Two ``slurmd`` on this machine are Slurm nodes ``n1`` and ``n2``
(``slurm_cluster.LocalSlurm(nodes=2)``). ``slurm/train.sbatch`` is submitted with
``--nodes=1-2`` and gets both: one rank per node, world size 2 (ZeRO-3, gloo; the
ranks meet on 127.0.0.1 since the node names do not resolve). After a few steps
``n2`` is drained (it will not be given out again) and the batch script gets the
preemption signal (``scancel --signal=USR1 --batch``): every rank checkpoints,
exits 75, the script requeues the job, and Slurm restarts it on ``n1`` alone. The
global batch stays 8 (``GLOBAL_BATCH``/``MICRO_BATCH``: micro 4 x GAS 1 x 2 ranks,
then micro 4 x GAS 2 x 1 rank), so the world-size-1 run continues the same
optimisation from the world-size-2 checkpoint, and ``metrics.csv`` holds every
step exactly once.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 400
STEPS = 40


def _env(cluster, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRAIN_CMD"):
        env.pop(k, None)
    env.update(
        SLURM_CONF=cluster.env["SLURM_CONF"],
        LORAMOE_VENV=str(Path(sys.executable).parent.parent),
        LORAMOE_DEVICE="cpu",
        LORAMOE_ROOT=str(REPO),
        LORAMOE_MASTER_ADDR="127.0.0.1",
        CONFIG=str(REPO / "configs" / "tiny.yaml"),
        GLOBAL_BATCH="8",
        MICRO_BATCH="4",
        HF_HUB_OFFLINE="1",
    )
    return env


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slurm
def test_two_node_job_requeued_onto_one_node_resumes(slurm_two_nodes, tmp_path):
    cluster = slurm_two_nodes
    out = tmp_path / "run"
    log_file = tmp_path / "job.out"
    job = cluster.sbatch(
        ["--nodes=1-2", "--job-name=elastic", "--time=00:10:00", f"--output={log_file}",
         str(REPO / "slurm" / "train.sbatch"), "--deepspeed",
         str(REPO / "ds_configs" / "zero3_cpu.json"),  # micro-batch and GAS "auto"
         f"output.dir={out}",
         f"train.max_steps={STEPS}", "output.save_every=0", "parallel.ep_size=1",
         "model.tiny_hidden=128"],
        env=_env(cluster, tmp_path), cwd=REPO,
    )  # fmt: skip

    def log() -> str:
        return log_file.read_text() if log_file.exists() else "<no job log>"

    info = cluster.wait_for(job, lambda i: i["JobState"] == "RUNNING", TIMEOUT, "RUNNING")
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]", info
    metrics = out / "metrics.csv"
    deadline = time.monotonic() + TIMEOUT
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        assert time.monotonic() < deadline, log()[-4000:]
        assert cluster.job_info(job)["JobState"] in ("RUNNING", "CONFIGURING"), log()[-4000:]
        time.sleep(0.2)
    cluster.scontrol("update", "NodeName=n2", "State=DRAIN", "Reason=shrink-test")
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=cluster.env, check=True)
    info = cluster.wait_requeued_done(job, timeout=TIMEOUT)
    text = log()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    assert info["NumNodes"] == "1" and info["NodeList"] == "n1", info
    first, second = text.split("requeueing job")[0], text.split("requeueing job")[1]
    assert "ranks 0..0 of 2 via slurm" in first and "ranks 1..1 of 2 via slurm" in first, first
    assert "ranks 0..0 of 1 via slurm" in second, second[-4000:]
    resumed_at = int(second.split("[resume] from step")[1].split()[0])
    assert 3 <= resumed_at < STEPS
    rows = _rows(out)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))  # each step once
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert (out / "checkpoints" / "latest").read_text().strip() == f"global_step{STEPS}"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
