"""Resume and crash safety of expert-parallel checkpoints (2 ranks, gloo, CPU).

Runs (ZeRO-3, ep_size=2, top-k, GAS 2, joint clipping, WarmupLR, dropout on):
A trains 4 steps uninterrupted and saves at step 2; C resumes from A's step-2
checkpoint and is SIGKILLed while saving step 3 (after every file is written to
the temporary directory, before the rename); D resumes from the same directory
-- which must still load step 2 -- and must reproduce A's losses and final
adapter exactly (same topology: the RNG streams of dropout are restored too).
Resuming on other topologies: tests/distributed/test_reshard.py.
"""

from __future__ import annotations

import signal
import time

import _common as C
import pytest
import torch

from loramoe_ds.model.adapter_io import load_adapter
from loramoe_ds.parallel.checkpoint import META, OPTIMIZER, TRAINER_STATE, latest_tag

pytestmark = pytest.mark.distributed
BASE = dict(router="topk", ep=2, stage=3, gas=2, clip=0.5, steps=4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    ckpt = root / "ckpt"
    a = C.launch(2, "train", dict(BASE, ckpt=str(ckpt), save_at=[2]), root / "A")
    snapshot = sorted(p.name for p in ckpt.iterdir())
    # C: resume, then hang inside the save of step 3 and get killed.
    marker = root / "in_save"
    args = dict(BASE, ckpt=str(ckpt), resume=True, save_at=[3], hang_at=3, marker=str(marker))
    procs = C.launch(2, "train", args, root / "C", wait=False)
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline:
        assert all(p.poll() is None for p in procs), "crash run exited early"
        time.sleep(0.2)
    assert marker.exists(), "crash run never reached the save"
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    after_kill = sorted(p.name for p in ckpt.iterdir())
    d = C.launch(2, "train", dict(BASE, ckpt=str(ckpt), resume=True, save_at=[4]), root / "D")
    return dict(a=a, d=d, ckpt=ckpt, snapshot=snapshot, after_kill=after_kill)


def test_checkpoint_layout(runs):
    """One full, unsharded state per tag; its adapter pair loads without DeepSpeed."""
    ckpt = runs["ckpt"]
    assert "latest" in runs["snapshot"] and "global_step2" in runs["snapshot"]
    tag = ckpt / "global_step2"
    assert sorted(p.name for p in tag.iterdir()) == sorted(
        ["adapter_model.safetensors", "adapter_config.json", OPTIMIZER, TRAINER_STATE, META]
    )
    model = load_adapter(C.model_factory(), tag)
    # top-k allocation [4, 8] over 4 target linears per layer: every expert of every linear
    assert [m.experts.lora_A.shape[0] for m in model.moe_layers()] == [4] * 4 + [8] * 4
    opt = torch.load(tag / OPTIMIZER, weights_only=True)
    names = dict(model.adapter_named_parameters())
    assert set(opt["exp_avg"]) == set(names) == set(opt["exp_avg_sq"])
    for n, p in names.items():
        assert opt["exp_avg"][n].shape == p.shape
        assert opt["step"][n] == 2
        if n.endswith("router.weight"):  # every router was trained (an expert may get no token)
            assert opt["exp_avg_sq"][n].abs().sum() > 0, n


def test_killed_save_leaves_previous_checkpoint(runs):
    """SIGKILL mid-save: ``latest`` still names step 2, the staged step 3 is not visible."""
    after = runs["after_kill"]
    assert "global_step3" not in after
    assert any(n.startswith(".global_step3.tmp-") for n in after)
    assert (runs["ckpt"] / "global_step4").is_dir()  # D saved after resuming
    assert latest_tag(runs["ckpt"]) == "global_step4"
    assert not any(p.name.startswith(".") for p in runs["ckpt"].iterdir())
    for r in range(2):
        assert runs["d"][r]["start"] == 2


def test_resume_reproduces_uninterrupted_run(runs):
    """Losses after resuming (model, both optimizers, LR schedule, RNG, data position)."""
    for r in range(2):
        a, d = runs["a"][r], runs["d"][r]
        keys = sorted(d["losses"])
        assert keys == [(s, m) for s in (2, 3) for m in range(2)]
        got = torch.tensor([d["losses"][k] for k in keys])
        want = torch.tensor([a["losses"][k] for k in keys])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert a["global_step"] == d["global_step"] == 4
        for n, p in a["final"].items():
            torch.testing.assert_close(d["final"][n], p, rtol=1e-6, atol=1e-7)
