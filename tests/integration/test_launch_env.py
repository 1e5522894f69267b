"""Launch paths: env mapping (pure), then real mpirun / deepspeed / two-node / Slurm runs.

The process tests run ``tests/integration/dist_probe.py`` (gloo, CPU) under each
launcher and read back one JSON per rank. The ``slurm`` ones start a private
single-node Slurm (``slurm_cluster`` fixture); they skip when Slurm is not
installed unless ``LORAMOE_REQUIRE_SLURM`` is set, in which case they fail.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import free_port, launch_ranks

from loramoe_ds.launch import (
    REQUEUE_EXIT_CODE,
    DistEnv,
    PreemptionHandler,
    apply_dist_env,
    resolve_dist_env,
    setup_dist_env,
)
from loramoe_ds.launch.dist_env import (
    _first_host_python,
    first_slurm_host,
    parse_tasks_per_node,
    slurm_default_port,
)

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "tests" / "integration" / "dist_probe.py"
BIN = Path(sys.executable).parent
# The first DeepSpeed init JIT-compiles its shm comm op (~90 s here); later runs are fast.
PROC_TIMEOUT = 400

# ---------------------------------------------------------------------------------------
# resolve_dist_env on pure dicts


def _slurm_step(**over: str) -> dict[str, str]:
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "5",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_NNODES": "2",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_STEP_NODELIST": "gpu[007-008]",
        "SLURM_JOB_NODELIST": "gpu[007-008]",
    }
    env.update(over)
    return env


def test_torchrun_env():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "GROUP_WORLD_SIZE": "2",
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "29400",
        "TORCHELASTIC_RUN_ID": "x",
    }
    assert resolve_dist_env(env) == DistEnv(3, 4, 1, 2, 1, 2, "node0", 29400, "torchrun")


def test_deepspeed_env():
    env = {
        "RANK": "2",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "0",
        "LOCAL_SIZE": "2",
        "CROSS_RANK": "1",
        "CROSS_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }
    assert resolve_dist_env(env) == DistEnv(2, 4, 0, 2, 1, 2, "10.0.0.1", 29500, "deepspeed")


def test_bare_env_defaults_single_node():
    got = resolve_dist_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (got.local_world_size, got.node_rank, got.num_nodes) == (2, 0, 1)
    assert (got.master_addr, got.master_port) == ("127.0.0.1", 29500)


def test_slurm_env_multi_node():
    got = resolve_dist_env(_slurm_step())
    assert got == DistEnv(5, 8, 1, 4, 1, 2, "gpu007", slurm_default_port(4242), "slurm")
    assert got.master_port == 10000 + 4242


def test_slurm_explicit_master_wins_and_uneven_nodes():
    env = _slurm_step(
        SLURM_PROCID="6",
        SLURM_LOCALID="0",
        SLURM_STEP_NUM_TASKS="7",
        SLURM_STEP_TASKS_PER_NODE="3(x2),1",
        SLURM_NODEID="2",
        SLURM_STEP_NUM_NODES="3",
        MASTER_ADDR="head",
        MASTER_PORT="1234",
    )
    got = resolve_dist_env(env)
    assert (got.local_world_size, got.node_rank, got.num_nodes) == (1, 2, 3)
    assert (got.master_addr, got.master_port) == ("head", 1234)


def test_slurm_batch_shell_is_not_a_rank():
    # The batch script has SLURM_PROCID=0 and SLURM_NTASKS=N but no step: a plain
    # `python x.py` there is one process, not rank 0 of N waiting forever.
    env = {k: v for k, v in _slurm_step(SLURM_PROCID="0").items() if "STEP" not in k}
    assert resolve_dist_env(env).launcher == "single"


def test_launcher_inside_srun_task_wins():
    # `srun --ntasks-per-node=1 deepspeed ...`: the per-node launcher's ranks win.
    env = _slurm_step(SLURM_PROCID="1", SLURM_LOCALID="0")
    env.update(
        RANK="9", WORLD_SIZE="16", LOCAL_RANK="1", LOCAL_SIZE="8", CROSS_RANK="1",
        CROSS_SIZE="2", MASTER_ADDR="gpu007", MASTER_PORT="29500",
    )  # fmt: skip
    got = resolve_dist_env(env)
    assert (got.launcher, got.rank, got.world_size, got.node_rank) == ("deepspeed", 9, 16, 1)


def test_openmpi_env():
    env = {
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    }
    assert resolve_dist_env(env) == DistEnv(1, 2, 1, 2, 0, 1, "127.0.0.1", 29500, "mpi")


def test_openmpi_multi_node_with_exported_master():
    env = {
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        "MASTER_ADDR": "n0",
        "MASTER_PORT": "2000",
    }
    assert resolve_dist_env(env) == DistEnv(5, 8, 1, 4, 1, 2, "n0", 2000, "mpi")


def test_pmi_env():
    env = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}
    got = resolve_dist_env({**env, "MASTER_ADDR": "h"})
    assert (got.launcher, got.rank, got.node_rank, got.num_nodes) == ("mpi", 2, 1, 2)


def test_single_process():
    got = resolve_dist_env({})
    assert (got.launcher, got.rank, got.world_size, got.master_addr) == (
        "single",
        0,
        1,
        "127.0.0.1",
    )
    assert 0 < got.master_port < 65536 and not got.is_distributed and got.is_main


@pytest.mark.parametrize(
    "env",
    [
        {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "1"},
        _slurm_step(),
        {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"},
        {"MASTER_PORT": "2345"},
    ],
)
def test_apply_then_resolve_round_trips(env):
    first = resolve_dist_env(env)
    exported = dict(env)
    apply_dist_env(first, exported)
    assert resolve_dist_env(exported) == first
    assert exported["RANK"] == str(first.rank) and exported["MASTER_PORT"] == str(first.master_port)
    target = dict(env)
    assert setup_dist_env(target) == first and target["LOCAL_SIZE"] == str(first.local_world_size)


@pytest.mark.parametrize(
    ("env", "pattern"),
    [
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, r"rank=2 .*world_size=2"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, r"LOCAL_RANK is missing"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, r"RANK='x' is not an integer"),
        (
            {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"},
            r"MASTER_ADDR must be set",
        ),
        (
            {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
            r"local_rank=2.*LOCAL_WORLD_SIZE",
        ),
        (_slurm_step(SLURM_PROCID="8"), r"rank=8 .*SLURM_PROCID/SLURM_STEP_NUM_TASKS"),
        (_slurm_step(SLURM_STEP_TASKS_PER_NODE="4"), r"SLURM_STEP_TASKS_PER_NODE='4' lists 1"),
        (_slurm_step(SLURM_NODEID="2"), r"SLURM_NODEID=2"),
        ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "2"}, r"OMPI_COMM_WORLD"),
        ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": "0"}, "port"),
    ],
)
def test_inconsistent_env_raises(env, pattern):
    with pytest.raises(ValueError, match=pattern):
        resolve_dist_env(env)


def test_tasks_per_node_and_nodelist_parsing():
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("8") == [8]
    with pytest.raises(ValueError):
        parse_tasks_per_node("2x3")
    assert _first_host_python("node[003-005,9],gpu1") == "node003"
    assert _first_host_python("rack[2-3]-n[01-04]") == "rack2-n01"
    assert _first_host_python("login1,login2") == "login1"
    assert first_slurm_host("gpu[007-008]") == "gpu007"  # scontrol or the fallback


# ---------------------------------------------------------------------------------------
# PreemptionHandler in one process


def test_preemption_handler_sets_flag_only_and_restores():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as handler:
        assert not handler.should_stop() and not handler.any_rank_should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not handler.should_stop() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert handler.should_stop() and handler.received == signal.SIGUSR1
        assert not handler.poll(step=3, every=2) and handler.poll(step=4, every=2)
        with pytest.raises(ValueError, match="every=0"):
            handler.poll(step=4, every=0)
    assert signal.getsignal(signal.SIGUSR1) == before


def test_requeue_exit_code_matches_sbatch_script():
    text = (REPO / "slurm" / "train.sbatch").read_text()
    assert f"REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}\n" in text
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text
    assert "#SBATCH --open-mode=append" in text


# ---------------------------------------------------------------------------------------
# submit.sh argument handling (no Slurm needed)


def _submit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "slurm" / "submit.sh"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=30,
    )


def test_submit_dry_run_layout():
    res = _submit(
        "--nodes", "2", "--gpus-per-node", "8", "--time", "24:00:00",
        "--config", "pyproject.toml", "--partition", "gpu", "--dry-run", "--", "--lr", "1e-4",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    for flag in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=24:00:00"):
        assert flag in res.stdout
    assert "--partition=gpu" in res.stdout and res.stdout.rstrip().endswith("--lr 1e-4")

    cpu = _submit(
        "--nodes", "1", "--gpus-per-node", "2", "--time", "00:10:00",
        "--config", "pyproject.toml", "--cpu", "--dry-run",
    )  # fmt: skip
    assert cpu.returncode == 0, cpu.stderr
    assert "--ntasks-per-node=2" in cpu.stdout and "--gpus-per-node" not in cpu.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "0", "--gpus-per-node", "1", "--time", "1:00:00"], "--nodes"),
        (["--nodes", "1", "--gpus-per-node", "1", "--time", "60"], "--time"),
        (["--nodes", "1", "--gpus-per-node", "1", "--time", "1:00:00"], "--config"),
        (["--bogus"], "unknown argument"),
    ],
)
def test_submit_rejects_bad_arguments(args, message):
    res = _submit(*args, "--dry-run", env={"TRAIN_CMD": ""})
    assert res.returncode == 2 and message in res.stderr


# ---------------------------------------------------------------------------------------
# Real launches of dist_probe.py


def _probe_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    return env


def _run(cmd: list[str], timeout: float = PROC_TIMEOUT) -> subprocess.CompletedProcess:
    res = subprocess.run(
        cmd, cwd=REPO, env=_probe_env(), capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, f"{cmd} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr}"
    return res


def _results(out: Path, world: int) -> list[dict]:
    recs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for r, rec in enumerate(recs):
        assert rec["rank"] == r and rec["world_size"] == world
        assert rec["allreduce_sum"] == world * (world + 1) // 2 and rec["stop_agreed"]
    return recs


@pytest.mark.distributed
def test_mpirun_two_ranks(tmp_path):
    _run(
        [str(BIN / "mpirun"), "--allow-run-as-root", "--oversubscribe", "-np", "2",
         sys.executable, str(PROBE), "--out", str(tmp_path), "--expect-world", "2"]
    )  # fmt: skip
    recs = _results(tmp_path, 2)
    assert {r["launcher"] for r in recs} == {"mpi"}
    assert [r["local_rank"] for r in recs] == [0, 1] and recs[0]["master_addr"] == "127.0.0.1"


@pytest.mark.distributed
def test_deepspeed_launcher_two_ranks(tmp_path):
    _run(
        [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
         str(PROBE), "--out", str(tmp_path), "--expect-world", "2"]
    )  # fmt: skip
    recs = _results(tmp_path, 2)
    assert {r["launcher"] for r in recs} == {"deepspeed"}
    assert [(r["local_rank"], r["node_rank"]) for r in recs] == [(0, 0), (1, 0)]


def _two_nodes(cmd_for_node, out: Path) -> list[dict]:
    results = launch_ranks(
        [cmd_for_node(i) for i in (0, 1)], [_probe_env()] * 2, timeout=PROC_TIMEOUT, cwd=REPO
    )
    for code, log in results:
        assert code == 0, log[-3000:]
    recs = _results(out, 2)
    assert [(r["node_rank"], r["local_rank"], r["num_nodes"]) for r in recs] == [
        (0, 0, 2),
        (1, 0, 2),
    ]
    assert {r["master_addr"] for r in recs} == {"127.0.0.1"}
    return recs


@pytest.mark.distributed
def test_two_nodes_deepspeed_hostfile_no_ssh(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    port = str(free_port())
    out = tmp_path / "out"
    recs = _two_nodes(
        lambda i: [
            str(BIN / "deepspeed"),
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--node_rank",
            str(i),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            str(PROBE),
            "--out",
            str(out),
            "--expect-nodes",
            "2",
        ],  # fmt: skip
        out,
    )
    assert {r["launcher"] for r in recs} == {"deepspeed"}


@pytest.mark.distributed
def test_two_nodes_torchrun(tmp_path):
    port = str(free_port())
    recs = _two_nodes(
        lambda i: [
            str(BIN / "torchrun"),
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--node-rank",
            str(i),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            port,
            str(PROBE),
            "--out",
            str(tmp_path),
            "--expect-nodes",
            "2",
        ],  # fmt: skip
        tmp_path,
    )
    assert {r["launcher"] for r in recs} == {"torchrun"}


# ---------------------------------------------------------------------------------------
# Real Slurm (local single-node cluster)


def _slurm_job_env(cluster, tmp_path: Path, train_cmd: str) -> dict[str, str]:
    env = {k: v for k, v in _probe_env().items() if not k.startswith("SLURM_")}
    env.update(SLURM_CONF=cluster.env["SLURM_CONF"], LOG_DIR=str(tmp_path), TRAIN_CMD=train_cmd)
    return env


def _submit_job(cluster, env: dict[str, str], ranks: int = 2) -> int:
    res = subprocess.run(
        ["bash", str(REPO / "slurm" / "submit.sh"), "--nodes", "1", "--gpus-per-node",
         str(ranks), "--cpu", "--time", "00:10:00", "--job-name", "probe"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return int(res.stdout.strip())


def _job_log(tmp_path: Path, job_id: int) -> str:
    path = tmp_path / f"probe-{job_id}.out"
    return path.read_text() if path.exists() else "<no job log>"


@pytest.mark.slurm
def test_srun_maps_slurm_env(slurm_cluster, tmp_path):
    # No sbatch script: MASTER_ADDR/PORT must come from dist_env's own Slurm mapping.
    env = _slurm_job_env(slurm_cluster, tmp_path, "")
    res = subprocess.run(
        ["srun", "-N1", "-n2", "--kill-on-bad-exit=1", sys.executable, str(PROBE),
         "--out", str(tmp_path), "--expect-world", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=PROC_TIMEOUT,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    recs = _results(tmp_path, 2)
    assert {r["launcher"] for r in recs} == {"slurm"}
    job_id = int(recs[0]["slurm_job_id"])
    assert recs[0]["master_port"] == slurm_default_port(job_id)
    assert recs[0]["master_addr"] == "localhost"  # first host of SLURM_STEP_NODELIST


@pytest.mark.slurm
def test_sbatch_two_tasks(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    cmd = f"{sys.executable} {PROBE} --out {out} --expect-world 2"
    job_id = _submit_job(slurm_cluster, _slurm_job_env(slurm_cluster, tmp_path, cmd))
    info = slurm_cluster.wait_done(job_id, timeout=PROC_TIMEOUT)
    log = _job_log(tmp_path, job_id)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    recs = _results(out, 2)
    assert {r["launcher"] for r in recs} == {"slurm"}
    assert {r["slurm_job_id"] for r in recs} == {str(job_id)}
    assert recs[0]["master_port"] == slurm_default_port(job_id)
    assert "dist_probe: ok world=2" in log


@pytest.mark.slurm
def test_sbatch_preemption_requeues_and_resumes(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    steps = 16
    cmd = f"{sys.executable} {PROBE} --out {out} --expect-world 2 --steps {steps} --sleep 0.5"
    job_id = _submit_job(slurm_cluster, _slurm_job_env(slurm_cluster, tmp_path, cmd))
    steps_log = out / "steps.log"
    deadline = time.monotonic() + PROC_TIMEOUT
    while not (steps_log.exists() and len(steps_log.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline, _job_log(tmp_path, job_id)
        info = slurm_cluster.job_info(job_id)
        assert info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), info
        time.sleep(0.2)
    # What `#SBATCH --signal=B:USR1@...` does before the time limit: USR1 to the batch shell.
    subprocess.run(
        ["scancel", "--signal=USR1", "--batch", str(job_id)], env=slurm_cluster.env, check=True
    )
    info = slurm_cluster.wait_requeued_done(job_id, timeout=PROC_TIMEOUT)
    log = _job_log(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "USR1 received" in log and "requeueing job" in log

    # Rank 0 logged "<step> <restart>": a prefix in run 0, the rest after resuming.
    rows = [tuple(map(int, line.split())) for line in steps_log.read_text().splitlines()]
    assert [s for s, _ in rows] == list(range(steps)), rows
    first_run = [s for s, r in rows if r == 0]
    assert 3 <= len(first_run) < steps and {r for _, r in rows} == {0, 1}
    preempted = (out / "preempted.log").read_text()
    assert re.search(rf"step={first_run[-1]} restart=0 signal=(10|Signals.SIGUSR1)", preempted)
    recs = _results(out, 2)  # written by the resumed (second) run
    assert {r["restart_count"] for r in recs} == {1}


# ---------------------------------------------------------------------------------------
# ds_configs/*.json: "auto" for what the run config owns, no optimizer/scheduler (the trainer
# passes one); filled in from the run config, the dict real DeepSpeed trains with


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name,overrides",
    [
        ("zero3_cpu", ["train.micro_batch_size=8", "train.grad_accum=2"]),
        pytest.param("zero2", ["parallel.zero_stage=2", "train.precision=bf16"],
                     marks=pytest.mark.slow),
        pytest.param("zero3", ["train.precision=bf16", "train.grad_accum=4"],
                     marks=pytest.mark.slow),
        pytest.param("zero3_offload", ["train.precision=bf16"], marks=pytest.mark.slow),
    ],
)  # fmt: skip
def test_ds_config_trains_two_cpu_ranks(tmp_path, name, overrides):
    # Client torch AdamW, gloo, no op compile (offload: zero_force_ds_cpu_optimizer=false).
    from loramoe_ds.config import load_run_config

    config = str(REPO / "ds_configs" / f"{name}.json")
    _run(
        [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
         str(PROBE), "--out", str(tmp_path), "--ds-config", config, "--ds-set", *overrides]
    )  # fmt: skip
    recs = _results(tmp_path, 2)
    losses = recs[0]["ds_config_losses"]
    assert len(losses) >= 2 and all(x == x and x < 10 for x in losses)  # finite, sane
    t, stage = load_run_config(None, overrides).train, int(name[4])
    assert recs[0]["ds_engine"] == {
        "micro_batch": t.micro_batch_size,
        "grad_accum": t.grad_accum,
        "train_batch": t.micro_batch_size * t.grad_accum * 2,
        "bf16": t.precision == "bf16",
        "zero_stage": stage,
    }


def test_slurm_skip_only_without_require_flag(monkeypatch):
    import slurm_cluster

    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda name: None)
    monkeypatch.setattr(slurm_cluster, "_sbin", lambda name: None)
    assert "slurmctld" in slurm_cluster.slurm_missing_reason()
    monkeypatch.delenv("LORAMOE_REQUIRE_SLURM", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install"):
        slurm_cluster.require_slurm()
    monkeypatch.setenv("LORAMOE_REQUIRE_SLURM", "1")
    with pytest.raises(pytest.fail.Exception, match="LORAMOE_REQUIRE_SLURM is set"):
        slurm_cluster.require_slurm()
