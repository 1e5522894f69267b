"""Checkpoint layout, tags and compatibility: pure code (files and JSON, no process group).

What a checkpoint directory holds and what may change between save and resume:
see :mod:`loramoe_ds.parallel.checkpoint`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

LATEST = "latest"
META = "loramoe_meta.json"
OPTIMIZER = "optimizer.pt"
TRAINER_STATE = "trainer_state.pt"
TAG_PREFIX = "global_step"
CHECKPOINT_FORMAT = 2
"""Version 2: full, topology-independent state (1 was DeepSpeed's per-rank files)."""
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
    """:func:`check_compatible` on ``<directory>/<tag or latest>`` (reads JSON only).

    Returns:
        The checkpoint's meta, or ``None`` when there is nothing to resume.
    """
    root = Path(directory)
    tag = tag or latest_tag(root)
    if tag is None:
        return None
    meta = read_meta(root / tag)
    check_compatible(meta, now, root / tag)
    return meta
