"""launcher/train.py end to end: launchers agree, resume == uninterrupted, errors before any group.

Every run is a real multi-process DeepSpeed job on CPU (gloo, ZeRO-3, ep_size 2)
of a tiny random Llama on the shipped demo data.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import free_port, launch_ranks

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "launcher" / "train.py")
CONFIG = str(ROOT / "configs" / "tiny.yaml")
BIN = Path(sys.executable).parent


def _env() -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE"):
        env.pop(k, None)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(ROOT),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def _overrides(out: Path, steps: int = 6) -> list[str]:
    return [f"output.dir={out}", f"train.max_steps={steps}", "output.save_every=3"]


def _run(cmd: list[str], expect: int = 0, timeout: int = 300, env=None) -> str:
    env = {k: v for k, v in {**_env(), **(env or {})}.items() if v is not None}  # None: unset
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == expect, f"exit {p.returncode} (want {expect}):\n{out[-4000:]}"
    return out


def _deepspeed(out: Path, extra=(), expect=0, steps=6, env=None) -> str:
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        TRAIN,
        "--config",
        CONFIG,
        *extra,
        *_overrides(out, steps),
    ]
    return _run(cmd, expect, env=env)


def _losses(out: Path) -> dict[int, float]:
    with open(out / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    _deepspeed(out)
    return out


@pytest.mark.distributed
def test_deepspeed_run_writes_metrics_checkpoints_adapter(reference_run):
    losses = _losses(reference_run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    ck = reference_run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "global_step6"
    assert (ck / "global_step6" / "adapter_model.safetensors").is_file()  # full, unsharded
    assert (reference_run / "adapter" / "adapter_model.safetensors").is_file()
    assert list((reference_run / "tb").iterdir())


@pytest.mark.distributed
def test_adapter_loads_without_deepspeed(reference_run):
    """The exported adapter reproduces itself on a fresh tiny base in a plain process."""
    code = f"""
import sys, json, torch
from loramoe_ds.config import load_run_config
from loramoe_ds.base_model import hf_config, from_config
from loramoe_ds import load_adapter
run = load_run_config({CONFIG!r})
cfg, _ = hf_config(run)
torch.manual_seed(run.train.seed)
base = from_config(cfg)
m = load_adapter(base, {str(reference_run / "adapter")!r})
n = sum(p.abs().sum().item() for n_, p in m.adapter_named_parameters() if "lora_B" in n_)
assert n > 0, "experts were not trained"
assert "deepspeed" not in sys.modules
print(json.dumps({{"experts": m.total_experts()}}))
"""
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["experts"] == 4 * 3 * 4


@pytest.mark.distributed
def test_stop_and_resume_equals_uninterrupted(reference_run, tmp_path, monkeypatch):
    """Preempted after 4 steps (exit 75), resumed to 6: same losses, no step lost or
    repeated; the tracked (mlflow) run is marked KILLED, then FINISHED on the same run."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this process reads the store too
    out = tmp_path / "resumed"
    store = f"file:{tmp_path / 'mlruns'}"
    env = {"MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_FILE_STORE": "true"}
    track = ["output.report_to=[csv,mlflow]"]
    log = _deepspeed(out, extra=["--stop-after", "4", *track], expect=75, env=env)
    assert "preempted" in log
    assert sorted(_losses(out)) == [1, 2, 3, 4]
    run_id = json.loads((out / "tracking.json").read_text())["mlflow"]
    assert MlflowClient(store).get_run(run_id).info.status == "KILLED"
    _deepspeed(out, extra=track, env=env)
    assert MlflowClient(store).get_run(run_id).info.status == "FINISHED"
    got, ref = _losses(out), _losses(reference_run)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step


@pytest.mark.distributed
def test_torchrun_and_mpirun_match_deepspeed(reference_run, tmp_path):
    ref = _losses(reference_run)
    out = tmp_path / "torchrun"
    _run(
        [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            TRAIN,
            "--config",
            CONFIG,
            *_overrides(out),
        ],
    )
    mpirun = shutil.which("mpirun", path=str(BIN)) or shutil.which("mpirun")
    runs = {"torchrun": _losses(out)}
    if mpirun:
        out2 = tmp_path / "mpirun"
        _run(
            [
                mpirun,
                "--allow-run-as-root",
                "--oversubscribe",
                "-np",
                "2",
                "-x",
                "MASTER_ADDR=127.0.0.1",
                "-x",
                f"MASTER_PORT={free_port()}",
                sys.executable,
                TRAIN,
                "--config",
                CONFIG,
                *_overrides(out2),
            ],
        )
        runs["mpirun"] = _losses(out2)
    else:
        pytest.fail("mpirun not found: install the 'mpi' extra (mpi4py + openmpi)")
    for name, got in runs.items():
        assert sorted(got) == sorted(ref), name
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (name, step)


