"""Expert-parallel token dispatch: all-to-all autograd functions and the EP dispatcher.

Shape legend: T local tokens, D input dim, O output dim, E experts of the layer,
P EP ranks (``ep_size``), L = E/P experts held per rank, K top-k,
N (token, slot) rows sent by this rank, M rows received by this rank.

Each EP rank holds experts ``[p*L, (p+1)*L)`` of a layer (global id
``e = p*L + i``) in a local :class:`~loramoe_ds.model.experts.ExpertBank` that is
*not* registered in the model (so neither ZeRO nor the engine's optimizer sees
it). :class:`EPDispatcher` plugs into
:class:`~loramoe_ds.model.moe_linear.MoELoRALinear` through its ``dispatcher``
attribute and returns ``sum_k g_k B_{e_k} A_{e_k} x`` for the layer's T local
tokens, exactly what the local bank would (dropless):

Top-k (MoLA)::

    sort (token, slot) rows by global expert -> rows for rank q = e // L are contiguous
    all_to_all_single(counts_E)                      # per-expert counts, one call
    all_to_all_single(x rows, variable splits)       # forward, reversed in backward
    regroup received rows by local expert -> grouped GEMM (A, then B) on the shard
    reverse all_to_all_single(y rows) -> y_N * g_N -> combine_topk into y_TO (deterministic)

Soft (LoRAMoE): every token goes to every expert, so each token is sent *once*
per EP rank together with that rank's slice of its gates ``g[:, qL:(q+1)L]``
(one message ``[x | g]`` of width D+L); rank q computes the partial mixture
``sum_{e in shard q} g_e B_e A_e x`` with the fused two-GEMM path and the
partials come back and are summed: ``y = sum_q partial_q``.

Gradients flow through the all-to-alls (custom autograd functions whose backward
is the reverse all-to-all), so every EP rank's loss reaches each expert's grad:
the expert grad on one rank is the sum over its EP group. Summed again over the
EDP group and divided by the world size W it is the data-parallel average
(see :mod:`loramoe_ds.parallel.engine`).

Only ``all_to_all_single`` is used (gloo has no list ``all_to_all`` with
unequal sizes). Sync budget: one device->host read per adapted linear per
forward -- the split sizes of the row all-to-all (``.tolist()`` of the sent and
received counts together); nothing else in the dropless dispatch reads the
device (docs/design.md, "Device->host syncs"). A capacity factor adds one.

The bank's dtype is the master dtype (fp32, its own optimizer);
the expert GEMMs run in the *activation* dtype: the received rows stay as they
arrive (bf16 on GPU) and the bank casts its weights down to them
(:class:`~loramoe_ds.model.experts.ExpertBank`), so the gradients flow back to
the fp32 weights through that cast. With fp32 activations every cast is a no-op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from loramoe_ds.model.experts import ExpertBank
from loramoe_ds.model.router import Routing
from loramoe_ds.model.topk import combine_topk, gather_topk, sort_by_expert, topk_capacity


@dataclass
class CommStats:
    """Bytes sent by this rank's all-to-alls (forward and backward).

    Attributes:
        bytes_total: All rows handed to ``all_to_all_single`` (incl. the rows a
            rank "sends" to itself, which are a local copy).
        bytes_remote: Rows that actually leave the rank.
        calls: Number of all-to-all calls (counts exchanges included).
    """

    bytes_total: int = 0
    bytes_remote: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.bytes_total = self.bytes_remote = self.calls = 0


def _account(stats: CommStats | None, x: torch.Tensor, in_splits: list[int], me: int) -> None:
    if stats is None:
        return
    row = math.prod(x.shape[1:]) * x.element_size()
    total = sum(in_splits)
    stats.bytes_total += total * row
    stats.bytes_remote += (total - in_splits[me]) * row
    stats.calls += 1


def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(
        out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group
    )
    return out


class _AllToAll(torch.autograd.Function):
    """Variable-split ``all_to_all_single`` along dim 0; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, stats, me):  # noqa: D102
        ctx.splits = (out_splits, in_splits)
        ctx.group, ctx.stats, ctx.me = group, stats, me
        _account(stats, x, in_splits, me)
        return _a2a(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        out_splits, in_splits = ctx.splits
        _account(ctx.stats, g, out_splits, ctx.me)
        return _a2a(g, in_splits, out_splits, ctx.group), None, None, None, None, None


def all_to_all(
    x: torch.Tensor,
    out_splits: list[int],
    in_splits: list[int],
    group,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """Differentiable variable-split all-to-all of the rows of ``x``.

    Args:
        x: Rows to send, grouped by destination: the first ``in_splits[0]`` rows
            go to group rank 0, and so on.
        out_splits: Rows to receive from each group rank.
        in_splits: Rows to send to each group rank.
        group: The process group.
        stats: Optional byte counter.

    Returns:
        The received rows, grouped by source rank.
    """
    me = dist.get_rank(group)
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group, stats, me)


def exchange_counts(counts: torch.Tensor, group, stats: CommStats | None = None) -> torch.Tensor:
    """``all_to_all_single`` of an int64 vector of ``P * c`` counts (c per destination).

    Returns:
        The ``P * c`` counts this rank receives (c from each source rank).
    """
    counts = counts.to(torch.int64).contiguous()
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts, group=group)
    if stats is not None:
        stats.calls += 1
    return out


