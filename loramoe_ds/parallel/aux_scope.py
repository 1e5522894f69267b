"""Auxiliary losses over the global batch: gather per-record sums over data-parallel ranks.

Shape legend: N rows on this rank, M rows over all ranks, X columns, W ranks.

With ``adapter.aux_loss_scope = "global_batch"`` the model hands its additive
aux-loss statistics (LBC per-record sums ``Q`` + record types; load-balance
``count``/``psum``/``n``) to :class:`DPGather` before forming the losses. Every
rank then computes the *same* loss ``L(Z_all)`` of all ranks' records.

Gradient rule (docs/design.md, "Aux losses over the global batch"): the backward
of the gather sums the incoming gradients over ranks and returns this rank's
rows -- the adjoint of an all-gather (a reduce-scatter, done here as one
``all_reduce`` + slice because gloo has no reduce-scatter). Each rank's
``dL/dQ_all`` is identical, so rank r receives ``W * dL/dQ_r``; DeepSpeed's
data-parallel mean (``1/W``) then leaves ``sum_r dL/dQ_r dQ_r/dtheta``: exactly
the gradient of one process holding every rank's samples.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _GatherRows(torch.autograd.Function):
    """All-gather rows (variable count per rank); backward = sum over ranks, own slice."""

    @staticmethod
    def forward(ctx, t_NX: torch.Tensor, group, sizes: list[int], rank: int) -> torch.Tensor:
        n_max = max(sizes)
        pad_NX = t_NX.new_zeros((n_max, *t_NX.shape[1:]))
        pad_NX[: t_NX.shape[0]] = t_NX
        parts = [torch.empty_like(pad_NX) for _ in sizes]
        dist.all_gather(parts, pad_NX.contiguous(), group=group)
        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, g_MX: torch.Tensor):
        g_MX = g_MX.contiguous().clone()
        dist.all_reduce(g_MX, group=ctx.group)
        lo = sum(ctx.sizes[: ctx.rank])
        return g_MX[lo : lo + ctx.sizes[ctx.rank]], None, None, None


class DPGather:
    """Concatenate rows over the data-parallel ranks, differentiably.

    Args:
        group: The data-parallel process group (``None``: the world; every rank
            of loramoe-ds is a data-parallel rank, expert parallelism included).
    """

    def __init__(self, group=None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def __call__(self, t_NX: torch.Tensor) -> torch.Tensor:
        """``(N, X)`` on this rank -> ``(M, X)``, ranks in order (collective)."""
        if self.world == 1:
            return t_NX
        n = torch.tensor([t_NX.shape[0]], dtype=torch.long, device=t_NX.device)
        sizes_W = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes_W, n, group=self.group)
        sizes = [int(s) for s in sizes_W]
        return _GatherRows.apply(t_NX, self.group, sizes, self.rank)
