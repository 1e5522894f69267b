"""The wrapper around one frozen linear: base output plus a routed mixture of LoRA experts.

Shape legend: T tokens, D input dim, O output dim, E experts, R rank, K top-k.

    y = W0 x + s * sum_e g_e(x) * B_e A_e dropout(x),   s = alpha / r

The expert computation goes through a *dispatcher*: by default the local bank
(:func:`loramoe_ds.model.experts.local_mixture`); expert parallelism plugs in an
object with the same call signature from outside (``loramoe_ds.parallel``), so
this module never imports DeepSpeed or torch.distributed.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from loramoe_ds.model.experts import ExpertBank, local_mixture
from loramoe_ds.model.router import Router, Routing


class Dispatcher(Protocol):
    """Computes ``sum_k g_k B_{e_k} A_{e_k} x`` (unscaled) for T tokens."""

    def __call__(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor: ...


class RoutingRecorder(Protocol):
    """Receives each adapted linear's routing for the auxiliary losses."""

    def record(self, layer: MoELoRALinear, routing: Routing) -> None: ...


class MoELoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus E routed LoRA experts (LoRAMoE / MoLA).

    Args:
        base: The frozen linear (its weights may be ZeRO-3 partitioned; only
            ``in_features``/``out_features`` are read here).
        num_experts: E for this layer.
        rank: R.
        alpha: LoRA alpha (scale ``alpha / rank``).
        dropout: Dropout on the expert input (one mask shared by all experts).
        router: ``"soft"`` or ``"topk"``.
        top_k: K.
        name: Module path in the base model (for losses, checkpoints, logs).
        layer_idx: Decoder layer index.
        capacity_factor: Top-k capacity factor (``None``: dropless).
        uniform_routing: Debug: uniform gates.
    """

    def __init__(
        self,
        base: nn.Linear,
        num_experts: int,
        rank: int,
        alpha: float,
        dropout: float,
        router: str,
        top_k: int,
        name: str,
        layer_idx: int,
        capacity_factor: float | None = None,
        uniform_routing: bool = False,
    ):
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.num_experts = num_experts
        self.scaling = alpha / rank
        self.name = name
        self.layer_idx = layer_idx
        self.capacity_factor = capacity_factor
        self.router = Router(self.in_features, num_experts, router, top_k, uniform_routing)
        self.experts: ExpertBank | None = ExpertBank(
            num_experts, self.in_features, self.out_features, rank
        )
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Plain attributes (not submodules): set from outside per forward / per run.
        self.dispatcher: Dispatcher | None = None
        self.recorder: RoutingRecorder | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        x_TD = x.reshape(-1, self.in_features)
        routing = self.router(x_TD)
        xd_TD = self.lora_dropout(x_TD)
        if self.dispatcher is not None:
            delta_TO = self.dispatcher(xd_TD, routing)
        else:
            assert self.experts is not None, "expert bank detached but no dispatcher set"
            delta_TO = local_mixture(self.experts, xd_TD, routing, self.capacity_factor)
        if self.recorder is not None:
            self.recorder.record(self, routing)
        return y + (self.scaling * delta_TO).view(*x.shape[:-1], self.out_features).to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
            f"router={self.router.mode}, scaling={self.scaling:g}"
        )
