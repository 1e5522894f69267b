"""Wrap any ``transformers`` causal LM with routed LoRA experts, from the outside.

Shape legend: B samples, S positions, T = B*S tokens, D hidden, V vocabulary,
E experts, K top-k, N labelled positions.

:func:`inject` replaces each matching ``nn.Linear`` (by name suffix) with a
:class:`~loramoe_ds.model.moe_linear.MoELoRALinear`, freezes every base
parameter and returns a :class:`LoRAMoEModel` whose forward takes the batch
(``input_ids, attention_mask, labels, task_type``) and returns the LM loss, each
auxiliary loss and their weighted total. No transformers file is edited or
copied; per-forward routing information reaches the losses through a recorder
object that lives only for the duration of one forward (no module globals).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.utils import ModelOutput

from loramoe_ds.config import AdapterConfig
from loramoe_ds.model.losses import lbc_loss, load_balance_loss, z_loss
from loramoe_ds.model.moe_linear import MoELoRALinear
from loramoe_ds.model.router import Routing

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1
_LAYER_RE = re.compile(r"\.(\d+)\.")


@dataclass
class LoRAMoEOutput(ModelOutput):
    """Result of :meth:`LoRAMoEModel.forward` (a ``ModelOutput``: ZeRO-3 hooks see its tensors).

    Attributes:
        loss: ``lm_loss + lbc_beta*lbc + lb_coef*load_balance + z_coef*z``.
        lm_loss: Mean next-token cross-entropy over labelled positions.
        lbc_loss: Sum over adapted linears of the LBC (unweighted).
        load_balance_loss: Sum over decoder layers of the load-balancing loss.
        z_loss: Sum over adapted linears of the router z-loss.
        logits: Full logits (only when ``labels`` is None).
        num_label_tokens: Labelled positions in the batch.
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    lbc_loss: torch.Tensor | None = None
    load_balance_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    num_label_tokens: int | None = None


@dataclass
class _Recorder:
    """Collects the routing of every adapted linear during one forward."""

    records: dict[str, tuple[MoELoRALinear, Routing]] = field(default_factory=dict)

    def record(self, layer: MoELoRALinear, routing: Routing) -> None:
        # Keyed by module name: a recomputation (activation checkpointing)
        # overwrites instead of double-counting.
        self.records[layer.name] = (layer, routing)


def _layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(f".{name}.")
    return int(m.group(1)) if m else None


def _num_layers(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(cfg, attr, None)
        if isinstance(n, int):
            return n
    text_cfg = getattr(cfg, "text_config", None)
    if text_cfg is not None and isinstance(getattr(text_cfg, "num_hidden_layers", None), int):
        return text_cfg.num_hidden_layers
    raise ValueError(f"cannot find the number of layers in {type(cfg).__name__}")


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
        ValueError: If no linear matches ``cfg.target_modules`` or a matching
            linear has no decoder layer index in its name.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    counts = cfg.layer_experts(_num_layers(model))
    targets = []
    linear_suffixes = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        suffix = name.rsplit(".", 1)[-1]
        linear_suffixes.add(suffix)
        if suffix in cfg.target_modules:
            targets.append((name, module))
    if not targets:
        raise ValueError(
            f"target_modules={list(cfg.target_modules)} matched no nn.Linear in "
            f"{type(model).__name__}; its linear names end in {sorted(linear_suffixes)}"
        )
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
        )
        ref = next(linear.parameters(), None)
        if ref is not None and ref.dtype.is_floating_point:
            wrapped.router.to(dtype=ref.dtype)
            wrapped.experts.to(dtype=ref.dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapped)
    return LoRAMoEModel(model, cfg, counts)


