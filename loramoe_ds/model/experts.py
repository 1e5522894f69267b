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
  (``torch.nn.functional.grouped_mm`` where it runs, else one padded ``bmm``);
  the gates scale the ``N x R`` rows between the two GEMMs.

The bank computes in the dtype of its input (its weights are cast to it; a
no-op when they already match): expert parallelism keeps fp32 master weights
and feeds bf16 rows on GPU, and the gradients flow back to the fp32 weights.

No Python loop over experts on any of these paths.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loramoe_ds.model.router import Routing


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
    ) -> torch.Tensor:
        """Entry point (so ZeRO-3's module hooks gather the bank when it is partitioned).

        Exactly one of ``gates_TE`` (soft: :meth:`soft`, with ``out_TO`` and
        ``scale``) or ``counts_E`` (rows grouped by expert: :meth:`grouped`,
        with ``row_scale_N``) must be given.
        """
        if (gates_TE is None) == (counts_E is None):
            raise ValueError("pass exactly one of gates_TE (soft) or counts_E (grouped)")
        if gates_TE is not None:
            return self.soft(x, gates_TE, out_TO, scale, inplace)
        return self.grouped(x, counts_E, row_scale_N)

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
        self, x_ND: torch.Tensor, counts_E: torch.Tensor, row_scale_N: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``c_n B_e A_e x_n`` for rows already sorted by expert.

        Args:
            x_ND: Rows grouped by expert: the first ``counts_E[0]`` rows go to
                expert 0, the next ``counts_E[1]`` to expert 1, ...; its dtype
                is the compute dtype.
            counts_E: Rows per expert (sums to N).
            row_scale_N: Optional per-row factor ``c_n`` (gate times scale),
                applied to the ``N x R`` rows between the two GEMMs; ``None``: 1.

        Returns:
            ``y_NO`` in the same row order, in ``x``'s dtype.
        """
        dt = x_ND.dtype
        h_NR = grouped_matmul(x_ND, self.lora_A.to(dt).transpose(1, 2), counts_E)
        if row_scale_N is not None:
            h_NR = h_NR * row_scale_N.to(dt)[:, None]
        return grouped_matmul(h_NR, self.lora_B.to(dt), counts_E)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``grouped_mm``'s CPU backward rejects expanded (stride-0) gradients such as
    the one produced by ``y.sum().backward()``.
    """

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        return g.contiguous()


def _grouped_mm_ok(x_NK: torch.Tensor, w_EKM: torch.Tensor) -> bool:
    if not hasattr(torch.nn.functional, "grouped_mm"):
        return False
    if x_NK.dtype != w_EKM.dtype or x_NK.dtype not in (torch.float32, torch.bfloat16):
        return False
    if x_NK.device.type == "cuda" and x_NK.dtype != torch.bfloat16:
        return False  # CUDA grouped GEMM kernels are bf16-only
    size = x_NK.element_size()
    strides = [x_NK.stride(0), *w_EKM.stride()[1:]]
    # grouped GEMM kernels need 16-byte aligned leading strides
    return all((s * size) % 16 == 0 or s == 1 for s in strides) and (
        x_NK.shape[1] * size % 16 == 0 and w_EKM.shape[2] * size % 16 == 0
    )


def grouped_matmul(x_NK: torch.Tensor, w_EKM: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Row-grouped matmul: rows of group e are multiplied by ``w_EKM[e]``.

    Uses ``torch.nn.functional.grouped_mm`` when the dtype and strides allow it,
    otherwise scatters the rows into one padded ``(E, C, K)`` batch and runs a
    single ``bmm``. Both are one kernel launch, not a loop over experts.

    Args:
        x_NK: Rows sorted by group.
        w_EKM: One ``K x M`` matrix per group.
        counts_E: Rows per group.

    Returns:
        ``y_NM``.
    """
    E = w_EKM.shape[0]
    if x_NK.shape[0] == 0:
        return x_NK.new_zeros(0, w_EKM.shape[2]) + 0 * w_EKM.sum()
    if _grouped_mm_ok(x_NK, w_EKM):
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        y_NM = torch.nn.functional.grouped_mm(x_NK, w_EKM, offs=offs_E)
        return _ContiguousGrad.apply(y_NM)
    # Padded bmm fallback.
    counts_E = counts_E.to(torch.long)
    capacity = int(counts_E.max().item())
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    group_N = torch.repeat_interleave(torch.arange(E, device=x_NK.device), counts_E)
    slot_N = torch.arange(x_NK.shape[0], device=x_NK.device) - starts_E[group_N]
    flat_N = group_N * capacity + slot_N
    x_pad = x_NK.new_zeros(E * capacity, x_NK.shape[1]).index_copy(0, flat_N, x_NK)
    y_pad = torch.bmm(x_pad.view(E, capacity, -1), w_EKM)
    return y_pad.view(E * capacity, -1).index_select(0, flat_N)


def sort_by_expert(
    experts_TK: torch.Tensor,
    num_experts: int,
    capacity: int | None = None,
    num_slots: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the (token, slot) assignments by expert (stable: token order within).

    Args:
        experts_TK: Slot index of each (token, slot).
        num_experts: E; slots ``>= E`` are null experts, whose assignments are
            left out (they compute nothing).
        capacity: Optional cap on rows per expert; assignments past it (in token
            order) are dropped.
        num_slots: S = E + N router slots (default E).

    Returns:
        ``order_N``: indices into the flattened ``T*K`` assignments to LoRA
        experts, grouped by expert; ``counts_E``: rows per expert (after the cap).
    """
    flat = experts_TK.reshape(-1)
    order_N = torch.argsort(flat, stable=True)
    counts_E = torch.bincount(flat, minlength=num_slots or num_experts)
    if counts_E.numel() > num_experts:  # null slots sort last: cut them off
        counts_E = counts_E[:num_experts]
        order_N = order_N[: int(counts_E.sum())]
    if capacity is not None:
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        sorted_expert_N = flat[order_N]
        pos_N = torch.arange(order_N.numel(), device=flat.device) - starts_E[sorted_expert_N]
        order_N = order_N[pos_N < capacity]
        counts_E = counts_E.clamp(max=capacity)
    return order_N, counts_E


def topk_capacity(num_tokens: int, top_k: int, num_slots: int, factor: float | None) -> int | None:
    """Tokens per expert allowed by a capacity factor: ``ceil(cf * T * K / S)`` over
    all S router slots (null experts included); ``None`` is dropless."""
    if factor is None:
        return None
    return math.ceil(factor * num_tokens * top_k / num_slots)


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
      ``A`` then ``B``, scale by the gates, scatter-add back (FLOPs ~ T*K*R*(D+O),
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
    token_N = order_N // K
    c_N = routing.gates_TK.reshape(-1).index_select(0, order_N)
    c_N = c_N * scale if scale != 1.0 else c_N
    y_NO = bank(x_TD.index_select(0, token_N), counts_E=counts_E, row_scale_N=c_N)
    if out_TO is None:
        out_TO = y_NO.new_zeros(T, bank.out_features)
    y_NO = y_NO.to(out_TO.dtype)
    return out_TO.index_add_(0, token_N, y_NO) if inplace else out_TO.index_add(0, token_N, y_NO)
