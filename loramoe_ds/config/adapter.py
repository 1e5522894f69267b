"""Adapter configuration: which linears get experts, how many, how they are routed.

Every field is documented and validated in ``__post_init__``; an invalid value
raises ``ValueError("adapter.field=value: ...")`` naming the field, the value and
what would be valid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from loramoe_ds.allocation import check_uniform_count, experts_per_layer, parse_pattern
from loramoe_ds.config.fields import check_choice, section_from_dict

ROUTERS = ("soft", "topk")
LBC_VARIANTS = ("published", "intended")
AUX_LOSS_SCOPES = ("micro_batch", "global_batch")
LORAMOE_TARGETS = ("gate_proj", "up_proj", "down_proj")
MOLA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdapterConfig:
    """Mixture-of-LoRA-experts adapter settings (LoRAMoE and MoLA)."""

    target_modules: tuple[str, ...] = LORAMOE_TARGETS
    """Name suffixes of the ``nn.Linear`` modules that get experts (LoRAMoE:
    the FFN ``gate_proj, up_proj, down_proj``; MoLA: ``q,k,v,o,gate,up,down``)."""

    rank: int = 4
    """LoRA rank ``r`` of every expert."""

    alpha: float = 32.0
    """LoRA alpha; the mixture is scaled by ``alpha / rank``."""

    dropout: float = 0.05
    """Dropout on the expert input (the router sees ``x`` without dropout). One
    mask is shared by all experts of a linear (the fused path); the original
    LoRAMoE code drew one mask per expert."""

    router: str = "soft"
    """``"soft"``: dense softmax over all experts (LoRAMoE); ``"topk"``: keep the
    ``top_k`` largest softmax probabilities and renormalise (MoLA)."""

    top_k: int = 2
    """Experts per token for ``router="topk"``. For ``top_k >= 2`` the kept
    probabilities are renormalised to sum to 1; for ``top_k = 1`` that gate would
    always be 1 and the LM loss would not train the router, so top-1 uses the
    largest probability itself as the gate (the Switch Transformer convention)."""

    num_experts: int | list[int] | str = 6
    """Experts per decoder layer: an int, a list with one int per layer, a MoLA
    digit pattern (``"2468"``: four equal layer groups, bottom to top), or a name
    (``rectangle, triangle, inverted_triangle, hourglass``). A pattern is a
    string: an int such as ``2468`` is rejected as ambiguous (see
    :func:`~loramoe_ds.allocation.check_uniform_count`)."""

    null_experts: int = 0
    """Router slots with no LoRA expert behind them (zero delta), in the
    knowledge group (docs/design.md, "Null experts"). Soft routing: their
    weight scales the mixture down, so a token that puts all its weight on them
    sees the frozen base exactly. Top-k: a (token, slot) routed to one gets no
    update from that slot and costs no GEMM row. They have router rows only."""

    router_supervision_coef: float = 0.0
    """Weight of the router supervision loss (docs/design.md, "Router
    supervision"): per token, ``-log`` of the router's share on the slots the
    record's ``task_type`` may use -- knowledge records: the knowledge experts
    and the null experts; downstream records: the downstream experts and the
    null experts (without null experts, the binary cross-entropy of the
    knowledge-group share against the type); a mean over each record's tokens,
    then over the records of the batch (over ``aux_loss_scope``), then over
    adapted linears. 0 disables it. Training only: at inference the router
    decides alone."""

    lbc_delta: float = 0.1
    """LoRAMoE localized balancing constraint: importance ``1 +/- delta``."""

    lbc_beta: float = 0.1
    """Weight of the LBC loss (summed over adapted linears); 0 disables it."""

    lbc_variant: str = "intended"
    """Form of the LBC (docs/design.md, "Localized balancing constraint"):
    ``"intended"`` (default): ``Z = Q / I``, whose optimum gives the group that
    matches the record type a share ``(1+delta)/2`` of the router weight.
    ``"published"``: ``Z = I * Q``, the paper's formula and the official code; its
    optimum gives the matching group ``(1-delta)/2`` (the opposite of the stated
    purpose). In docs/results.md both retain the same knowledge within the seed
    spread; only ``intended`` routes knowledge records to the knowledge experts."""

    aux_loss_scope: str = "micro_batch"
    """Batch over which the LBC and the load-balancing loss are computed:
    ``"micro_batch"``: each rank's own micro-batch; ``"global_batch"``: the
    per-record ``Q`` (LBC) and the load-balance ``f``/``P`` sums are gathered over
    every data-parallel rank of the micro-step, so loss and gradients equal those
    of one process holding all those ranks' samples. Gradient-accumulation
    micro-steps stay separate (each is its own global micro-batch; their losses
    are averaged). The z-loss is a per-token mean and is unaffected."""

    load_balance_coef: float = 0.0
    """Weight of the Switch/MoLA load-balancing loss (summed over layers); MoLA
    uses 1e-3 when enabled."""

    z_loss_coef: float = 0.0
    """Weight of the router z-loss (summed over adapted linears)."""

    capacity_factor: float | None = None
    """Top-k only: cap tokens per expert at ``ceil(cf * T * k / E)``; ``None`` is
    dropless (default)."""

    uniform_routing: bool = False
    """Debug switch for performance runs: ignore the router and give every token
    uniform gates (soft) or a fixed round-robin top-k assignment."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules or not all(
            isinstance(t, str) and t for t in self.target_modules
        ):
            raise ValueError(
                f"adapter.target_modules={self.target_modules!r}: give one or more non-empty "
                f"module name suffixes, e.g. {list(LORAMOE_TARGETS)}"
            )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"adapter.rank={self.rank!r}: must be an int >= 1")
        if not self.alpha > 0:
            raise ValueError(f"adapter.alpha={self.alpha!r}: must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter.dropout={self.dropout!r}: must be in [0, 1)")
        check_choice("adapter.router", self.router, ROUTERS)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"adapter.top_k={self.top_k!r}: must be an int >= 1")
        try:
            if isinstance(self.num_experts, str):
                parse_pattern(self.num_experts)  # raises a clear ValueError
            elif isinstance(self.num_experts, int) and not isinstance(self.num_experts, bool):
                check_uniform_count(self.num_experts)  # >= 1, and not a pattern such as 2468
            elif isinstance(self.num_experts, (list, tuple)):
                self.num_experts = list(self.num_experts)
                experts_per_layer(self.num_experts, len(self.num_experts))
            else:
                raise ValueError(
                    f"num_experts={self.num_experts!r}: give an int, a per-layer list of ints, "
                    "or a pattern such as '2468' or 'inverted_triangle'"
                )
        except ValueError as e:  # allocation's messages, named adapter.num_experts
            msg = str(e)
            named = msg.startswith("num_experts")
            raise ValueError(
                f"adapter.{msg}" if named else f"adapter.num_experts={self.num_experts!r}: {msg}"
            ) from e
        check_choice("adapter.lbc_variant", self.lbc_variant, LBC_VARIANTS)
        check_choice("adapter.aux_loss_scope", self.aux_loss_scope, AUX_LOSS_SCOPES)
        if not 0.0 <= self.lbc_delta < 1.0:
            raise ValueError(f"adapter.lbc_delta={self.lbc_delta!r}: must be in [0, 1)")
        if (
            isinstance(self.null_experts, bool)
            or not isinstance(self.null_experts, int)
            or self.null_experts < 0
        ):
            raise ValueError(f"adapter.null_experts={self.null_experts!r}: must be an int >= 0")
        for name in ("lbc_beta", "load_balance_coef", "z_loss_coef", "router_supervision_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"adapter.{name}={getattr(self, name)!r}: must be >= 0")
        if self.capacity_factor is not None:
            if self.router != "topk":
                raise ValueError(
                    f"adapter.capacity_factor={self.capacity_factor!r}: only meaningful with "
                    "router='topk'"
                )
            if not self.capacity_factor > 0:
                raise ValueError(f"adapter.capacity_factor={self.capacity_factor!r}: must be > 0")

    @property
    def scaling(self) -> float:
        """LoRA scale ``s = alpha / rank``."""
        return self.alpha / self.rank

    def layer_experts(self, num_layers: int) -> list[int]:
        """Experts of each decoder layer, validated against ``top_k``.

        Raises:
            ValueError: If the allocation does not fit the model or a layer has
                fewer experts than ``top_k``.
        """
        counts = experts_per_layer(self.num_experts, num_layers)
        if self.router == "topk":
            for i, c in enumerate(counts):
                if c + self.null_experts < self.top_k:
                    raise ValueError(
                        f"layer {i} has {c} experts"
                        + (f" and {self.null_experts} null experts" if self.null_experts else "")
                        + f" but top_k={self.top_k}; every layer needs at least top_k router "
                        "slots (lower top_k or raise num_experts)"
                    )
        return counts

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        """Build from a mapping, rejecting unknown keys with the list of valid ones."""
        return section_from_dict(cls, d, "adapter")
