"""Checkpoint layout, tags and compatibility: pure code (files and JSON, no process group).

What a checkpoint directory holds and what may change between save and resume:
see :mod:`loramoe_ds.parallel.checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

LATEST = "latest"
META = "loramoe_meta.json"
OPTIMIZER = "optimizer.pt"
TRAINER_STATE = "trainer_state.pt"
TAG_PREFIX = "global_step"
CHECKPOINT_FORMAT = 3
"""Version 3: full, topology-independent state with a manifest of every file's size and
sha256 in ``loramoe_meta.json`` (2 had no manifest; 1 was DeepSpeed's per-rank files)."""
MANIFEST = "files"
"""Key of ``loramoe_meta.json`` mapping each other file of the tag to ``{"size", "sha256"}``."""
BASE_IDENTITY_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)


def tag_name(step: int) -> str:
    """The tag of the checkpoint after optimizer step ``step``."""
    return f"{TAG_PREFIX}{step}"


def latest_tag(directory: str | Path) -> str | None:
    """The tag named by ``<directory>/latest``, or ``None``."""
    f = Path(directory) / LATEST
    return f.read_text().strip() if f.is_file() else None


def checkpoint_tags(directory: str | Path) -> list[Path]:
    """Tag directories under ``directory``, oldest step first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    tags = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)]
    return sorted(tags, key=lambda p: int("".join(c for c in p.name if c.isdigit()) or 0))


def prune_checkpoints(directory: str | Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` tags (``keep <= 0``: keep all); returns the removed."""
    if keep <= 0:
        return []
    removed = checkpoint_tags(directory)[:-keep]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def base_identity(hf_config) -> dict[str, Any]:
    """What identifies the base model: architecture sizes and the model directory's name."""
    ident = {k: getattr(hf_config, k, None) for k in BASE_IDENTITY_KEYS}
    ident["name"] = Path(str(getattr(hf_config, "_name_or_path", "") or "")).name
    return ident


def _describe(meta: dict) -> str:
    return f"world size {meta['world_size']}, ep_size {meta['ep_size']}"


def check_compatible(meta: dict, now: dict, where: str | Path) -> None:
    """Refuse a resume that cannot continue the saved run; name both topologies.

    Args:
        meta: The checkpoint's ``loramoe_meta.json``.
        now: This run's ``world_size``, ``ep_size``, ``experts_per_layer``,
            ``adapter`` (``AdapterConfig.to_dict()``), ``base``
            (:func:`base_identity`) and ``train_batch_size``.
        where: The checkpoint (for the message).

    Raises:
        ValueError: Unknown format, a different adapter config, allocation, base
            model or global batch, or an ``ep_size`` that does not divide the
            world size (any expert count loads: a bank the new ``ep_size``
            cannot split is replicated, :mod:`loramoe_ds.parallel.layout`).
    """
    now = json.loads(json.dumps(now))  # tuples -> lists, as in the saved JSON
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{where}: checkpoint format {meta.get('format')!r}, this version reads "
            f"{CHECKPOINT_FORMAT} (written by another loramoe-ds version)"
        )
    head = f"cannot resume {where} (saved at {_describe(meta)}) on {_describe(now)}: "
    if meta["adapter"] != now["adapter"]:
        diff = sorted(
            k
            for k in set(meta["adapter"]) | set(now["adapter"])
            if meta["adapter"].get(k) != now["adapter"].get(k)
        )
        pairs = ", ".join(
            f"{k} saved {meta['adapter'].get(k)!r} now {now['adapter'].get(k)!r}" for k in diff
        )
        raise ValueError(head + f"the adapter config differs ({pairs})")
    if meta["experts_per_layer"] != now["experts_per_layer"]:
        raise ValueError(
            head + f"experts per layer saved {meta['experts_per_layer']}, now "
            f"{now['experts_per_layer']}"
        )
    if meta["base"] != now["base"]:
        diff = [
            f"{k} saved {meta['base'].get(k)!r} now {now['base'].get(k)!r}"
            for k in sorted(meta["base"])
            if meta["base"].get(k) != now["base"].get(k)
        ]
        raise ValueError(head + f"a different base model ({', '.join(diff)})")
    W, P = now["world_size"], now["ep_size"]
    if W % P:
        raise ValueError(head + f"ep_size {P} does not divide the world size {W}")
    if meta["train_batch_size"] != now["train_batch_size"]:
        raise ValueError(
            head + f"global batch (train_batch_size) saved {meta['train_batch_size']}, now "
            f"{now['train_batch_size']}; keep micro-batch x grad_accum x world size equal"
        )


