"""Top-k routing's row bookkeeping: assignments sorted by expert, rows gathered to them
and combined back to their tokens, and the capacity factor.

Shape legend (as :mod:`loramoe_ds.model.experts`): T tokens, K experts per
token, N routed (token, slot) rows, D input and O output width.
:func:`combine_topk` writes each row to its (token, slot) place and sums the K
slots in slot order: deterministic on every device (docs/design.md,
"Determinism"); :func:`gather_topk`'s backward is that same combine.
"""

from __future__ import annotations

import math

import torch


def sort_by_expert(
    experts_TK: torch.Tensor,
    num_experts: int,
    capacity: int | None = None,
    num_slots: int | None = None,
    *,
    trim: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the (token, slot) assignments by expert (stable: token order within).

    Args:
        experts_TK: Slot index of each (token, slot).
        num_experts: E; slots ``>= E`` are null experts, whose assignments are
            left out (they compute nothing).
        capacity: Optional cap on rows per expert; assignments past it (in token
            order) are dropped.
        num_slots: S = E + N router slots (default E).
        trim: Cut the null-expert assignments off ``order_N`` here (one
            device->host read of their number). ``False`` (dropless only):
            return every assignment, null ones last, for a caller that cuts at
            ``sum(counts_E)`` once it holds the counts on the host anyway.

    Returns:
        ``order_N``: indices into the flattened ``T*K`` assignments to LoRA
        experts, grouped by expert; ``counts_E``: rows per expert (after the cap).
    """
    flat = experts_TK.reshape(-1)
    order_N = torch.argsort(flat, stable=True)
    # A scatter of ones, not bincount: bincount reads max(flat) back to the host on CUDA.
    counts_E = torch.zeros(num_slots or num_experts, dtype=torch.long, device=flat.device)
    counts_E = counts_E.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.long))
    if counts_E.numel() > num_experts:  # null slots sort last: cut them off
        counts_E = counts_E[:num_experts]
        if trim or capacity is not None:
            order_N = order_N[: int(counts_E.sum())]
    if capacity is not None:
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        sorted_expert_N = flat[order_N]
        pos_N = torch.arange(order_N.numel(), device=flat.device) - starts_E[sorted_expert_N]
        order_N = order_N[pos_N < capacity]
        counts_E = counts_E.clamp(max=capacity)
    return order_N, counts_E


class _GatherTopk(torch.autograd.Function):
    """``x[order_N // K]`` whose backward is :func:`combine_topk` (deterministic),
    not ``index_select``'s scatter-add over tokens."""

    @staticmethod
    def forward(ctx, x_TD, order_N, top_k):  # noqa: D102
        ctx.save_for_backward(order_N)
        ctx.T, ctx.K = x_TD.shape[0], top_k
        return x_TD.index_select(0, order_N // top_k)

    @staticmethod
    def backward(ctx, g_ND):  # noqa: D102
        (order_N,) = ctx.saved_tensors
        return combine_topk(g_ND.contiguous(), order_N, ctx.T, ctx.K), None, None


def gather_topk(x_TD: torch.Tensor, order_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """The token row of each kept (token, slot) assignment: ``x[order_N // K]``.

    The adjoint of :func:`combine_topk`, and its backward *is* that combine, so
    the input gradient is as deterministic as the forward.
    """
    return _GatherTopk.apply(x_TD, order_N, top_k)


def combine_topk(
    y_NO: torch.Tensor,
    order_N: torch.Tensor,
    num_tokens: int,
    top_k: int,
    out_TO: torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """``out_t + sum_k y[(t, k)]``: expert rows back to their tokens, deterministically.

    Row ``n`` belongs to assignment ``order_N[n]`` of the flattened ``T*K``
    (token, slot) grid (distinct entries; assignments with no row -- null
    experts, capacity drops -- contribute zero). The rows are *written* to their
    grid place (``index_put_`` of distinct indices: each place written once; its backward is a
    gather) and summed over the K slots in slot order (``view(T, K, O).sum(1)``).
    The result is therefore bitwise independent of the order of the rows and of
    the device's scheduling, unlike an ``index_add`` scatter-add, whose
    accumulation order on CUDA is not fixed.

    Args:
        y_NO: Expert outputs, one row per kept assignment (gates already applied).
        order_N: Each row's index into the ``T*K`` assignments.
        num_tokens: T.
        top_k: K.
        out_TO: Added to the result (e.g. the base output); ``None``: zeros.
        inplace: Add into ``out_TO`` itself.

    Returns:
        ``y_TO`` (``out_TO``'s dtype when it is given, else ``y_NO``'s).
    """
    O = y_NO.shape[1]
    y_TKO = y_NO.new_zeros(num_tokens * top_k, O).index_put_((order_N,), y_NO)
    y_TO = y_TKO.view(num_tokens, top_k, O).sum(1)
    if out_TO is None:
        return y_TO
    y_TO = y_TO.to(out_TO.dtype)
    return out_TO.add_(y_TO) if inplace else out_TO + y_TO


def topk_capacity(num_tokens: int, top_k: int, num_slots: int, factor: float | None) -> int | None:
    """Tokens per expert allowed by a capacity factor: ``ceil(cf * T * K / S)`` over
    all S router slots (null experts included); ``None`` is dropless."""
    if factor is None:
        return None
    return math.ceil(factor * num_tokens * top_k / num_slots)
