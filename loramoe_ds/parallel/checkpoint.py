"""Atomic, resumable checkpoints of an expert-parallel run, and the adapter export.

Layout of ``<dir>`` (one sub-directory per tag, ``latest`` names the last good one)::

    <dir>/latest                                   # text: the tag; replaced last, atomically
    <dir>/<tag>/                                   # e.g. global_step120
        ...DeepSpeed files...                      # engine.save_checkpoint(exclude_frozen_...):
                                                   #   routers (+ replicated banks), their
                                                   #   optimizer, LR scheduler, counters
        layer_{L}_expert_{E}_mp_rank_00_model_states.pt   # EP mode: one expert's lora_A/lora_B
        expert_optim_rank_{r:05d}.pt               # EP mode: this rank's expert AdamW state
        trainer_state_rank_{r:05d}.pt              # client state, RNG (python/numpy/torch), step
        loramoe_meta.json                          # world size, ep_size, experts per layer

Naming follows DeepSpeed's MoE checkpoints: ``L`` is the running index of the
adapted linear in ``model.moe_layers()`` order (module order; *not* the decoder
layer index -- a decoder layer has several adapted linears), ``E`` is the
global expert id ``ep_rank * (E_layer/ep_size) + i``. Expert files are written
by the ranks with EDP rank 0 only (ranks ``0..ep_size-1``); optimizer and
trainer state by every rank.

Atomicity: every rank writes into ``<dir>/.staging-<tag>/state``; after a
barrier rank 0 renames it to ``<dir>/<tag>`` (an older ``<tag>`` is moved aside
first and deleted after) and only then replaces ``latest`` (write temp file,
``os.replace``), then a final barrier. A crash anywhere before the rename leaves
``latest`` and its tag untouched; stale staging directories are removed by the
next save. All ranks must see one shared file system (multi-node: a shared
mount).

Resume needs the same world size and ``ep_size`` (optimizer state is per rank).

Export: :func:`export_adapter` gathers routers (ZeRO fp32 master weights) and
all experts over EP into the unsharded names and writes the safetensors adapter
of :meth:`~loramoe_ds.model.inject.LoRAMoEModel.save_adapter`;
:func:`~loramoe_ds.model.inject.load_adapter` loads it without DeepSpeed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from loramoe_ds.io import _fsync_tree, atomic_write_text

if TYPE_CHECKING:
    from loramoe_ds.parallel.engine import MoETrainer

LATEST = "latest"
META = "loramoe_meta.json"
STAGING_PREFIX = ".staging-"
# Test hook: when set to a path, rank 0 creates that file once everything is
# written to staging and then hangs (so a test can kill the job mid-save).
HANG_IN_SAVE_ENV = "LORAMOE_TEST_HANG_IN_SAVE"


def expert_file(layer_idx: int, expert_id: int) -> str:
    """DeepSpeed MoE naming of one expert's weights."""
    return f"layer_{layer_idx}_expert_{expert_id}_mp_rank_00_model_states.pt"


def _rank_file(kind: str, rank: int) -> str:
    return f"{kind}_rank_{rank:05d}.pt"


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(trainer: MoETrainer, directory: str | Path, client_state: dict | None) -> Path:
    """Write a resumable checkpoint atomically (collective: every rank calls it).

    Args:
        trainer: The trainer.
        directory: Checkpoint root.
        client_state: Picklable per-rank state to hand back on load (data
            position, ...).

    Returns:
        ``<directory>/<tag>`` with ``tag = global_step{N}``.
    """
    root = Path(directory)
    rank = trainer.groups.rank
    tag = f"global_step{trainer.global_step}"
    staging = root / f"{STAGING_PREFIX}{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    trainer.engine.save_checkpoint(
        str(staging),
        tag="state",
        client_state={"loramoe_tag": tag},
        save_latest=False,
        exclude_frozen_parameters=True,
    )
    out = staging / "state"
    out.mkdir(parents=True, exist_ok=True)
    g = trainer.groups
    if trainer.expert_parallel and g.edp_rank == 0:
        for L, layer in enumerate(trainer.model.moe_layers()):
            d = layer.dispatcher
            for i in range(d.num_local):
                torch.save(
                    {
                        "lora_A": d.bank.lora_A[i].detach().cpu().clone(),
                        "lora_B": d.bank.lora_B[i].detach().cpu().clone(),
                        "layer": layer.name,
                        "expert": d.first_expert + i,
                    },
                    out / expert_file(L, d.first_expert + i),
                )
    if trainer.expert_optimizer is not None:
        torch.save(trainer.expert_optimizer.state_dict(), out / _rank_file("expert_optim", rank))
    torch.save(
        {
            "client_state": client_state,
            "rng": _rng_state(),
            "global_step": trainer.global_step,
        },
        out / _rank_file("trainer_state", rank),
    )
    if rank == 0:
        meta = {
            "tag": tag,
            "world_size": g.world_size,
            "ep_size": g.ep_size,
            "experts_per_layer": trainer.model.experts_per_layer,
            "global_step": trainer.global_step,
        }
        (out / META).write_text(json.dumps(meta, indent=2))
    _barrier()
    if rank == 0:
        _fsync_tree(out)
        hang = os.environ.get(HANG_IN_SAVE_ENV)
        if hang:
            Path(hang).write_text(tag)
            while True:
                time.sleep(1)
        final = root / tag
        old = None
        if final.exists():
            old = root / f".old-{tag}-{os.getpid()}"
            os.replace(final, old)
        os.replace(out, final)
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        atomic_write_text(root / LATEST, tag)
    _barrier()
    return root / tag


