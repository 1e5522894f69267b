"""bench/gpu_first_contact.sh without a GPU: its syntax, its plan (``--dry-run``), and
that every training command it would run is a valid run (the launcher's own dry run).

Whether the steps pass on a GPU is what the script's report says (docs/gpu.md).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_first_contact.sh"


def _plan(gpus: int) -> dict[str, str]:
    out = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--gpus", str(gpus), "--python", sys.executable],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout  # fmt: skip
    steps = {}
    for line in out.splitlines()[1:]:
        name, rest = line.split(None, 1)
        steps[name] = rest.split("needs", 1)[1].split(None, 1)[1].strip()
    return steps


def test_script_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_plan_one_and_eight_gpus():
    one, eight = _plan(1), _plan(8)
    assert list(one) == ["env", "pytest_gpu", "tiny_1gpu", "smollm2_1gpu", "bench_step",
                         "bench_layer"]  # fmt: skip
    assert {"tiny_8gpu", "tiny_8gpu_ep2", "smollm2_8gpu_ep2"} <= set(eight)
    assert "-m pytest -m gpu tests/gpu" in one["pytest_gpu"]
    assert "bench/step.py --device cuda --dtype bf16" in one["bench_step"]
    assert "bench/layer.py --device cuda" in one["bench_layer"]
    for name in ("tiny_1gpu", "smollm2_1gpu"):
        assert "--nproc_per_node 1 " in one[name] and "train.precision=bf16" in one[name]
        assert "ds_configs/zero3.json" in one[name]
    assert "--nproc_per_node 8 " in eight["tiny_8gpu_ep2"]
    assert "parallel.ep_size=2" in eight["tiny_8gpu_ep2"]


@pytest.mark.parametrize("name,world", [("tiny_2gpu_ep2", 2), ("smollm2_2gpu_ep2", 2)])
def test_training_commands_are_valid_runs(name, world):
    cmd = shlex.split(_plan(world)[name])
    args = cmd[cmd.index("launcher/train.py") + 1 :]
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    res = subprocess.run(
        [sys.executable, "launcher/train.py", *args, "--dry-run", "--world-size", str(world)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ZeRO stage 3; bf16" in res.stdout
