"""Fused low-rank expert compute: a bank of E LoRA experts computed in a few GEMMs.

Shape legend: T tokens, N routed (token, slot) rows, D input dim, O output dim,
E experts, R LoRA rank, K experts per token.

Expert ``e`` maps ``x -> B_e A_e x`` with ``A_e: R x D`` and ``B_e: O x R``.
The bank stores ``a_ERD`` (so ``A_cat = a_ERD.view(E*R, D)`` is the paper's
``[A_1; ...; A_E]``) and ``b_ERO`` (so ``b_ERO.view(E*R, O)`` is ``B_cat^T``).

* Soft routing (every token, every expert): two GEMMs,
  ``h = x @ A_cat^T``, scale each R-wide block of ``h`` by ``s * g_e``,
  ``y = y0 + h @ B_cat^T`` (docs/design.md, "Fused experts"). The LoRA scale ``s`` and the gates
  are applied to the thin ``T x E*R`` matrix ``h`` and the base output ``y0`` is
  added by the second GEMM itself (``addmm``), so no extra pass over a
  ``T x O`` tensor is made for either.
* Top-k routing: rows sorted by expert, one grouped GEMM per factor
  (:mod:`loramoe_ds.model.grouped_mm`: ``grouped_mm`` where it runs, else one
  padded ``bmm``); the gates scale the ``N x R`` rows between the two GEMMs.
  The rows come back to their tokens by
  :func:`~loramoe_ds.model.topk.combine_topk`: written to their (token, slot) place
  and summed over the K slots in slot order -- deterministic on every device
  (``index_add`` is not on CUDA, and a recomputed forward that differed in the
  last bit could flip a near-tied top-k choice; docs/design.md, "Determinism").

The bank computes in the dtype of its input (its weights are cast to it; a
no-op when they already match): expert parallelism keeps fp32 master weights
and feeds bf16 rows on GPU, and the gradients flow back to the fp32 weights.

No Python loop over experts on any of these paths.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loramoe_ds.model.grouped_mm import aligned_rows, group_align_rows, grouped_matmul
from loramoe_ds.model.router import Routing
from loramoe_ds.model.topk import combine_topk, gather_topk, sort_by_expert, topk_capacity


class ExpertBank(nn.Module):
    """E LoRA experts of one adapted linear.

    Args:
        num_experts: E.
        in_features: D.
        out_features: O.
        rank: R.

    ``A`` is Kaiming-uniform initialised (as ``nn.Linear`` and peft's LoRA), ``B``
    is zero, so the adapted model equals the base model at step 0.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, rank, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Per-expert Kaiming-uniform over fan_in = D (same bound as nn.Linear(D, R)).
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound)
            self.lora_B.zero_()

    def forward(
        self,
        x: torch.Tensor,
        gates_TE: torch.Tensor | None = None,
        counts_E: torch.Tensor | None = None,
        *,
        out_TO: torch.Tensor | None = None,
        scale: float = 1.0,
        row_scale_N: torch.Tensor | None = None,
        inplace: bool = False,
        max_rows: int | None = None,
    ) -> torch.Tensor:
        """Entry point (so ZeRO-3's module hooks gather the bank when it is partitioned).

        Exactly one of ``gates_TE`` (soft: :meth:`soft`, with ``out_TO`` and
        ``scale``) or ``counts_E`` (rows grouped by expert: :meth:`grouped`,
        with ``row_scale_N`` and ``max_rows``) must be given.
        """
        if (gates_TE is None) == (counts_E is None):
            raise ValueError("pass exactly one of gates_TE (soft) or counts_E (grouped)")
        if gates_TE is not None:
            return self.soft(x, gates_TE, out_TO, scale, inplace)
        return self.grouped(x, counts_E, row_scale_N, max_rows)

    def soft(
        self,
        x_TD: torch.Tensor,
        gates_TE: torch.Tensor,
        out_TO: torch.Tensor | None = None,
        scale: float = 1.0,
        inplace: bool = False,
    ) -> torch.Tensor:
        """``out + scale * sum_e g_e B_e A_e x`` for every token: two GEMMs.

        ``h = x A_cat^T`` (``T x E*R``), each R-wide block scaled by
        ``scale * g_e``, then ``addmm(out, h, B_cat^T)``: the scale, the gates
        and the residual add cost nothing over a ``T x O`` tensor.

        Args:
            x_TD: Expert input (after dropout); its dtype is the compute dtype.
            gates_TE: Mixing weights (any float dtype; ``scale * g`` is formed
                in the gates' dtype, then cast to ``x``'s).
            out_TO: Added to the result (the base output); ``None``: zeros.
            scale: Factor on the mixture (the LoRA ``alpha / r``, times the
                dropout's ``1 / (1 - p)`` when the caller left it out of ``x``).
            inplace: Add into ``out_TO`` itself (``addmm_``; the caller owns it
                and nothing saved it for a backward) instead of a new tensor.

        Returns:
            ``y_TO`` in ``x``'s dtype (``out_TO``'s when it is given).
        """
        a_XD = self.lora_A.reshape(-1, self.in_features).to(x_TD.dtype)
        return self.up(x_TD @ a_XD.t(), gates_TE, out_TO, scale, inplace)

    def up(
        self,
        h_TX: torch.Tensor,
        gates_TE: torch.Tensor,
        out_TO: torch.Tensor | None = None,
        scale: float = 1.0,
        inplace: bool = False,
    ) -> torch.Tensor:
        """The second half of :meth:`soft`, from ``h = x A_cat^T`` (``T x E*R``)."""
        E, R, dt = self.num_experts, self.rank, h_TX.dtype
        b_XO = self.lora_B.reshape(E * R, self.out_features).to(dt)
        g_TE = gates_TE * scale if scale != 1.0 else gates_TE
        h_TX = (h_TX.reshape(-1, E, R) * g_TE.to(dt).unsqueeze(-1)).view(-1, E * R)
        if out_TO is None:
            return h_TX @ b_XO
        if out_TO.dtype != dt:
            return out_TO + (h_TX @ b_XO).to(out_TO.dtype)
        return out_TO.addmm_(h_TX, b_XO) if inplace else torch.addmm(out_TO, h_TX, b_XO)

    def grouped(
        self,
        x_ND: torch.Tensor,
        counts_E: torch.Tensor,
        row_scale_N: torch.Tensor | None = None,
        max_rows: int | None = None,
    ) -> torch.Tensor:
        """``c_n B_e A_e x_n`` for rows already sorted by expert.

        Where ``grouped_mm`` runs on a GPU, each expert's rows are first padded
        with zero rows to a multiple of :data:`GROUP_ALIGN_ROWS` (so every group
        of the weight-gradient GEMM starts 16-byte aligned), and the padding is
        dropped again at the end; the result is the same.

        Args:
            x_ND: Rows grouped by expert: the first ``counts_E[0]`` rows go to
                expert 0, the next ``counts_E[1]`` to expert 1, ...; its dtype
                is the compute dtype.
            counts_E: Rows per expert (sums to N).
            row_scale_N: Optional per-row factor ``c_n`` (gate times scale),
                applied to the ``N x R`` rows between the two GEMMs; ``None``: 1.
            max_rows: ``max(counts_E)`` when the caller knows it on the host
                (saves the padded-``bmm`` fallback its device->host read).

        Returns:
            ``y_NO`` in the same row order, in ``x``'s dtype.
        """
        dt = x_ND.dtype
        a_EDR = self.lora_A.to(dt).transpose(1, 2)
        b_ERO = self.lora_B.to(dt)
        align = group_align_rows(x_ND, a_EDR, b_ERO)
        if align > 1:
            max_rows = None  # counts change; grouped_mm needs no maximum
            dest_N, counts_E = aligned_rows(counts_E, align, x_ND.shape[0])
            x_ND = x_ND.new_zeros(
                x_ND.shape[0] + align * self.num_experts, x_ND.shape[1]
            ).index_copy(0, dest_N, x_ND)
            if row_scale_N is not None:
                row_scale_N = row_scale_N.new_zeros(x_ND.shape[0]).index_copy(
                    0, dest_N, row_scale_N
                )
        h_NR = grouped_matmul(x_ND, a_EDR, counts_E, max_rows)
        if row_scale_N is not None:
            h_NR = h_NR * row_scale_N.to(dt)[:, None]
        y_NO = grouped_matmul(h_NR, b_ERO, counts_E, max_rows)
        return y_NO.index_select(0, dest_N) if align > 1 else y_NO


