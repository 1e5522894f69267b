"""Writing and reading a checkpoint directory, and the adapter export (collective).

Rank 0 writes everything into a temporary sibling directory and renames it into
place (:func:`loramoe_ds.io.atomic_dir`), then replaces ``latest``. The
trainer's own state (counters, LR schedule) travels through
``MoETrainer.state_dict`` / ``load_state_dict``; this module never sets an
engine field.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from loramoe_ds.io import atomic_dir, atomic_write_text
from loramoe_ds.model.adapter_io import (
    ADAPTER_WEIGHTS,
    adapter_config_dict,
    save_adapter,
    write_adapter_files,
)
from loramoe_ds.parallel.checkpoint.format import (
    CHECKPOINT_FORMAT,
    LATEST,
    META,
    OPTIMIZER,
    TAG_PREFIX,
    TRAINER_STATE,
    check_compatible,
    latest_tag,
    read_meta,
    tag_name,
)
from loramoe_ds.parallel.checkpoint.state import (
    current_topology,
    full_adapter_state,
    full_optimizer_state,
    load_engine_state,
    load_expert_state,
)


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


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def save_checkpoint(trainer, directory: str | Path, client_state: dict | None) -> Path:
    """Write a topology-independent checkpoint atomically (collective: every rank calls it).

    Args:
        trainer: The :class:`~loramoe_ds.parallel.engine.MoETrainer`.
        directory: Checkpoint root.
        client_state: Picklable state handed back on load (rank 0's is kept, so it
            must be the same on every rank, e.g. the loader's global data position).

    Returns:
        ``<directory>/global_step{N}``.
    """
    root, rank, e = Path(directory), trainer.groups.rank, trainer.engine
    tag = tag_name(trainer.global_step)
    params = full_adapter_state(trainer)
    optim = full_optimizer_state(trainer)
    rngs = [None] * _world()
    if dist.is_initialized():
        dist.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    err = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(f".{TAG_PREFIX}*"):  # temp dirs of an interrupted save
                shutil.rmtree(stale, ignore_errors=True)
            state = {
                **trainer.state_dict(),  # counters, LR, LR schedule
                "client_state": client_state,
                "rng": rngs,
            }
            meta = {
                "format": CHECKPOINT_FORMAT,
                "tag": tag,
                "global_step": trainer.global_step,
                "micro_batch_size": int(e.train_micro_batch_size_per_gpu()),
                "grad_accum": int(e.gradient_accumulation_steps()),
                **current_topology(trainer),
            }
            with atomic_dir(root / tag) as tmp:
                write_adapter_files(tmp, params, adapter_config_dict(trainer.model))
                torch.save(optim, tmp / OPTIMIZER)
                torch.save(state, tmp / TRAINER_STATE)
                (tmp / META).write_text(json.dumps(meta, indent=2))
            atomic_write_text(root / LATEST, tag)
        except Exception as exc:  # the other ranks must hear of it, not hang
            err = f"rank 0 could not write checkpoint {root / tag}: {exc}"
            if not dist.is_initialized():
                raise
    if dist.is_initialized():
        box = [err]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise RuntimeError(box[0])
    return root / tag


def load_checkpoint(trainer, directory: str | Path, tag: str | None = None):
    """Restore adapter, both optimizers, LR schedule, counters (and RNG at the same W).

    Collective. Works across world sizes and ``ep_size`` (module docstring).

    Returns:
        The client state saved by rank 0, or ``None`` (nothing changed) when
        ``directory`` has no ``latest`` and no ``tag`` is given.

    Raises:
        ValueError: Not a checkpoint of this format, or one this run cannot
            continue (:func:`check_compatible`).
    """
    from safetensors.torch import load_file

    root = Path(directory)
    tag = tag or latest_tag(root)
    if tag is None:
        return None
    ckpt = root / tag
    meta = read_meta(ckpt)
    check_compatible(meta, current_topology(trainer), ckpt)
    params = load_file(str(ckpt / ADAPTER_WEIGHTS))
    optim = torch.load(ckpt / OPTIMIZER, map_location="cpu", weights_only=True, mmap=True)
    state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=False)
    load_engine_state(trainer, params, optim)
    load_expert_state(trainer, params, optim)
    trainer.load_state_dict(state)
    if len(state["rng"]) == trainer.groups.world_size:
        _set_rng_state(state["rng"][trainer.groups.rank])
    _barrier()
    return state["client_state"]


def export_adapter(trainer, path: str | Path) -> Path:
    """Write the full adapter (safetensors + JSON) from rank 0 (collective)."""
    state = full_adapter_state(trainer)
    if trainer.groups.rank == 0:
        save_adapter(trainer.model, path, state=state)
    _barrier()
    return Path(path)
