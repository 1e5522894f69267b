"""The adapter on disk: file names, format version, save and load (no DeepSpeed).

An adapter directory holds two files::

    adapter_model.safetensors   # every router and expert tensor, names of
                                # LoRAMoEModel.adapter_named_parameters (unsharded)
    adapter_config.json         # format, format_version, base_model, adapter config,
                                # experts_per_layer

:func:`save_adapter` writes them atomically (:func:`loramoe_ds.io.atomic_dir`);
:func:`load_adapter` injects the saved adapter into a plain ``transformers``
base model. The checkpoint code (:mod:`loramoe_ds.parallel.checkpoint`) writes
the same pair through :func:`write_adapter_files` and copies a full state into a
model through :func:`copy_adapter_state`: one writer and one checked copy serve
both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loramoe_ds.config import AdapterConfig
from loramoe_ds.model.inject import inject
from loramoe_ds.model.lm import LoRAMoEModel

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1


def adapter_state(model: LoRAMoEModel) -> dict[str, torch.Tensor]:
    """Router and expert tensors (detached, contiguous, CPU)."""
    return {
        n: p.detach().to("cpu").contiguous().clone() for n, p in model.adapter_named_parameters()
    }


def adapter_config_dict(model: LoRAMoEModel) -> dict[str, Any]:
    """The ``adapter_config.json`` of ``model``."""
    name = getattr(getattr(model.base, "config", None), "_name_or_path", "")
    return {
        "format": "loramoe_ds",
        "format_version": FORMAT_VERSION,
        "base_model": name,
        "adapter": model.cfg.to_dict(),
        "experts_per_layer": model.experts_per_layer,
    }


def write_adapter_files(
    directory: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any]
) -> None:
    """Write the adapter pair into an existing (staging) directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def copy_adapter_state(model: LoRAMoEModel, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy a full adapter state into an injected, not yet sharded model.

    Raises:
        ValueError: Missing or unexpected tensors, or a shape that differs from
            the model's; the message starts with ``where`` (a file, ``init_state``).
    """
    params = dict(model.adapter_named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"{where}: missing tensors {missing[:5]}, unexpected {unexpected[:5]} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    with torch.no_grad():
        for n, p in params.items():
            if tuple(p.shape) != tuple(state[n].shape):
                raise ValueError(f"{where}: {n} has shape {tuple(state[n].shape)}, model {p.shape}")
            p.copy_(state[n].to(p.dtype))


def save_adapter(
    model: LoRAMoEModel, path: str | Path, state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` atomically.

    Args:
        model: The injected model.
        path: Output directory.
        state: Tensors to write (default: the model's adapter state; the
            expert-parallel export passes the gathered full state).
    """
    from loramoe_ds.io import atomic_dir

    state = adapter_state(model) if state is None else state
    with atomic_dir(path) as tmp:
        write_adapter_files(tmp, state, adapter_config_dict(model))
    return Path(path)


def load_adapter(base: nn.Module, path: str | Path) -> LoRAMoEModel:
    """Inject an adapter saved by :func:`save_adapter` into ``base``.

    Needs no DeepSpeed: plain ``transformers`` + ``safetensors``.

    Raises:
        ValueError: If the files are missing, the format is unknown, or tensors
            do not match the model.
    """
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, w_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise ValueError(f"adapter directory {path} lacks {f.name}")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != "loramoe_ds" or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{cfg_file}: format {meta.get('format')!r} v{meta.get('format_version')} is not "
            f"loramoe_ds v{FORMAT_VERSION}"
        )
    adapter_cfg = AdapterConfig.from_dict(meta["adapter"])
    model = inject(base, adapter_cfg)
    if model.experts_per_layer != meta["experts_per_layer"]:
        raise ValueError(
            f"{cfg_file}: experts_per_layer {meta['experts_per_layer']} does not match the "
            f"model's resolved allocation {model.experts_per_layer}"
        )
    copy_adapter_state(model, load_file(str(w_file)), str(w_file))
    return model
