"""Load pretrained weights into a model whose parameters may be ZeRO-3 partitioned."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def load_pretrained_into(model: nn.Module, model_dir: str | Path) -> None:
    """Copy the ``*.safetensors`` weights of ``model_dir`` into ``model``.

    Works for ordinary and ZeRO-3 partitioned parameters: each partitioned
    tensor is gathered with ``GatheredParameters(modifier_rank=0)``, rank 0
    copies the file's tensor in, and DeepSpeed re-partitions (broadcasting rank
    0's values). Only rank 0 reads the files. Tied weights are handled by name.

    Raises:
        ValueError: No safetensors file, or a parameter missing from the files.
    """
    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no *.safetensors weights found")
    rank = dist.get_rank() if dist.is_initialized() else 0
    handles = [safe_open(str(f), framework="pt") for f in files] if rank == 0 else []
    index = {k: h for h in handles for k in h.keys()}
    names = list(dict(model.named_parameters(remove_duplicate=False)).keys())
    if rank == 0:
        missing = [n for n in names if n not in index and not _tied(model, n)]
        if missing:
            raise ValueError(f"{model_dir}: weights missing for {missing[:5]} ({len(missing)})")
    params = dict(model.named_parameters())
    for name, p in params.items():
        src_name = name if name in index or rank != 0 else _tied_source(model, name, index)
        partitioned = hasattr(p, "ds_id")
        ctx = deepspeed.zero.GatheredParameters([p], modifier_rank=0) if partitioned else _Null()
        with ctx, torch.no_grad():
            if rank == 0 and src_name is not None:
                p.data.copy_(index[src_name].get_tensor(src_name).to(p.dtype))
    for buf_name, buf in model.named_buffers():
        if rank == 0 and buf_name in index:
            buf.copy_(index[buf_name].get_tensor(buf_name))
    if dist.is_initialized() and not any(hasattr(p, "ds_id") for p in params.values()):
        for p in params.values():  # unpartitioned model: make every rank equal to rank 0
            dist.broadcast(p.data, src=0)


def _tied(model: nn.Module, name: str) -> bool:
    return name.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)


def _tied_source(model, name, index):
    if _tied(model, name):
        for k in index:
            if k.endswith("embed_tokens.weight"):
                return k
    return None


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