class LoRAMoEModel(nn.Module):
    """A causal LM with routed LoRA experts and explicit auxiliary losses.

    Args:
        base: The injected ``transformers`` model.
        cfg: Adapter configuration.
        experts_per_layer: Resolved expert count of each decoder layer.
    """

    def __init__(self, base: nn.Module, cfg: AdapterConfig, experts_per_layer: list[int]):
        super().__init__()
        self.base = base
        self.cfg = cfg
        self.experts_per_layer = list(experts_per_layer)

    # -- structure -------------------------------------------------------
    def moe_layers(self) -> list[MoELoRALinear]:
        """Every adapted linear, in module order."""
        return [m for m in self.base.modules() if isinstance(m, MoELoRALinear)]

    def adapter_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, param) of every router and expert weight, names relative to ``base``."""
        out = []
        for layer in self.moe_layers():
            for pname, p in layer.named_parameters():
                if pname.startswith(("router.", "experts.")):
                    out.append((f"{layer.name}.{pname}", p))
        return out

    def adapter_params(self) -> list[nn.Parameter]:
        """The trainable parameters: routers and experts."""
        return [p for _, p in self.adapter_named_parameters()]

    def total_experts(self) -> int:
        """Experts summed over all adapted linears (compare allocations at equal budget)."""
        return sum(layer.num_experts for layer in self.moe_layers())

    # -- forward ---------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        task_type: torch.Tensor | None = None,
        **kwargs,
    ) -> LoRAMoEOutput:
        """Run the LM and compute the LM and auxiliary losses.

        Args:
            input_ids: ``(B, S)`` token ids.
            attention_mask: ``(B, S)``, 1 for real tokens (default: all ones).
            labels: ``(B, S)``, -100 where no loss is taken; the loss at position
                t predicts ``labels[t]`` from tokens ``< t`` (HF convention).
            task_type: ``(B,)`` 1 = world knowledge, 0 = downstream (needed when
                ``lbc_beta > 0``).
            **kwargs: Passed to the base model.

        Returns:
            :class:`LoRAMoEOutput`.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if labels is not None and task_type is None and self.cfg.lbc_beta > 0:
            raise ValueError(
                "lbc_beta > 0 needs the per-sample task_type (1 = world knowledge, "
                "0 = downstream) in the batch; set lbc_beta=0 to train without the LBC"
            )
        recorder = _Recorder()
        layers = self.moe_layers()
        for layer in layers:
            layer.recorder = recorder
        try:
            if labels is None:
                logits = self.base(
                    input_ids=input_ids, attention_mask=attention_mask, **kwargs
                ).logits
                lm_loss, n_lab = None, 0
            else:
                logits = None
                lm_loss, n_lab = self._lm_loss(input_ids, attention_mask, labels, **kwargs)
        finally:
            for layer in layers:
                layer.recorder = None
        lbc, lb, zl = self._aux_losses(recorder, attention_mask, task_type)
        loss = None
        if lm_loss is not None:
            loss = (
                lm_loss
                + self.cfg.lbc_beta * lbc
                + self.cfg.load_balance_coef * lb
                + self.cfg.z_loss_coef * zl
            )
        return LoRAMoEOutput(
            loss=loss,
            lm_loss=lm_loss,
            lbc_loss=lbc,
            load_balance_loss=lb,
            z_loss=zl,
            logits=logits,
            num_label_tokens=n_lab,
        )

    def _lm_loss(self, input_ids, attention_mask, labels, **kwargs):
        """Cross-entropy computed only at labelled positions (saves the V-wide head)."""
        decoder = self.base.get_decoder()
        h_BSD = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        target_BS = labels[:, 1:]
        keep_BS = target_BS != -100
        h_ND = h_BSD[:, :-1][keep_BS]
        logits_NV = self.base.get_output_embeddings()(h_ND).float()
        cap = getattr(self.base.config, "final_logit_softcapping", None)
        if cap:
            logits_NV = torch.tanh(logits_NV / cap) * cap
        n = int(keep_BS.sum())
        if n == 0:
            return logits_NV.sum() * 0.0, 0
        loss = torch.nn.functional.cross_entropy(logits_NV, target_BS[keep_BS], reduction="mean")
        return loss, n

    def _aux_losses(self, recorder: _Recorder, attention_mask, task_type):
        mask_BS = attention_mask
        mask_T = mask_BS.reshape(-1)
        dev = mask_BS.device
        lbc = torch.zeros((), device=dev)
        zl = torch.zeros((), device=dev)
        by_layer: dict[int, list[Routing]] = {}
        for layer, routing in recorder.records.values():
            E = routing.num_experts
            if task_type is not None:
                lbc = lbc + lbc_loss(
                    routing.probs_TE.view(*mask_BS.shape, E), mask_BS, task_type, self.cfg.lbc_delta
                )
            zl = zl + z_loss(routing.logits_TE, mask_T)
            by_layer.setdefault(layer.layer_idx, []).append(routing)
        lb = torch.zeros((), device=dev)
        for routings in by_layer.values():
            probs = torch.cat([r.probs_TE for r in routings])
            if routings[0].is_soft:
                experts = None
            else:
                experts = torch.cat([r.experts_TK for r in routings])
            lb = lb + load_balance_loss(probs, experts, mask_T.repeat(len(routings)))
        return lbc, lb, zl

    # -- adapter I/O -----------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Router and expert tensors (detached, contiguous, CPU)."""
        return {
            n: p.detach().to("cpu").contiguous().clone() for n, p in self.adapter_named_parameters()
        }

    def adapter_config_dict(self) -> dict:
        name = getattr(getattr(self.base, "config", None), "_name_or_path", "")
        return {
            "format": "loramoe_ds",
            "format_version": FORMAT_VERSION,
            "base_model": name,
            "adapter": self.cfg.to_dict(),
            "experts_per_layer": self.experts_per_layer,
        }

    def save_adapter(self, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``adapter_model.safetensors`` + ``adapter_config.json`` atomically.

        Args:
            path: Output directory.
            state: Tensors to write (default: this model's adapter state; the
                expert-parallel export passes the gathered full state).
        """
        from safetensors.torch import save_file

        from loramoe_ds.io import atomic_dir

        state = self.adapter_state_dict() if state is None else state
        with atomic_dir(path) as tmp:
            save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(self.adapter_config_dict(), indent=2))
        return Path(path)


def load_adapter(base: nn.Module, path: str | Path) -> LoRAMoEModel:
    """Inject an adapter saved by :meth:`LoRAMoEModel.save_adapter` into ``base``.

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
    state = load_file(str(w_file))
    params = dict(model.adapter_named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"{w_file}: missing tensors {missing[:5]}, unexpected {unexpected[:5]} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != state[n].shape:
                raise ValueError(
                    f"{w_file}: {n} has shape {tuple(state[n].shape)}, model {p.shape}"
                )
            p.copy_(state[n].to(p.dtype))
    return model
