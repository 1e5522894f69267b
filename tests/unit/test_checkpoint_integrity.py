"""Checkpoints prove themselves and hold only data; a failed save keeps the previous one.

No process group: ``save_checkpoint`` / ``load_checkpoint`` run on rank 0 of a
one-process "run" whose trainer is a stand-in exposing what the store reads
(the tensor gathering, a collective tested in ``tests/distributed/``, is
replaced by fixed tensors). Everything else is the real code: the staging
directory, the manifest, the verification and fallback, ``weights_only``
loading, the RNG state, the one-line errors.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from loramoe_ds.parallel.checkpoint import (
    LATEST,
    MANIFEST,
    META,
    OPTIMIZER,
    TRAINER_STATE,
    CheckpointDamagedError,
    CheckpointRefusedError,
    CheckpointSaveError,
    file_manifest,
    intact_tag,
    latest_tag,
    store,
    verify_tag,
)

TOPOLOGY = {"world_size": 1, "ep_size": 1, "experts_per_layer": [2], "adapter": {"rank": 2},
            "base": {"name": "x"}, "train_batch_size": 4}  # fmt: skip


class _Trainer:
    """What ``store`` reads from a :class:`MoETrainer` (rank 0 of one process)."""

    def __init__(self):
        self.groups = types.SimpleNamespace(rank=0, world_size=1)
        self.engine = types.SimpleNamespace(
            train_micro_batch_size_per_gpu=lambda: 4, gradient_accumulation_steps=lambda: 1
        )
        self.model = None
        self.global_step = 0
        self.loaded: dict | None = None

    def state_dict(self):
        return {"global_step": self.global_step, "lr": 1e-3, "lr_scheduler": {"last": 3}}

    def load_state_dict(self, state):
        self.loaded = state


@pytest.fixture
def trainer(monkeypatch):
    t = _Trainer()

    def params(tr):
        return {"r.weight": torch.full((2, 3), float(tr.global_step))}

    def optim(tr):
        return {"step": {"r.weight": tr.global_step}, "exp_avg": params(tr),
                "exp_avg_sq": params(tr)}  # fmt: skip

    monkeypatch.setattr(store, "full_adapter_state", params)
    monkeypatch.setattr(store, "full_optimizer_state", optim)
    monkeypatch.setattr(store, "current_topology", lambda tr: dict(TOPOLOGY))
    monkeypatch.setattr(store, "adapter_config_dict", lambda m: {"format": "loramoe_ds"})
    monkeypatch.setattr(store, "load_engine_state", lambda *a: None)
    monkeypatch.setattr(store, "load_expert_state", lambda *a: None)
    return t


def _save(trainer, root: Path, step: int) -> Path:
    trainer.global_step = step
    return store.save_checkpoint(trainer, root, {"data": {"position": step * 4}, "step": step})


def _flip(path: Path, at: int | None = None, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    for i in range(at, min(at + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file_with_size_and_sha256(trainer, tmp_path):
    tag = _save(trainer, tmp_path, 4)
    meta = json.loads((tag / META).read_text())
    names = sorted(p.name for p in tag.iterdir() if p.name != META)
    assert sorted(meta[MANIFEST]) == names and OPTIMIZER in names and TRAINER_STATE in names
    for name, rec in meta[MANIFEST].items():
        assert rec["size"] == (tag / name).stat().st_size
    import hashlib

    want = hashlib.sha256((tag / OPTIMIZER).read_bytes()).hexdigest()
    assert meta[MANIFEST][OPTIMIZER]["sha256"] == want
    assert verify_tag(tag) is None


@pytest.mark.parametrize(
    "damage",
    ["flip_weights", "flip_optimizer", "flip_state", "truncate", "meta", "missing"],
)
def test_damaged_newest_is_skipped_with_one_line_naming_the_file(trainer, tmp_path, damage):
    """The issue's case: 64 flipped bytes mid-file were resumed from silently; now skipped."""
    _save(trainer, tmp_path, 4)
    tag = _save(trainer, tmp_path, 8)
    victim = {
        "flip_weights": "adapter_model.safetensors", "flip_optimizer": OPTIMIZER,
        "flip_state": TRAINER_STATE, "truncate": OPTIMIZER, "meta": META, "missing": OPTIMIZER,
    }[damage]  # fmt: skip
    f = tag / victim
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "missing":
        f.unlink()
    elif damage == "meta":
        f.write_text(f.read_text()[:-40])
    else:
        _flip(f)
    assert latest_tag(tmp_path) == "global_step8"
    lines: list[str] = []
    assert intact_tag(tmp_path, report=lines.append) == "global_step4"
    assert len(lines) == 1 and str(f) in lines[0] and str(tmp_path / "global_step4") in lines[0]
    # the load path uses the previous checkpoint and says so once on stderr
    fresh = _Trainer()
    fresh.groups, fresh.engine = trainer.groups, trainer.engine
    client = store.load_checkpoint(fresh, tmp_path)
    assert client["step"] == 4 and fresh.loaded["global_step"] == 4