def latest_tag(directory: str | Path) -> str | None:
    """The tag named by ``<directory>/latest``, or ``None``."""
    f = Path(directory) / LATEST
    return f.read_text().strip() if f.is_file() else None


def load_checkpoint(trainer: MoETrainer, directory: str | Path, tag: str | None = None):
    """Restore model, optimizers, LR schedule, RNG; return this rank's client state.

    Collective. Returns ``None`` (and changes nothing) when ``directory`` has no
    ``latest`` and no ``tag`` is given.

    Raises:
        ValueError: The checkpoint is missing files or was written with another
            world size / ``ep_size`` / expert allocation.
    """
    root = Path(directory)
    tag = tag or latest_tag(root)
    if tag is None:
        return None
    ckpt = root / tag
    rank, g = trainer.groups.rank, trainer.groups
    meta_file = ckpt / META
    if not meta_file.is_file():
        raise ValueError(f"{ckpt} is not a loramoe-ds checkpoint (no {META})")
    meta = json.loads(meta_file.read_text())
    want = {
        "world_size": g.world_size,
        "ep_size": g.ep_size,
        "experts_per_layer": trainer.model.experts_per_layer,
    }
    for k, v in want.items():
        if meta[k] != v:
            raise ValueError(f"{ckpt}: saved with {k}={meta[k]}, this run has {k}={v}")
    load_path, _ = trainer.engine.load_checkpoint(
        str(root),
        tag=tag,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load {ckpt}")
    if trainer.expert_parallel:
        with torch.no_grad():
            for L, layer in enumerate(trainer.model.moe_layers()):
                d = layer.dispatcher
                for i in range(d.num_local):
                    f = ckpt / expert_file(L, d.first_expert + i)
                    if not f.is_file():
                        raise ValueError(f"{ckpt}: missing expert file {f.name}")
                    s = torch.load(f, map_location="cpu", weights_only=True)
                    d.bank.lora_A[i].copy_(s["lora_A"])
                    d.bank.lora_B[i].copy_(s["lora_B"])
        opt_state = torch.load(
            ckpt / _rank_file("expert_optim", rank), map_location="cpu", weights_only=False
        )
        trainer.expert_optimizer.load_state_dict(opt_state)
    st = torch.load(
        ckpt / _rank_file("trainer_state", rank), map_location="cpu", weights_only=False
    )
    _set_rng_state(st["rng"])
    _barrier()
    return st["client_state"]


def gather_full_adapter_state(trainer: MoETrainer) -> dict[str, torch.Tensor]:
    """All routers and experts, unsharded, fp32, CPU (collective).

    Routers (and replicated banks) come from ``safe_get_full_fp32_param`` (ZeRO
    master weights; the parameter itself without ZeRO); EP shards are
    all-gathered over the EP group and concatenated in global expert order.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    def full(p: torch.nn.Parameter) -> torch.Tensor:
        v = safe_get_full_fp32_param(p)
        return (p.detach() if v is None else v).float().cpu().clone()

    from loramoe_ds.parallel.engine import gather_adapter

    def local(p: torch.nn.Parameter) -> torch.Tensor:
        return p.detach().float().contiguous()

    state = gather_adapter(trainer.model, trainer.groups, full, local)
    return state


def export_adapter(trainer: MoETrainer, path: str | Path) -> Path:
    """Write the full adapter (safetensors + JSON) from rank 0 (collective)."""
    state = gather_full_adapter_state(trainer)
    if trainer.groups.rank == 0:
        trainer.model.save_adapter(path, state=state)
    _barrier()
    return Path(path)