#: ``topk_impl="auto"`` uses the dense masked path when the whole bank is this
#: narrow (E*R <= 256): LoRA experts are so thin that computing every expert and
#: zeroing the unselected gates costs less than gathering/scattering T*K rows of
#: width D and O (see docs/benchmarks.md).
DENSE_TOPK_MAX_WIDTH = 256
TOPK_IMPLS = ("auto", "dense", "grouped")


def dense_gates(
    gates_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    num_experts: int,
    keep_N: torch.Tensor | None,
    num_slots: int | None = None,
) -> torch.Tensor:
    """Scatter top-k gates into a dense ``(T, E)`` matrix (zeros for unselected experts).

    Args:
        gates_TK: Renormalised top-k gates.
        experts_TK: Their slot indices.
        num_experts: E (the columns returned; null slots ``>= E`` are dropped).
        keep_N: Optional bool mask over the flattened ``T*K`` assignments
            (capacity-dropped assignments get gate 0).
        num_slots: S = E + N router slots (default E).
    """
    g_TK = gates_TK if keep_N is None else gates_TK * keep_N.view_as(gates_TK)
    g_TS = g_TK.new_zeros(g_TK.shape[0], num_slots or num_experts).scatter_add(1, experts_TK, g_TK)
    return g_TS[:, :num_experts]