@pytest.mark.distributed
def test_two_nodes_on_loopback_match_single_node(reference_run, tmp_path):
    """Two 'nodes' (torchrun --nnodes 2, node ranks 0 and 1, one rank each) meet on
    127.0.0.1 and run the same job: same losses as the single-node launch."""
    out = tmp_path / "two_nodes"
    port = str(free_port())
    cmds = [
        [
            str(BIN / "torchrun"),
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            TRAIN,
            "--config",
            CONFIG,
            *_overrides(out),
        ]  # fmt: skip
        for node in (0, 1)
    ]
    results = launch_ranks(cmds, [_env(), _env()], timeout=300, cwd=ROOT)
    logs = [log for _, log in results]
    for code, log in results:
        assert code == 0, log[-4000:]
    assert "[dist] node 0/2" in logs[0] and "[dist] node 1/2" in logs[1]
    got, ref = _losses(out), _losses(reference_run)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step


def _direct(world: int, *args: str) -> subprocess.CompletedProcess:
    """train.py in one plain process that believes it is rank 0 of ``world``.

    ``MASTER_PORT=1``: any rendezvous attempt would fail loudly, so these runs
    prove that planning and validation need no process group.
    """
    env = _env()
    env.update(
        WORLD_SIZE=str(world), RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"
    )
    return subprocess.run(
        [sys.executable, TRAIN, "--config", CONFIG, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_bad_config_fails_before_any_process_group():
    """A bad ep_size is reported in one line, exit 2, without starting DeepSpeed."""
    p = _direct(2, "parallel.ep_size=3")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "error: ep_size=3 does not divide the world size 2" in p.stderr
    p = _direct(2, "adapter.num_experts=2x")
    assert p.returncode == 2 and "invalid expert pattern '2x'" in p.stderr


def test_dry_run_prints_plan():
    p = _direct(4, "--dry-run")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "EP groups  [[0, 1], [2, 3]]" in p.stdout
    assert "EDP groups [[0, 2], [1, 3]]" in p.stdout
    assert "experts per layer [4, 4, 4, 4]" in p.stdout


def _bad_data(tmp_path: Path) -> Path:
    """Four records; line 3 has no ``output``."""
    bad = tmp_path / "train.jsonl"
    good = {"instruction": "Say hi.", "input": "", "output": "Hi.", "task_type": 0}
    lines = [good, good, {"instruction": "No answer.", "input": "", "task_type": 1}, good]
    bad.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return bad


def test_bad_record_fails_before_the_model_loads(tmp_path):
    """A bad record: one line naming file:line and field, exit 2, before model and engine.

    One process with ``MASTER_PORT=1``: building the engine (or any process group)
    first would fail on the rendezvous instead of reporting the record.
    """
    bad = _bad_data(tmp_path)
    out = tmp_path / "out"
    p = _direct(1, f"data.train_files=[{bad}]", f"output.dir={out}", "parallel.ep_size=1")
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, p.stderr[-3000:]
    assert f"{bad}:3" in errors[0] and "'output'" in errors[0], errors[0]
    assert "Traceback" not in p.stderr
    assert not (out / "metrics.csv").exists() and not (out / "checkpoints").exists()


@pytest.mark.distributed
def test_bad_record_on_two_ranks(tmp_path):
    """2 ranks: rank 0 validates, the other rank gets its verdict; both exit 2, one line each."""
    bad = _bad_data(tmp_path)
    log = _deepspeed(tmp_path / "out", extra=[f"data.train_files=[{bad}]"], expect=2)
    # (the two ranks' stderr lines may interleave, so count the message)
    assert log.count(f"error: {bad}:3: missing field 'output'") == 2, log[-3000:]
    assert "Traceback" not in log and not (tmp_path / "out" / "metrics.csv").exists()


@pytest.mark.distributed
def test_packed_checkpointed_token_mean_run(tmp_path):
    """2 ranks (EP 2, ZeRO-3), packed rows, activation checkpointing, GAS 2: it trains,
    and metrics.csv logs the step's token-mean LM loss and its padding fraction."""
    out = tmp_path / "packed"
    extra = ["data.packing=true", "train.activation_checkpointing=true", "train.grad_accum=2"]
    _deepspeed(out, extra=extra, steps=3)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for r in rows:
        assert torch.isfinite(torch.tensor(float(r["lm_loss"])))
        assert float(r["label_tokens"]) > 0 and 0 <= float(r["pad_frac"]) < 0.5
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_packed_smollm2_config_plans_for_two_ranks():
    """configs/smollm2_packed.yaml: packing, activation checkpointing, token mean; EP 2 on 2."""
    from loramoe_ds.config import load_run_config

    run = load_run_config(ROOT / "configs" / "smollm2_packed.yaml")
    assert run.data.packing and run.train.activation_checkpointing
    assert run.train.loss_reduction == "token_mean" and run.train.grad_accum > 1
    p = subprocess.run(
        [sys.executable, TRAIN, "--config", str(ROOT / "configs" / "smollm2_packed.yaml"),
         "--dry-run", "--world-size", "2"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert "EP groups  [[0, 1]]" in p.stdout and "grad_accum 2 x DP 2" in p.stdout


@pytest.mark.distributed
def test_auto_layout_is_applied_and_trains_as_the_replicated_run(tmp_path):
    """``parallel.ep_size: auto`` in a real run: the plan's per-layer choice is the one
    trained, and it learns what the all-replicated run (``ep_size`` 1) learns.

    MoLA-like ``[2, 4, 6, 8]`` top-2, rank 64, micro-batches of one record of at
    most 160 tokens, ZeRO-3 on 2 ranks: the crossover ``T* = 3 E r / (2 K)`` is 96
    tokens for the 2-expert layer (replicate it) and 192-384 for the others (shard).
    """
    layout = ["adapter.router=topk", "adapter.top_k=2", "adapter.num_experts=[2,4,6,8]",
              "adapter.rank=64", "train.micro_batch_size=1"]  # fmt: skip
    auto, rep = tmp_path / "auto", tmp_path / "replicated"
    log = _deepspeed(auto, extra=[*layout, "parallel.ep_size=auto"], steps=4)
    assert "[plan] auto layout: ep_size 2, ZeRO-3" in log, log[-3000:]
    assert (
        "[plan] expert placement (ep_size 2): layer 0: 2 experts replicated; layer 1: 4 experts "
        "sharded, 2 per EP rank; layer 2: 6 experts sharded, 3 per EP rank; layer 3: 8 "
        "experts sharded, 4 per EP rank"
    ) in log, log[-3000:]
    _deepspeed(rep, extra=[*layout, "parallel.ep_size=1"], steps=4)
    got, ref = _losses(auto), _losses(rep)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step
    from safetensors.torch import load_file

    a = load_file(auto / "adapter" / "adapter_model.safetensors")
    b = load_file(rep / "adapter" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    # Adam divides by sqrt(v): where a gradient is ~0, fp32 rounding (another reduction
    # order under EP) becomes a step of up to lr. So: tight but for a handful of
    # elements, and those within the bound 2 * lr * steps (configs/tiny.yaml: lr 5e-3).
    for k in b:
        err = (a[k] - b[k]).abs()
        assert err.max() <= 2 * 5e-3 * 4, (k, err.max())
        assert (err > 2e-5).float().mean() < 0.01, (k, int((err > 2e-5).sum()), err.numel())


@pytest.mark.distributed
def test_a_tracker_that_cannot_start_is_one_line_on_every_rank(tmp_path):
    """mlflow refuses a file store without its opt-in: exit 2 and one line per rank
    naming the setting, before the model loads; no traceback."""
    out = tmp_path / "out"
    env = {"MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": None}
    log = _deepspeed(out, extra=["output.report_to=[csv,mlflow]"], expect=2, steps=2, env=env)
    lines = [x for x in log.splitlines() if x.startswith("error: ")]
    assert len(lines) == 2, log[-3000:]
    for line in lines:
        assert "output.report_to=['csv', 'mlflow']: rank 0 could not start tracking: " in line
    assert "Traceback" not in log and not (out / "checkpoints").exists()
    assert not _losses(out)  # the CSV tracker started first: its header, no step
