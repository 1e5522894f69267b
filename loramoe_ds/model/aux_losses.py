"""The auxiliary losses of one forward, over every adapted linear (docs/design.md,
"Auxiliary losses").

Shape legend: B rows, S positions, T = B*S tokens, E router slots of one
adapted linear (LoRA experts plus null experts), N records (rows of an
unpacked batch, or segments of packed rows), C columns of gathered per-record
sums.

A :class:`Recorder` is attached to every adapted linear for the duration of one
forward and receives its :class:`~loramoe_ds.model.router.Routing`;
:func:`records_of_batch` numbers the records of the batch; :func:`aux_losses`
turns the recorded routings into the LBC (per adapted linear), the router
supervision loss (mean over adapted linears), the load-balancing loss (per
decoder layer) and the z-loss (per adapted linear). With a gather (``aux_loss_scope
= "global_batch"``) the per-record sums of every adapted linear travel in one
matrix and the load-balance sums of every layer in one vector, so the losses
equal those of one process holding every data-parallel rank's records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from loramoe_ds.config import AdapterConfig
from loramoe_ds.model.losses import (
    lbc_from_sums,
    load_balance_from_sums,
    load_balance_sums,
    record_sums,
    row_segments,
    supervision_from_sums,
    supervision_masks,
    supervision_sums,
    z_loss,
)
from loramoe_ds.model.moe_linear import MoELoRALinear
from loramoe_ds.model.router import Routing


class AuxGather(Protocol):
    """Concatenates rows over the data-parallel ranks (``loramoe_ds.parallel.aux_scope``).

    ``t_NX -> t_MX`` with M the sum of every rank's N; its backward sums the
    incoming gradients over ranks and returns this rank's rows.
    """

    def __call__(self, t_NX: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Recorder:
    """Collects the routing of every adapted linear during one forward."""

    records: dict[str, tuple[MoELoRALinear, Routing]] = field(default_factory=dict)

    def record(self, layer: MoELoRALinear, routing: Routing) -> None:
        # Keyed by module name: a recomputation (activation checkpointing)
        # overwrites instead of double-counting.
        self.records[layer.name] = (layer, routing)


class AuxLosses(NamedTuple):
    """Unweighted auxiliary losses of one forward (fp32 scalars)."""

    lbc: torch.Tensor
    """Sum over adapted linears of the LBC."""
    supervision: torch.Tensor
    """Mean over adapted linears of the router supervision loss."""
    load_balance: torch.Tensor
    """Sum over decoder layers of the load-balancing loss."""
    z: torch.Tensor
    """Sum over adapted linears of the router z-loss."""


def records_of_batch(mask_BS, seq_ids_BS, task_type):
    """Record index of every token and the type of every record.

    Unpacked: record = row (``N = B``; padding gets -1). Packed: record = (row,
    seq id), numbered in row-major order of first appearance.

    Returns:
        ``(seg_T, N, type_N or None)``.
    """
    B, S = mask_BS.shape
    dev = mask_BS.device
    if seq_ids_BS is None:
        seg_T = row_segments(mask_BS)
        type_N = None
        if task_type is not None:
            type_N = task_type.to(dev)
            if type_N.dim() == 2:  # per token: the first real token's value per row
                first_B = mask_BS.long().argmax(dim=1)
                type_N = type_N.gather(1, first_B[:, None])[:, 0]
        return seg_T, B, type_N
    key_T = (torch.arange(B, device=dev)[:, None] * (S + 1) + seq_ids_BS.clamp(min=0)).reshape(-1)
    real_T = (seq_ids_BS >= 0).reshape(-1)
    uniq, inv_T = torch.unique(key_T[real_T], return_inverse=True)
    seg_T = torch.full_like(key_T, -1)
    seg_T[real_T] = inv_T
    n = int(uniq.numel())
    type_N = None
    if task_type is not None:
        tt = task_type.to(dev)
        if tt.dim() == 1:
            tt = tt[:, None].expand(B, S)
        type_N = torch.zeros(n, dtype=torch.long, device=dev)
        type_N[inv_T] = tt.reshape(-1)[real_T].long()
    return seg_T, n, type_N


def aux_losses(
    recorder: Recorder,
    cfg: AdapterConfig,
    mask_T: torch.Tensor,
    seg_T: torch.Tensor,
    n_rec: int,
    type_N: torch.Tensor | None,
    gather: AuxGather | None = None,
) -> AuxLosses:
    """LBC and router supervision (per adapted linear, from per-record sums), load
    balance (per decoder layer), z-loss.

    The per-record columns of every adapted linear -- its ``Q`` (E columns) and,
    when ``cfg.router_supervision_coef > 0``, its two supervision sums -- plus the
    records' token counts and types form one matrix, gathered once; the
    load-balance sums of every layer form one vector, gathered once.

    Raises:
        ValueError: Router supervision on a layer whose downstream group is
            empty (fewer than 2 LoRA experts).
    """
    dev = mask_T.device
    records = list(recorder.records.values())
    zl = torch.zeros((), device=dev)
    for _, routing in records:
        zl = zl + z_loss(routing.logits_TE, mask_T)

    lbc = torch.zeros((), device=dev)
    sup = torch.zeros((), device=dev)
    supervise = cfg.router_supervision_coef > 0
    if type_N is not None and records:
        cols = []
        for layer, r in records:
            cols.append(record_sums(r.probs_TE, seg_T, n_rec))
            if supervise:
                if r.num_experts < 2:
                    raise ValueError(
                        f"{layer.name}: router_supervision_coef > 0 needs a downstream expert "
                        f"group, i.e. at least 2 experts per layer (this one has {r.num_experts})"
                    )
                allow_k, allow_d = supervision_masks(r.num_experts, dev, r.num_null)
                cols.append(supervision_sums(r.logits_TE, allow_k, allow_d, seg_T, n_rec))
        keep_T = seg_T >= 0
        count_N = torch.bincount(seg_T[keep_T], minlength=n_rec).to(cols[0])
        m_NC = torch.cat([*cols, count_N[:, None], type_N.to(cols[0])[:, None]], 1)
        if gather is not None:
            m_NC = gather(m_NC)
        count_N, type_N = m_NC[:, -2], m_NC[:, -1].round().long()
        col = 0
        for _, routing in records:
            S = routing.num_slots
            q_NE = m_NC[:, col : col + S]
            col += S
            lbc = lbc + lbc_from_sums(
                q_NE, type_N, cfg.lbc_delta, cfg.lbc_variant, num_null=routing.num_null
            )
            if supervise:
                sup = sup + supervision_from_sums(m_NC[:, col : col + 2], count_N, type_N)
                col += 2
        sup = sup / len(records)

    by_layer: dict[int, list[Routing]] = {}
    for layer, routing in records:
        by_layer.setdefault(layer.layer_idx, []).append(routing)
    sums, shapes = [], []
    for routings in by_layer.values():
        probs = torch.cat([r.probs_TE for r in routings])
        experts = None if routings[0].is_soft else torch.cat([r.experts_TK for r in routings])
        sums.append(load_balance_sums(probs, experts, mask_T.repeat(len(routings))))
        shapes.append((routings[0].num_slots, 1 if experts is None else experts.shape[-1]))
    lb = torch.zeros((), device=dev)
    if sums:
        flat_X = torch.cat(sums)
        if gather is not None:
            flat_X = gather(flat_X[None]).sum(0)
        off = 0
        for E, K in shapes:
            lb = lb + load_balance_from_sums(flat_X[off : off + 2 * E + 1], E, K)
            off += 2 * E + 1
    return AuxLosses(lbc, sup, lb, zl)