def local_mixture(
    bank: ExpertBank,
    x_TD: torch.Tensor,
    routing: Routing,
    capacity_factor: float | None = None,
    topk_impl: str = "auto",
    out_TO: torch.Tensor | None = None,
    scale: float = 1.0,
    inplace: bool = False,
) -> torch.Tensor:
    """All experts on this device: ``out + scale * sum_k g_k B_{e_k} A_{e_k} x`` per token.

    Top-k has two exact implementations of the same function:

    * ``grouped``: sort the (token, slot) rows by expert, grouped GEMM through
      ``A`` then ``B``, scale by the gates, :func:`combine_topk` back (FLOPs ~ T*K*R*(D+O),
      plus moving T*K rows of width D and O);
    * ``dense``: the soft path's two GEMMs with the top-k gates scattered into a
      dense ``(T, E)`` gate matrix, zeros elsewhere (FLOPs ~ T*E*R*(D+O), no row
      gathers). Unselected experts get exactly zero gradient from a token.

    Null experts (slots ``>= E`` of ``routing``) contribute nothing on every
    path: soft gates cover the E experts only; top-k assignments to a null slot
    get no row (grouped) or no column (dense).

    Args:
        bank: The experts.
        x_TD: Expert input (after dropout).
        routing: Gates (and, for top-k, expert indices).
        capacity_factor: Top-k only; ``None`` is dropless.
        topk_impl: ``auto`` (dense when ``E*R <= DENSE_TOPK_MAX_WIDTH``),
            ``dense`` or ``grouped``.
        out_TO: Added to the result (the base output, so that the sum costs no
            extra pass); ``None``: zeros.
        scale: Factor on the mixture (folded into the gates).
        inplace: ``out_TO`` is the caller's scratch tensor, updated in place.

    Returns:
        ``y_TO``.
    """
    if routing.is_soft:
        return bank(x_TD, gates_TE=routing.gates_TK, out_TO=out_TO, scale=scale, inplace=inplace)
    if topk_impl not in TOPK_IMPLS:
        raise ValueError(f"topk_impl={topk_impl!r}: valid values {list(TOPK_IMPLS)}")
    T, K = routing.experts_TK.shape
    E, S = bank.num_experts, routing.num_slots
    cap = topk_capacity(T, K, S, capacity_factor)
    dense = topk_impl == "dense" or (topk_impl == "auto" and E * bank.rank <= DENSE_TOPK_MAX_WIDTH)
    if dense:
        keep_N = None
        if cap is not None:
            order_N, _ = sort_by_expert(routing.experts_TK, E, cap, S)
            keep_N = torch.zeros(T * K, dtype=torch.bool, device=x_TD.device)
            keep_N[order_N] = True
        g_TE = dense_gates(routing.gates_TK, routing.experts_TK, E, keep_N, S)
        return bank(x_TD, gates_TE=g_TE, out_TO=out_TO, scale=scale, inplace=inplace)
    order_N, counts_E = sort_by_expert(routing.experts_TK, E, cap, S)
    c_N = routing.gates_TK.reshape(-1).index_select(0, order_N)
    c_N = c_N * scale if scale != 1.0 else c_N
    y_NO = bank(gather_topk(x_TD, order_N, K), counts_E=counts_E, row_scale_N=c_N)
    return combine_topk(y_NO, order_N, T, K, out_TO, inplace)
