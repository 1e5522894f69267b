"""Load pretrained weights into a model whose parameters may be ZeRO-3 partitioned."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def load_pretrained_into(model: nn.Module, model_dir: str | Path) -> None:
    """Copy the ``*.safetensors`` weights of ``model_dir`` into ``model``.

    * ZeRO-3 partitioned parameters: each is gathered with
      ``GatheredParameters(modifier_rank=0)``, rank 0 copies the file's tensor
      in, and DeepSpeed re-partitions it (its broadcast runs on the device the
      partitions live on).
    * Unpartitioned parameters (ZeRO stage 0/1/2, or one process): *every*
      rank copies from the memory-mapped files; no collective at all. (A
      broadcast of these host tensors from rank 0 would need a CPU backend,
      which an NCCL-only process group lacks; the files are read through the
      page cache, so the ranks of one node share one read.)

    Buffers found in the files are copied on every rank. Tied weights are
    handled by name. Every rank checks that every parameter has a source.

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
    handles = [safe_open(str(f), framework="pt") for f in files]  # memory-mapped, lazy
    index = {k: h for h in handles for k in h.keys()}
    names = list(dict(model.named_parameters(remove_duplicate=False)).keys())
    missing = [n for n in names if n not in index and not _tied(model, n)]
    if missing:  # every rank sees the same files: every rank stops
        raise ValueError(f"{model_dir}: weights missing for {missing[:5]} ({len(missing)})")
    for name, p in model.named_parameters():
        src_name = name if name in index else _tied_source(model, name, index)
        if hasattr(p, "ds_id"):  # ZeRO-3: rank 0 writes, DeepSpeed re-partitions
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                if rank == 0 and src_name is not None:
                    p.data.copy_(index[src_name].get_tensor(src_name).to(p.dtype))
        elif src_name is not None:
            with torch.no_grad():
                p.data.copy_(index[src_name].get_tensor(src_name).to(p.dtype))
    for buf_name, buf in model.named_buffers():
        if buf_name in index:
            buf.copy_(index[buf_name].get_tensor(buf_name))


def _tied(model: nn.Module, name: str) -> bool:
    return name.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)


def _tied_source(model, name, index):
    if _tied(model, name):
        for k in index:
            if k.endswith("embed_tokens.weight"):
                return k
    return None
