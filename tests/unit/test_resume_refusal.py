"""A checkpoint the run cannot continue is refused in ``make_plan``, naming both topologies.

The checkpoint's ``loramoe_meta.json`` is all the check reads: here it is the
meta a 2-rank, ep_size 2 run of configs/tiny.yaml writes (the fields of
``checkpoint.save_checkpoint``), so no process group or model is needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from loramoe_ds.config import load_run_config
from loramoe_ds.parallel.checkpoint import (
    CHECKPOINT_FORMAT,
    MANIFEST,
    META,
    base_identity,
    check_compatible,
    file_manifest,
)
from loramoe_ds.plan import make_plan

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tiny.yaml")
SAVED = "(saved at world size 2, ep_size 2)"
DOC = (ROOT / "docs" / "troubleshooting.md").read_text()


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """``<tmp>/checkpoints`` holding the meta of step 4 of a 2-rank, ep_size 2 run."""
    run = load_run_config(CONFIG, [f"output.dir={tmp_path}"])
    plan = make_plan(run, {}, 2, 0)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "world_size": 2,
        "ep_size": 2,
        "experts_per_layer": plan.experts_per_layer,
        "adapter": run.adapter.to_dict(),
        "base": base_identity(plan.hf_config),
        "train_batch_size": plan.ds_config["train_batch_size"],
    }
    root = tmp_path / "checkpoints"
    (root / "global_step4").mkdir(parents=True)
    (root / "global_step4" / "adapter_config.json").write_text("{}")
    meta[MANIFEST] = file_manifest(root / "global_step4")
    (root / "global_step4" / META).write_text(json.dumps(meta))
    (root / "latest").write_text("global_step4")
    return root


def _plan(tmp_path, world, *overrides, resume="auto"):
    run = load_run_config(CONFIG, [f"output.dir={tmp_path}", *overrides])
    return make_plan(run, {}, world, 0, resume=resume)


def test_other_world_size_and_ep_size_with_the_same_global_batch_pass(ckpt, tmp_path):
    """World 2 x micro 4 saved; 4 x 2, 1 x 4 x GAS 2, 8 x 1 (ep 4) resume (global batch 8).

    So does ep 8, which cannot split the 4-expert banks: they are replicated.
    """
    _plan(tmp_path, 4, "train.micro_batch_size=2")
    _plan(tmp_path, 1, "train.grad_accum=2", "parallel.ep_size=1")
    _plan(tmp_path, 8, "train.micro_batch_size=1", "parallel.ep_size=4")
    plan = _plan(tmp_path, 8, "train.micro_batch_size=1", "parallel.ep_size=8")
    assert set(plan.placements) == {"replicated"}
    _plan(tmp_path, 8, "train.micro_batch_size=1", resume="none")  # no check without resume


@pytest.mark.parametrize(
    "world,overrides,message",
    [
        (2, ["adapter.rank=8"], "the adapter config differs (rank saved 4 now 8)"),
        (2, ["adapter.router=topk", "adapter.top_k=2"], "the adapter config differs (router saved"),
        (2, ["model.tiny_hidden=32"], "a different base model (hidden_size saved 64 now 32"),
        (4, [], "global batch (train_batch_size) saved 8, now 16"),
    ],
)  # fmt: skip
def test_refused_before_any_process_group(ckpt, tmp_path, world, overrides, message):
    with pytest.raises(ValueError) as e:
        _plan(tmp_path, world, *overrides)
    assert SAVED in str(e.value) and message in str(e.value), str(e.value)
    phrase = message.split(": ")[-1].split(" (")[0].split(" saved")[0]
    assert phrase in DOC, f"docs/troubleshooting.md does not list: {phrase}"


def test_unknown_format_and_missing_directory(ckpt, tmp_path):
    meta = json.loads((ckpt / "global_step4" / META).read_text())
    want = f"checkpoint format 1, this version reads {CHECKPOINT_FORMAT}"
    with pytest.raises(ValueError, match=want):
        check_compatible({**meta, "format": 1}, meta, "x")
    with pytest.raises(ValueError, match="no such checkpoint directory"):
        _plan(tmp_path, 2, resume=str(tmp_path / "nope"))


def test_launcher_dry_run_reports_the_refusal(ckpt, tmp_path, capsys, monkeypatch):
    """``--dry-run --world-size 8`` checks the resume too: one error line, exit 2."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    spec = importlib.util.spec_from_file_location("train_launcher", ROOT / "launcher" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    saved = dict(os.environ)
    try:
        code = mod.main(["--config", CONFIG, "--dry-run", "--world-size", "8",
                         f"output.dir={tmp_path}", "train.micro_batch_size=1",
                         "parallel.ep_size=8", "adapter.rank=8"])  # fmt: skip
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert code == 2
    err = capsys.readouterr().err
    assert "error: cannot resume" in err and SAVED in err and "ep_size 8" in err
