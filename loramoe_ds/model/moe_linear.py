"""The wrapper around one frozen linear: base output plus a routed mixture of LoRA experts.

Shape legend: T tokens, D input dim, O output dim, E experts, R rank, K top-k.

    y = W0 x + s * sum_e g_e(x) * B_e A_e dropout(x),   s = alpha / r

The base linear is always called through its own module (ZeRO-3's hooks gather
its weight there); its output is then the addend of the experts' second GEMM
(see :meth:`~loramoe_ds.model.experts.ExpertBank.soft`), so adding the experts'
contribution, its scale and its gates cost no pass over the ``T x O`` output.

Dropout: ``dropout(x) = x * m / (1 - p)`` with ``m`` i.i.d. Bernoulli(1 - p),
one mask shared by all experts of the layer. The factor ``1 / (1 - p)`` is
folded into the mixture's scale. On the CPU, for ``p <= SPARSE_DROPOUT_MAX_P``,
only the dropped positions are drawn (:func:`dropped_positions`: about ``p n``
random numbers instead of ``n``, the same distribution); elsewhere the mask
comes from ``torch.nn.functional.dropout`` (one fused kernel on GPU).

The expert computation goes through a *dispatcher*: by default the local bank
(:func:`loramoe_ds.model.experts.local_mixture`); expert parallelism plugs in an
object with the same call signature from outside (``loramoe_ds.parallel``), so
this module never imports DeepSpeed or torch.distributed.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from loramoe_ds.model.experts import ExpertBank, local_mixture
from loramoe_ds.model.router import Router, Routing

#: CPU dropout draws the dropped positions (not a Bernoulli per element) up to this p.
SPARSE_DROPOUT_MAX_P = 0.25


def dropped_positions(n: int, p: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Flat indices zeroed by i.i.d. Bernoulli(p) dropout of ``n`` elements (sorted, unique).

    The gaps between consecutive dropped positions of a Bernoulli(p) sequence
    are i.i.d. geometric, ``P(G >= k) = (1 - p)^k``. They are drawn as
    ``G = floor(X)`` with ``X`` exponential of rate ``-log(1 - p)`` (fp64), since
    ``P(X >= k) = (1 - p)^k``; position ``i_j = i_{j-1} + 1 + G_j``. About
    ``n p`` numbers are drawn (from the default generator, so
    ``torch.manual_seed`` and activation checkpointing's RNG restore reproduce
    them) instead of ``n``, in a handful of ops (they are small, and every op
    costs a thread fork/join on a multi-threaded CPU).

    Args:
        n: Number of elements.
        p: Drop probability in (0, 1).
        device: Device of the draws and of the result.

    Returns:
        int64 positions in ``[0, n)``.
    """
    rate = -math.log1p(-p)
    parts, last = [], -1  # last: the previous dropped position
    while last < n - 1:
        left = n - 1 - last
        m = int(left * p + 6.0 * math.sqrt(left * p) + 16)
        x = torch.empty(m, dtype=torch.float64, device=device).exponential_(rate)
        pos = torch.cumsum(x.floor_().add_(1.0).to(torch.int64), 0).add_(last)
        parts.append(pos)
        last = int(pos[-1])
    pos = parts[0] if len(parts) == 1 else torch.cat(parts)
    return pos[: int(torch.searchsorted(pos, n))]


class _ZeroAt(torch.autograd.Function):
    """``x`` with the flat positions ``drop_P`` set to 0; the backward zeroes the same
    positions of the gradient.

    The backward writes into the incoming gradient when it is a contiguous tensor
    of its own (not a view): the only consumers of the dropped input are the
    expert GEMM / row gather / dispatch, whose backward returns a fresh tensor,
    so this saves a copy of a ``T x D`` gradient per adapted linear.
    """

    @staticmethod
    def forward(ctx, x, drop_P):  # noqa: D102
        ctx.save_for_backward(drop_P)
        out = x.clone(memory_format=torch.contiguous_format)
        out.view(-1).index_fill_(0, drop_P, 0.0)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # noqa: D102
        (drop_P,) = ctx.saved_tensors
        if not g.is_contiguous() or g._base is not None:
            g = g.clone(memory_format=torch.contiguous_format)
        g.view(-1).index_fill_(0, drop_P, 0.0)
        return g, None


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
        dropout: Dropout probability on the expert input (one mask shared by
            all experts).
        router: ``"soft"`` or ``"topk"``.
        top_k: K.
        name: Module path in the base model (for losses, checkpoints, logs).
        layer_idx: Decoder layer index.
        capacity_factor: Top-k capacity factor (``None``: dropless).
        uniform_routing: Debug: uniform gates.
        null_experts: Router slots with no expert (zero delta; docs/design.md,
            "Null experts").
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
        null_experts: int = 0,
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
        self.router = Router(
            self.in_features, num_experts, router, top_k, uniform_routing, null_experts
        )
        self.experts: ExpertBank | None = ExpertBank(
            num_experts, self.in_features, self.out_features, rank
        )
        self.dropout = dropout
        # Plain attributes (not submodules): set from outside per forward / per run.
        self.dispatcher: Dispatcher | None = None
        self.recorder: RoutingRecorder | None = None
        self.topk_impl = "auto"  # experts.TOPK_IMPLS; benchmarks pin one path

    def expert_input(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(x * m, c)`` with ``dropout(x) = c * x * m``; ``(x, 1)`` in eval mode or for p = 0."""
        p = self.dropout
        if p == 0 or not self.training:
            return x_TD, 1.0
        if x_TD.device.type == "cpu" and p <= SPARSE_DROPOUT_MAX_P:
            drop_P = dropped_positions(x_TD.numel(), p, x_TD.device)
            return _ZeroAt.apply(x_TD, drop_P), 1.0 / (1.0 - p)
        return nn.functional.dropout(x_TD, p, training=True), 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, self.in_features)
        # The base sees the 2-D tokens so that its output is a tensor of its own
        # (not a view), which the experts' second GEMM then adds into in place.
        y_TO = self.base(x_TD)
        p = self.dropout
        if self.training and 0 < p <= SPARSE_DROPOUT_MAX_P and x_TD.device.type == "cpu":
            drop_P = dropped_positions(x_TD.numel(), p, x_TD.device)
            routing, xd_TD = self.router(x_TD, drop_P)  # one gradient buffer for both
            keep = 1.0 / (1.0 - p)
        else:
            routing = self.router(x_TD)
            xd_TD, keep = self.expert_input(x_TD)
        scale = self.scaling * keep
        if self.dispatcher is not None:
            out_TO = y_TO + (scale * self.dispatcher(xd_TD, routing)).to(y_TO.dtype)
        else:
            assert self.experts is not None, "expert bank detached but no dispatcher set"
            out_TO = local_mixture(
                self.experts, xd_TD, routing, self.capacity_factor, self.topk_impl, y_TO, scale,
                inplace=y_TO._base is None,
            )  # fmt: skip
        if self.recorder is not None:
            self.recorder.record(self, routing)
        return out_TO.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
            f"null={self.router.num_null}, router={self.router.mode}, scaling={self.scaling:g}"
        )