def test_sizes_only_check_sees_truncation_not_flips(trainer, tmp_path):
    """``make_plan``'s cheap check (sizes) vs the load's (checksums)."""
    tag = _save(trainer, tmp_path, 4)
    _flip(tag / OPTIMIZER)
    assert verify_tag(tag, checksums=False) is None
    assert "sha256" in verify_tag(tag)
    (tag / OPTIMIZER).write_bytes(b"x")
    assert "bytes" in verify_tag(tag, checksums=False)


def test_no_intact_checkpoint_or_a_damaged_named_one_is_refused(trainer, tmp_path):
    tag = _save(trainer, tmp_path, 4)
    _flip(tag / TRAINER_STATE)
    with pytest.raises(CheckpointDamagedError, match="no intact checkpoint .*trainer_state.pt"):
        intact_tag(tmp_path)
    with pytest.raises(CheckpointDamagedError, match="global_step4 is damaged"):
        intact_tag(tmp_path, "global_step4")


class _RunsCode:
    """A pickle that would run code on load (what a tampered checkpoint could hold)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo ran > {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("victim", [OPTIMIZER, TRAINER_STATE])
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(trainer, tmp_path, victim, how):
    """Even with a manifest the attacker kept consistent, every ``.pt`` loads as data only."""
    tag = _save(trainer, tmp_path, 4)
    marker = tmp_path / "ran.txt"
    evil = {"step": _RunsCode(marker)}
    if how == "torch.save":
        torch.save(evil, tag / victim)
    else:
        with open(tag / victim, "wb") as f:
            pickle.dump(evil, f)
    meta = json.loads((tag / META).read_text())
    meta[MANIFEST] = file_manifest(tag)  # consistent: the checksum cannot catch it
    (tag / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointRefusedError) as e:
        store.load_checkpoint(_Trainer(), tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tag / victim) in msg and "refused" in msg
    if how == "torch.save":
        assert "system" in msg  # names what it would have called
    assert not marker.exists()
    # the unsafe way would have run it (the test's pickle is real)
    if how == "torch.save":
        torch.load(tag / victim, weights_only=False)
    else:
        with open(tag / victim, "rb") as f:
            pickle.load(f)
    assert marker.read_text() == "ran\n"


def test_trainer_state_is_plain_data(trainer, tmp_path):
    """Counters, LR schedule, data position and RNG load with ``weights_only=True``."""
    tag = _save(trainer, tmp_path, 4)
    state = torch.load(tag / TRAINER_STATE, weights_only=True)
    assert state["client_state"]["data"]["position"] == 16 and state["lr_scheduler"]
    assert {"python", "numpy", "torch"} <= set(state["rng"][0])


def test_rng_state_round_trips(trainer, tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    state = store._rng_state()
    torch.save(state, tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(()).item())
    store._set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == want


def test_only_this_ranks_own_gpu_rng_is_saved_and_restored(monkeypatch):
    """Mocked CUDA: 8 GPUs at save, 2 at resume (the count changed) -- only the current device.

    What this cannot prove without a GPU: that ``torch.cuda.get_rng_state()`` /
    ``set_rng_state()`` act on the device ``bind_cuda_device`` made current; it
    proves the store asks for the current device's state only and never indexes
    the visible devices (the old ``get_rng_state_all`` / ``set_rng_state_all``
    broke when the count changed).
    """
    calls = []
    fake = types.SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: 8,
        get_rng_state=lambda device="cuda": calls.append(("get", device)) or torch.tensor([7]),
        set_rng_state=lambda s, device="cuda": calls.append(("set", device, int(s[0]))),
        get_rng_state_all=lambda: pytest.fail("all devices' RNG saved"),
        set_rng_state_all=lambda s: pytest.fail("all devices' RNG restored"),
    )
    monkeypatch.setattr(torch, "cuda", fake)
    state = store._rng_state()
    fake.device_count = lambda: 2
    store._set_rng_state(state)
    assert calls == [("get", "cuda"), ("set", "cuda", 7)]


def test_failed_save_keeps_the_previous_checkpoint(trainer, tmp_path, monkeypatch):
    """ENOSPC mid-save: one line, ``latest`` and the previous tag untouched, nothing staged."""
    _save(trainer, tmp_path, 4)
    before = {p.name: p.read_bytes() for p in (tmp_path / "global_step4").iterdir()}
    real = torch.save
    calls = []

    def full_disk(obj, f, *a, **k):
        calls.append(f)
        if Path(f).name == TRAINER_STATE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointSaveError) as e:
        _save(trainer, tmp_path, 8)
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and "global_step4" in msg
    assert (tmp_path / LATEST).read_text() == "global_step4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step4", LATEST]
    assert {p.name: p.read_bytes() for p in (tmp_path / "global_step4").iterdir()} == before
    assert intact_tag(tmp_path) == "global_step4"


def test_permission_denied_and_the_env_fault_hook(trainer, tmp_path, monkeypatch):
    _save(trainer, tmp_path, 4)
    monkeypatch.setenv(store.FAULT_ENV, "enospc:8")
    with pytest.raises(CheckpointSaveError, match="No space left"):
        _save(trainer, tmp_path, 8)
    _save(trainer, tmp_path, 12)  # the hook fires at its step only
    monkeypatch.delenv(store.FAULT_ENV)
    if os.geteuid() != 0:  # root writes anyway
        (tmp_path).chmod(0o500)
        try:
            with pytest.raises(CheckpointSaveError, match="Permission denied"):
                _save(trainer, tmp_path, 16)
        finally:
            (tmp_path).chmod(0o700)
    assert latest_tag(tmp_path) == "global_step12"


def test_truncate_metrics_keeps_rows_up_to_the_checkpoint(tmp_path):
    from loramoe_ds.run import truncate_metrics

    f = tmp_path / "metrics.csv"
    f.write_text("step,loss\r\n1,0.5\r\n2,0.4\r\n3,0.3\r\n4,0.2\r\n")
    assert truncate_metrics(f, 2) == 2
    assert f.read_bytes() == b"step,loss\r\n1,0.5\r\n2,0.4\r\n"
    assert truncate_metrics(f, 2) == 0 and truncate_metrics(tmp_path / "none.csv", 1) == 0


def test_a_real_full_disk(trainer, tmp_path):
    """The same on a real full file system: a 512 KiB tmpfs (needs mount rights; skipped
    without them -- the monkeypatched ENOSPC above is the test that always runs)."""
    import shutil
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()[:80]}")
    try:
        _save(trainer, disk, 4)
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - 2048))  # leave 2 KiB
        with pytest.raises(CheckpointSaveError, match="No space left on device"):
            _save(trainer, disk, 8)
        assert latest_tag(disk) == "global_step4" and intact_tag(disk) == "global_step4"
        assert not list(disk.glob(".global_step8*"))  # the staging directory was removed
    finally:
        subprocess.run(["umount", str(disk)], check=False)
