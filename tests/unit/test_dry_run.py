"""``launcher/train.py --dry-run`` for a planned topology, in-process (no process group)."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def launcher():
    spec = importlib.util.spec_from_file_location("train_launcher", ROOT / "launcher" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    """A laptop: no launcher variables; whatever the launcher writes is undone afterwards."""
    saved = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT", "SLURM_PROCID", "SLURM_STEP_ID", "OMPI_COMM_WORLD_RANK",
              "PMI_RANK"):  # fmt: skip
        monkeypatch.delenv(k, raising=False)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _groups(out: str, label: str) -> list[list[int]]:
    line = next(x for x in out.splitlines() if x.strip().startswith(label))
    return eval(line.split(label, 1)[1])  # noqa: S307 - our own printed list


def test_world_size_plans_the_groups(launcher, capsys):
    """ep_size 2 of configs/tiny.yaml on 6 planned ranks: groups as the EP/EDP rule says."""
    assert launcher.main(["--config", CONFIG, "--dry-run", "--world-size", "6"]) == 0
    out = capsys.readouterr().out
    W, ep = 6, 2
    assert out.startswith(f"world size {W}: {W // ep} expert-parallel group(s) of {ep}")
    assert _groups(out, "EP groups") == [[r for r in range(W) if r // ep == g] for g in range(3)]
    assert _groups(out, "EDP groups") == [[r for r in range(W) if r % ep == j] for j in range(2)]
    assert "DP 6 = global 24" in out  # micro 4 x GAS 1 x 6
    assert "[dist]" not in out


def test_nodes_times_gpus_per_node(launcher, capsys):
    argv = ["--config", CONFIG, "--dry-run", "--nodes", "2", "--gpus-per-node", "4"]
    assert launcher.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("world size 8: 4 expert-parallel group(s) of 2")
    assert "2 node(s) x 4 GPUs; every EP group within one node" in out
    # ep_size 4 on 3 GPUs per node would put an EP group across two nodes: said so.
    argv = ["--config", CONFIG, "--dry-run", "--nodes", "4", "--gpus-per-node", "3",
            "parallel.ep_size=4"]  # fmt: skip
    assert launcher.main(argv) == 0
    assert "EP groups span nodes" in capsys.readouterr().out


def test_any_allocation_at_any_ep_size(launcher, capsys):
    """The issue's case: MoLA 2468 at ep_size 4 plans, each layer's placement printed."""
    argv = ["--config", CONFIG, "--dry-run", "--world-size", "4", "adapter.router=topk",
            "adapter.top_k=2", "adapter.num_experts=inverted_triangle", "parallel.ep_size=4",
            "train.micro_batch_size=2", "model.tiny_layers=8"]  # fmt: skip
    assert launcher.main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "expert placement (ep_size 4): layers 0-1: 2 experts replicated; layers 2-3: 4 experts "
        "sharded, 1 per EP rank; layers 4-5: 6 experts replicated; layers 6-7: 8 experts "
        "sharded, 2 per EP rank"
    ) in out
    assert "[2, 2, 1, 1, 6, 6, 2, 2]... local per EP rank" in out
    argv[argv.index("parallel.ep_size=4")] = "parallel.ep_size=2"
    assert launcher.main(argv) == 0
    assert (
        "expert placement (ep_size 2): layers 0-1: 2 experts sharded, 1 per EP rank; layers 2-3: "
        "4 experts sharded, 2 per EP rank; layers 4-5: 6 experts sharded, 3 per EP rank; layers "
        "6-7: 8 experts sharded, 4 per EP rank"
    ) in capsys.readouterr().out


def test_laptop_dry_run_without_topology_says_how(launcher, capsys):
    """The issue's case: ep_size 2 on a 1-process dry run fails, and the message says what to do."""
    assert launcher.main(["--config", CONFIG, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ep_size=2 does not divide the world size 1" in err
    assert "pass --world-size N, or --nodes N --gpus-per-node G" in err
    # Only a topology error gets the hint (this one also comes from planning).
    assert launcher.main(["--config", CONFIG, "--dry-run", "model.name=/no/such/dir"]) == 2
    err = capsys.readouterr().err
    assert "model.name='/no/such/dir'" in err and "--world-size" not in err


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--world-size", "4"], "plan a topology for --dry-run only"),
        (["--dry-run", "--nodes", "2"], "both --nodes N and --gpus-per-node G"),
        (["--dry-run", "--world-size", "0"], "--world-size 0: must be >= 1"),
        (["--dry-run", "--world-size", "6", "--nodes", "2", "--gpus-per-node", "4"],
         "--world-size 6 but --nodes 2 x --gpus-per-node 4 = 8"),
        (["--dry-run", "--world-size", "6", "--gpus-per-node", "4"], "not a multiple of"),
        (["--dry-run", "--world-size", "3"], "ep_size=2 does not divide the world size 3"),
    ],
)  # fmt: skip
def test_bad_topology_is_one_line_exit_2(launcher, capsys, argv, msg):
    assert launcher.main(["--config", CONFIG, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and msg in err


def test_adapter_larger_than_base_warns_once(launcher, capsys):
    """Warning (one line) when the adapter outgrows the base; the counts are the plan's own."""
    argv = ["--config", CONFIG, "--dry-run", "--world-size", "2", "adapter.num_experts=64"]
    assert launcher.main(argv) == 0
    cap = capsys.readouterr()
    lines = [x for x in cap.err.splitlines() if x.startswith("warning: the adapter")]
    assert len(lines) == 1
    # tiny.yaml: 4 layers, hidden d 64, FFN f 128, rank 4 on gate (d->f), up (d->f), down (f->d);
    # each expert is A (r x in) + B (out x r), each router in -> E.
    E, L, r, d, f = 64, 4, 4, 64, 128
    experts = L * E * r * ((d + f) + (d + f) + (f + d))
    routers = L * E * (d + d + f)
    assert f"the adapter has {experts + routers:,} trainable parameters" in lines[0]
    assert launcher.main(["--config", CONFIG, "--dry-run", "--world-size", "2"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "config_json,msg",
    [
        ('{"model_type": "nosuchmodel"}', "has model type `nosuchmodel`"),
        ("{bad", "is not a valid JSON file"),
        (None, "not 'smollm2', a tiny-\\* model, or a local Hugging Face model directory"),
    ],
)
def test_unreadable_model_dir_is_one_line_exit_2(launcher, capsys, tmp_path, config_json, msg):
    if config_json is not None:
        (tmp_path / "config.json").write_text(config_json)
    argv = ["--config", CONFIG, "--dry-run", "--world-size", "2", f"model.name={tmp_path}"]
    assert launcher.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: model.name={str(tmp_path)!r}") and err.count("\n") == 1
    assert re.search(msg, err)


def test_shipped_ds_config_takes_command_line_batch_and_precision(launcher, capsys, tmp_path):
    """The issue's case: a shipped JSON with ``train.micro_batch_size=8`` plans (its batch keys
    are "auto"); the dict handed to DeepSpeed holds the run config's values; a user JSON
    with an explicit micro-batch still disagrees in one line."""
    from loramoe_ds.config import load_ds_config, load_run_config
    from loramoe_ds.plan import make_plan

    ds_json = str(ROOT / "ds_configs" / "zero3.json")
    over = ["train.micro_batch_size=8", "train.grad_accum=3", "train.precision=bf16"]
    argv = ["--config", CONFIG, "--deepspeed", ds_json, "--dry-run", "--world-size", "2"]
    assert launcher.main([*argv, *over]) == 0
    assert "batch: micro 8 x grad_accum 3 x DP 2 = global 48; ZeRO stage 3; bf16" in (
        capsys.readouterr().out
    )
    plan = make_plan(load_run_config(CONFIG, over), load_ds_config(ds_json), 2, 0)
    handed = plan.ds_config  # what run.train passes to MoETrainer.build -> deepspeed
    assert handed["train_micro_batch_size_per_gpu"] == 8
    assert handed["gradient_accumulation_steps"] == 3 and handed["train_batch_size"] == 48
    assert handed["bf16"] == {"enabled": True} and "gradient_clipping" not in handed

    explicit = tmp_path / "mine.json"
    explicit.write_text('{"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}}')
    argv = ["--config", CONFIG, "--deepspeed", str(explicit), "--dry-run", "--world-size", "2"]
    assert launcher.main([*argv, *over]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "ds_config: train_micro_batch_size_per_gpu=4 but the run config gives 8" in err
