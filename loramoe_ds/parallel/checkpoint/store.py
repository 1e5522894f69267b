"""Writing and reading a checkpoint directory, and the adapter export (collective).

Rank 0 writes everything into a temporary sibling directory and renames it into
place (:func:`loramoe_ds.io.atomic_dir`), then replaces ``latest``. The
trainer's own state (counters, LR schedule) travels through
``MoETrainer.state_dict`` / ``load_state_dict``; this module never sets an
engine field.

Checkpoints prove themselves: ``loramoe_meta.json`` lists every other file's size
and sha256 (written last, inside the staging directory); on load rank 0 verifies
them and a damaged newest checkpoint is skipped for the newest intact one
(:func:`~loramoe_ds.parallel.checkpoint.format.intact_tag`, one line naming the
file). Everything is data, never code: tensors in safetensors, the rest in
``.pt`` files read with ``torch.load(weights_only=True)`` (tensors, numbers,
strings, lists, dicts); a file that needs anything else is refused
(:class:`CheckpointRefusedError`). A save that fails (disk full, permission) leaves
the previous checkpoint and ``latest`` untouched and raises
:class:`CheckpointSaveError` on every rank.

The waits on rank 0's writing and verifying run on the long-timeout side group
(:func:`~loramoe_ds.parallel.groups.rank0_group`).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import signal
import sys
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
    MANIFEST,
    META,
    OPTIMIZER,
    TAG_PREFIX,
    TRAINER_STATE,
    CheckpointDamagedError,
    check_compatible,
    file_manifest,
    intact_tag,
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
from loramoe_ds.parallel.groups import rank0_group

FAULT_ENV = "LORAMOE_FAULT_SAVE"
"""Testing aid, off unless set: ``enospc:<step>`` makes the save of step ``<step>``
fail as on a full disk, ``kill:<step>`` SIGKILLs rank 0 in the middle of it
(``bench/chaos.py``)."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact. One line."""


class CheckpointRefusedError(ValueError):
    """A checkpoint file holds something other than data (loading it could run code)."""


def _injected_fault(step: int, where: Path) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    kind, _, at = spec.partition(":")
    if not spec or int(at or -1) != step:
        return
    if kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)


def _rng_state() -> dict:
    """This rank's RNG streams as plain data (tensors, ints, lists): ``weights_only`` loads it.

    Only this rank's own CUDA device (the current one): a resume on a node with
    another GPU count restores what it can (see :func:`_set_rng_state`).
    """
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: this rank's own
    return state


def _set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])  # this rank's own (current) device


def _safe_load(path: Path, **kw):
    """``torch.load(weights_only=True)``; a file needing anything else is refused in one line."""
    import zipfile

    if not zipfile.is_zipfile(path):  # a legacy (or hand-made) pickle: mmap needs the zip
        kw.pop("mmap", None)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" (it names {found.group(1)})" if found else ""
        raise CheckpointRefusedError(
            f"{path}: refused: it holds objects other than tensors and plain data{what}, "
            "which loading would run as code; use a checkpoint written by loramoe-ds"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:  # not a torch file at all
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointDamagedError(f"{path}: unreadable ({first})") from None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=rank0_group())


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank0_broadcast(value):
    """Rank 0's ``value`` on every rank, over the long-timeout side group."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=rank0_group())
    return box[0]


def save_checkpoint(trainer, directory: str | Path, client_state: dict | None) -> Path:
    """Write a topology-independent checkpoint atomically (collective: every rank calls it).

    Args:
        trainer: The :class:`~loramoe_ds.parallel.engine.MoETrainer`.
        directory: Checkpoint root.
        client_state: Picklable state handed back on load (rank 0's is kept, so it
            must be the same on every rank, e.g. the loader's global data position).

    Returns:
        ``<directory>/global_step{N}``.

    Raises:
        CheckpointSaveError: On every rank when rank 0 could not write (disk full,
            permission): ``latest`` and the previous checkpoint are untouched.
    """
    root, rank, e = Path(directory), trainer.groups.rank, trainer.engine
    tag = tag_name(trainer.global_step)
    latest_before = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
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
                _injected_fault(trainer.global_step, tmp / TRAINER_STATE)
                torch.save(state, tmp / TRAINER_STATE)
                meta[MANIFEST] = file_manifest(tmp)
                (tmp / META).write_text(json.dumps(meta, indent=2))
            atomic_write_text(root / LATEST, tag)
        except Exception as exc:  # the other ranks must hear of it, not hang
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            where = getattr(exc, "filename", None) or root / tag
            kept = latest_before or "none yet"
            err = (
                f"could not write checkpoint {root / tag} ({reason}: {where}); the previous "
                f"checkpoint ({kept}) is intact"
            )
    err = _rank0_broadcast(err)
    if err is not None:
        raise CheckpointSaveError(err)
    return root / tag


def load_checkpoint(trainer, directory: str | Path, tag: str | None = None):
    """Restore adapter, both optimizers, LR schedule, counters (and RNG at the same W).

    Collective. Works across world sizes and ``ep_size`` (module docstring).

    Returns:
        The client state saved by rank 0, or ``None`` (nothing changed) when
        ``directory`` has no ``latest`` and no ``tag`` is given.

    Raises:
        ValueError: Not a checkpoint of this format, one this run cannot continue
            (:func:`check_compatible`), no intact checkpoint, or a file refused
            (:class:`CheckpointRefusedError`: a pickle that is not plain data).
    """
    from safetensors.torch import load_file

    root = Path(directory)
    chosen = None
    if trainer.groups.rank == 0:  # verify once; every rank then reads the same tag
        try:
            chosen = ("ok", intact_tag(root, tag, report=_stderr_line))
        except CheckpointDamagedError as e:
            chosen = ("error", str(e))
    kind, tag = _rank0_broadcast(chosen)
    if kind == "error":
        raise CheckpointDamagedError(tag)
    if tag is None:
        return None
    ckpt = root / tag
    meta = read_meta(ckpt)
    check_compatible(meta, current_topology(trainer), ckpt)
    params = load_file(str(ckpt / ADAPTER_WEIGHTS))
    optim = _safe_load(ckpt / OPTIMIZER, mmap=True)
    state = _safe_load(ckpt / TRAINER_STATE)
    load_engine_state(trainer, params, optim)
    load_expert_state(trainer, params, optim)
    trainer.load_state_dict(state)
    if len(state["rng"]) == trainer.groups.world_size:
        _set_rng_state(state["rng"][trainer.groups.rank])
    _barrier()
    return state["client_state"]


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def export_adapter(trainer, path: str | Path) -> Path:
    """Write the full adapter (safetensors + JSON) from rank 0 (collective)."""
    state = full_adapter_state(trainer)
    if trainer.groups.rank == 0:
        save_adapter(trainer.model, path, state=state)
    _barrier()
    return Path(path)
