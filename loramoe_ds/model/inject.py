"""Wrap any ``transformers`` causal LM with routed LoRA experts, from the outside.

:func:`inject` replaces each matching ``nn.Linear`` (by name suffix) with a
:class:`~loramoe_ds.model.moe_linear.MoELoRALinear`, freezes every base
parameter and returns a :class:`~loramoe_ds.model.lm.LoRAMoEModel` (the LM
forward and its losses). No transformers file is edited or copied; anything
other than an ``nn.Linear`` named as a target is refused.
:func:`num_decoder_layers` is the one way the decoder-layer count of a model
(or its config) is found. Saving and loading adapters: :mod:`~loramoe_ds.model.adapter_io`.
"""

from __future__ import annotations

import re

from torch import nn

from loramoe_ds.config import AdapterConfig
from loramoe_ds.model.lm import LoRAMoEModel
from loramoe_ds.model.moe_linear import MoELoRALinear

_LAYER_RE = re.compile(r"\.(\d+)\.")


def _layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(f".{name}.")
    return int(m.group(1)) if m else None


def num_decoder_layers(model_or_config) -> int:
    """Decoder layers of a transformers model or config (the one way the count is found).

    Reads ``num_hidden_layers``, ``n_layer`` or ``num_layers`` of the config (a
    model's ``.config``), else of its ``text_config``.

    Raises:
        ValueError: The config names no layer count.
    """
    cfg = getattr(model_or_config, "config", model_or_config)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(cfg, attr, None)
        if isinstance(n, int):
            return n
    text_cfg = getattr(cfg, "text_config", None)
    if text_cfg is not None and isinstance(getattr(text_cfg, "num_hidden_layers", None), int):
        return text_cfg.num_hidden_layers
    raise ValueError(f"cannot find the number of layers in {type(cfg).__name__}")


def _find_targets(model: nn.Module, target_modules) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` whose name ends in a target suffix; refuse anything else.

    Raises:
        ValueError: A target suffix names a module that is not an ``nn.Linear``
            or a bare parameter (e.g. 3-D expert weights), or nothing matches.
    """
    targets, linear_suffixes, others = [], set(), []
    for name, module in model.named_modules():
        suffix = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear):
            linear_suffixes.add(suffix)
            if suffix in target_modules:
                targets.append((name, module))
        elif suffix in target_modules and name:
            others.append(f"{name} ({type(module).__name__})")
    for name, param in model.named_parameters():
        owner, _, pname = name.rpartition(".")
        if pname in target_modules:
            others.append(f"{name} (a {param.dim()}-D parameter of {owner or 'the model'})")
    if others:
        raise ValueError(
            f"target_modules={list(target_modules)} names {len(others)} module(s) that are not "
            f"nn.Linear, e.g. {others[:3]}; loramoe-ds adapts nn.Linear layers only (Llama, "
            "Mistral, Qwen2, Gemma, Granite, ... FFN and attention projections). Choose "
            f"targets among the model's nn.Linear names: {sorted(linear_suffixes)}"
        )
    if not targets:
        raise ValueError(
            f"target_modules={list(target_modules)} matched no nn.Linear in "
            f"{type(model).__name__}; its linear names end in {sorted(linear_suffixes)}"
        )
    return targets


def inject(model: nn.Module, cfg: AdapterConfig) -> LoRAMoEModel:
    """Add routed LoRA experts to every matching linear of a causal LM.

    Args:
        model: A ``transformers`` causal LM (may be built under ZeRO-3
            ``zero.Init``; only module structure is touched).
        cfg: The adapter configuration.

    Returns:
        The wrapped model; every base parameter is frozen, routers and experts
        are trainable.

    Raises:
        ValueError: If no linear matches ``cfg.target_modules``, a matching
            linear has no decoder layer index in its name, or a target name
            belongs to something other than an ``nn.Linear`` (GPT-2's ``Conv1D``,
            MoE experts stored as 3-D parameters): only ``nn.Linear`` is adapted,
            and adapting some layers while silently skipping others is refused.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    counts = cfg.layer_experts(num_decoder_layers(model))
    targets = _find_targets(model, cfg.target_modules)
    for name, linear in targets:
        idx = _layer_index(name)
        if idx is None or idx >= len(counts):
            raise ValueError(f"module {name!r} has no decoder layer index < {len(counts)}")
        wrapped = MoELoRALinear(
            linear,
            num_experts=counts[idx],
            rank=cfg.rank,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            router=cfg.router,
            top_k=cfg.top_k,
            name=name,
            layer_idx=idx,
            capacity_factor=cfg.capacity_factor,
            uniform_routing=cfg.uniform_routing,
            null_experts=cfg.null_experts,
        )
        ref = next(linear.parameters(), None)
        if ref is not None and ref.dtype.is_floating_point:
            wrapped.router.to(dtype=ref.dtype)
            wrapped.experts.to(dtype=ref.dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapped)
    return LoRAMoEModel(model, cfg, counts)