def read_meta(ckpt: Path) -> dict:
    f = ckpt / META
    if not f.is_file():
        raise ValueError(f"{ckpt} is not a loramoe-ds checkpoint (no {META})")
    return json.loads(f.read_text())


def check_resume(directory: str | Path, now: dict, tag: str | None = None) -> dict | None:
    """:func:`check_compatible` on ``<directory>/<tag>`` or the newest checkpoint whose files
    have the sizes of its manifest (reads JSON and file sizes only; the checksums are
    verified when the checkpoint is loaded).

    Returns:
        The checkpoint's meta, or ``None`` when there is nothing to resume.
    """
    root = Path(directory)
    tag = intact_tag(root, tag, checksums=False)
    if tag is None:
        return None
    meta = read_meta(root / tag)
    check_compatible(meta, now, root / tag)
    return meta


class CheckpointDamagedError(ValueError):
    """No intact checkpoint to resume from (or the one named is damaged). One line."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in chunks)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_manifest(tag_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{name: {"size": bytes, "sha256": hex}}`` of every file in ``tag_dir`` but the meta."""
    d = Path(tag_dir)
    return {
        f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)}
        for f in sorted(d.iterdir())
        if f.is_file() and f.name != META
    }


def verify_tag(tag_dir: str | Path, checksums: bool = True) -> str | None:
    """Check a tag against its manifest: ``None`` when intact, else what is wrong, naming the file.

    A checkpoint of another format is reported intact here (its meta is readable);
    :func:`check_compatible` refuses it with a clearer message.

    Args:
        tag_dir: ``<dir>/global_step{N}``.
        checksums: Also hash every file (``False``: sizes only, cheap).
    """
    d = Path(tag_dir)
    try:
        meta = json.loads((d / META).read_text())
    except (OSError, ValueError) as e:
        return f"{d / META} is unreadable ({type(e).__name__})"
    if not isinstance(meta, dict):
        return f"{d / META} is not a JSON object"
    if meta.get("format") != CHECKPOINT_FORMAT:
        return None
    files = meta.get(MANIFEST)
    if not isinstance(files, dict) or not files:
        return f"{d / META} has no file manifest"
    for name, want in files.items():
        f = d / name
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want.get("size"):
            return f"{f} has {size} bytes, the manifest {want.get('size')}"
        if checksums and file_sha256(f) != want.get("sha256"):
            return f"{f} has a sha256 other than the manifest's"
    return None


def _step_of(tag: str) -> int:
    return int("".join(c for c in tag if c.isdigit()) or 0)


def intact_tag(
    directory: str | Path, tag: str | None = None, checksums: bool = True, report=None
) -> str | None:
    """The tag to resume from: ``tag`` if given, else the newest intact one up to ``latest``.

    A damaged newest checkpoint (a file missing, of the wrong size or checksum,
    an unreadable meta) is skipped and the next older one tried; ``report`` (e.g.
    ``print``) gets one line naming the damaged file and the tag used instead.

    Args:
        directory: Checkpoint root.
        tag: A tag the user named: it must be intact (no fallback).
        checksums: Hash the files (``False``: sizes only).
        report: Called with one line per skipped checkpoint.

    Returns:
        The tag, or ``None`` when there is nothing to resume (no ``latest``).

    Raises:
        CheckpointDamagedError: The named tag is damaged, or no checkpoint up to
            ``latest`` is intact.
    """
    root = Path(directory)
    if tag is not None:
        problem = verify_tag(root / tag, checksums)
        if problem is not None:
            raise CheckpointDamagedError(f"checkpoint {root / tag} is damaged: {problem}")
        return tag
    newest = latest_tag(root)
    if newest is None:
        return None
    names = [p.name for p in checkpoint_tags(root) if _step_of(p.name) <= _step_of(newest)]
    if newest not in names:
        names.append(newest)
    damaged: list[str] = []
    for name in sorted(names, key=_step_of, reverse=True):
        problem = (
            verify_tag(root / name, checksums)
            if (root / name).is_dir()
            else (f"{root / name} is missing")
        )
        if problem is None:
            if report is not None:
                for what in damaged:
                    report(f"[checkpoint] skipping damaged checkpoint: {what}; using {root / name}")
            return name
        damaged.append(problem)
    raise CheckpointDamagedError(
        f"no intact checkpoint in {root} (newest problem: {damaged[0]}); remove the directory "
        "or pass --resume none to start afresh"
    )