class EPDispatcher:
    """The expert-parallel dispatcher of one adapted linear (a plain object, no submodule).

    Args:
        bank: The local shard: experts ``[ep_rank*L, (ep_rank+1)*L)`` of the layer.
        num_experts: E, the layer's global expert count.
        ep_group: The EP process group (P ranks).
        ep_size: P.
        ep_rank: This rank's index in the EP group.
        capacity_factor: Top-k capacity factor applied to this rank's T tokens
            before dispatch (exactly as the local path does); ``None``: dropless.
        stats: Shared byte counter.
    """

    def __init__(
        self,
        bank: ExpertBank,
        num_experts: int,
        ep_group,
        ep_size: int,
        ep_rank: int,
        capacity_factor: float | None = None,
        stats: CommStats | None = None,
    ):
        if num_experts % ep_size or bank.num_experts != num_experts // ep_size:
            raise ValueError(
                f"bank holds {bank.num_experts} experts; expected E/P = {num_experts}/{ep_size}"
            )
        self.bank = bank
        self.num_experts = num_experts
        self.group = ep_group
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.capacity_factor = capacity_factor
        self.stats = stats

    @property
    def num_local(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def first_expert(self) -> int:
        """Global id of the first local expert: ``ep_rank * L``."""
        return self.ep_rank * self.num_local

    def __call__(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """``sum_k g_k B_{e_k} A_{e_k} x`` (unscaled) for this rank's T tokens.

        Args:
            x_TD: Expert input (after dropout).
            routing: The layer's routing of the T tokens (global expert ids).

        Returns:
            ``y_TO`` in ``x_TD``'s dtype.
        """
        if routing.num_experts != self.num_experts:
            raise ValueError(
                f"routing over {routing.num_experts} experts, dispatcher built for "
                f"{self.num_experts}"
            )
        if routing.is_soft:
            return self._soft(x_TD, routing.gates_TK)
        return self._topk(x_TD, routing)

    # -- soft: every token to every EP rank, with that rank's gate slice -------
    def _soft(self, x_TD: torch.Tensor, gates_TE: torch.Tensor) -> torch.Tensor:
        P, L = self.ep_size, self.num_local
        T, D = x_TD.shape
        send_P = torch.full((P,), T, dtype=torch.int64, device=x_TD.device)
        recv_P = exchange_counts(send_P, self.group, self.stats)
        send, recv = [T] * P, recv_P.tolist()  # the one device->host read
        # Gates travel in the activation dtype: the local path casts them to it too.
        g_PTL = gates_TE.to(x_TD.dtype).view(T, P, L).transpose(0, 1)
        x_PTD = x_TD.unsqueeze(0).expand(P, T, D)
        msg_NX = torch.cat([x_PTD, g_PTL], dim=-1).reshape(P * T, D + L)
        got_MX = all_to_all(msg_NX, recv, send, self.group, self.stats)
        xr_MD, gr_ML = got_MX.split([D, L], dim=-1)
        y_MO = self.bank(xr_MD, gates_TE=gr_ML)  # in the activation dtype
        back_NO = all_to_all(y_MO, send, recv, self.group, self.stats)
        return back_NO.view(P, T, -1).sum(0)

    # -- top-k: rows sorted by global expert, rank = expert // L ---------------
    def _topk(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        P, L, E = self.ep_size, self.num_local, self.num_experts
        T, K = routing.experts_TK.shape
        cap = topk_capacity(T, K, routing.num_slots, self.capacity_factor)
        order_N, counts_E = sort_by_expert(
            routing.experts_TK, E, cap, routing.num_slots, trim=False
        )
        recv_PL = exchange_counts(counts_E, self.group, self.stats).view(P, L)
        # The one device->host read: what this rank sends to each rank, and what
        # it receives from each (rank, local expert).
        host = torch.cat([counts_E.view(P, L).sum(1), recv_PL.reshape(-1)]).tolist()
        send, recv_ql = host[:P], host[P:]
        recv = [sum(recv_ql[q * L : (q + 1) * L]) for q in range(P)]
        local_E = [sum(recv_ql[q * L + i] for q in range(P)) for i in range(L)]
        order_N = order_N[: sum(send)]  # null-expert assignments sort last: cut
        xs_ND = gather_topk(x_TD, order_N, K)  # backward: the deterministic combine
        xr_MD = all_to_all(xs_ND, recv, send, self.group, self.stats)
        # Received rows are ordered (source q, local expert i); the grouped GEMM
        # wants them ordered (i, q): a stable sort on the key i*P + q.
        dev = recv_PL.device
        key_PL = torch.arange(L, device=dev).view(1, L) * P + torch.arange(P, device=dev).view(P, 1)
        key_M = torch.repeat_interleave(
            key_PL.reshape(-1), recv_PL.reshape(-1), output_size=sum(recv)
        )
        perm_M = torch.argsort(key_M, stable=True)
        y_MO = self.bank(
            xr_MD.index_select(0, perm_M),
            counts_E=recv_PL.sum(0),
            max_rows=max(local_E, default=0),
        )
        y_MO = torch.empty_like(y_MO).index_copy(0, perm_M, y_MO)
        ys_NO = all_to_all(y_MO, send, recv, self.group, self.stats)
        g_N = routing.gates_TK.reshape(-1).index_select(0, order_N).to(ys_NO.dtype)
        return combine_topk(ys_NO * g_N[:, None], order_N, T, K)
