"""Token routers: dense soft routing (LoRAMoE) and top-k routing (MoLA).

Shape legend: T tokens, D input dim, E LoRA experts, N null experts, S = E + N
router slots, K experts per token.

Null experts (docs/design.md, "Null experts") are router slots ``[E, E+N)``
with no LoRA expert behind them: they take part in the softmax (and top-k), so
their weight is taken away from the experts, but nothing is computed for them.

The router is a bias-free linear ``W_r: E x D`` applied to the *undropped*
input; its logits and the softmax are computed in fp32 whatever the activation
dtype (docs/design.md, "Routers"). The fp32 copy of a low-precision activation is
transient: the backward keeps the activation the base linear keeps anyway
(:class:`_RouterLogits`), not a second fp32 copy of it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Routing(NamedTuple):
    """The routing decision for T tokens of one adapted linear.

    A ``NamedTuple`` (not a dataclass) so that ZeRO-3's module hooks, which walk
    tuples/lists/dicts of a module's outputs, see the tensors and gather the
    router weight again for its backward.

    Attributes:
        logits_TE: fp32 router logits over all S slots (``_TE`` names the slot
            axis; S = E when there are no null experts).
        probs_TE: fp32 softmax of the logits over all S slots (the ``w`` of the
            aux losses).
        gates_TK: fp32 mixing weights of the LoRA experts. Soft: the first E
            columns of ``probs_TE`` (K == E; the null slots' weight is what the
            experts lose). Top-k: the k largest probabilities over all slots,
            renormalised to sum to 1 (k >= 2); for k = 1 the largest
            probability itself (Switch).
        experts_TK: Slot index of each gate (top-k; ``>= E`` is a null expert,
            which computes nothing); ``None`` for soft routing, where gate ``k``
            belongs to expert ``k``.
        num_null: N, the null slots at the end of the slot axis.
    """

    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    gates_TK: torch.Tensor
    experts_TK: torch.Tensor | None = None
    num_null: int = 0

    @property
    def num_slots(self) -> int:
        """S = E + N: the width of ``logits_TE`` / ``probs_TE``."""
        return self.probs_TE.shape[-1]

    @property
    def num_experts(self) -> int:
        """E: the LoRA experts (slots ``[0, E)``)."""
        return self.probs_TE.shape[-1] - self.num_null

    @property
    def is_soft(self) -> bool:
        return self.experts_TK is None


class _RouterLogits(torch.autograd.Function):
    """``logits_TE = x_TD @ W_r^T`` in fp32 (fp64 stays fp64), saving ``x`` in its own dtype.

    ``F.linear(x.float(), w.float())`` would keep the fp32 copy of a bf16
    ``x`` (2x the activation) alive until the backward, per adapted linear; here
    the upcast is redone in the backward instead. In fp32 the two are the same
    GEMMs.
    """

    @staticmethod
    def forward(ctx, x_TD, w_ED):  # noqa: D102
        acc = torch.promote_types(torch.promote_types(x_TD.dtype, w_ED.dtype), torch.float32)
        w32_ED = w_ED.to(acc)
        ctx.save_for_backward(x_TD, w32_ED)
        ctx.w_dtype = w_ED.dtype
        return torch.nn.functional.linear(x_TD.to(acc), w32_ED)

    @staticmethod
    def backward(ctx, g_TE):  # noqa: D102
        x_TD, w32_ED = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = (g_TE @ w32_ED).to(x_TD.dtype)
        if ctx.needs_input_grad[1]:
            gw = (g_TE.t() @ x_TD.to(w32_ED.dtype)).to(ctx.w_dtype)
        return gx, gw


class _RouterLogitsAndDrop(torch.autograd.Function):
    """:class:`_RouterLogits` plus the experts' input ``x`` with the flat positions
    ``drop_P`` zeroed (the CPU sparse dropout of the adapted linear).

    Both consume ``x``; as one node their input gradients share one buffer: the
    experts' gradient (written in place when it is a fresh contiguous tensor,
    zeroed at ``drop_P``) receives the router's ``g_logits W_r`` through one
    ``addmm_``, instead of a separate ``T x D`` gradient and an accumulation pass.
    """

    @staticmethod
    def forward(ctx, x_TD, w_ED, drop_P):  # noqa: D102
        acc = torch.promote_types(torch.promote_types(x_TD.dtype, w_ED.dtype), torch.float32)
        w32_ED = w_ED.to(acc)
        ctx.save_for_backward(x_TD, w32_ED, drop_P)
        ctx.w_dtype = w_ED.dtype
        xd_TD = x_TD.clone(memory_format=torch.contiguous_format)
        xd_TD.view(-1).index_fill_(0, drop_P, 0.0)
        return torch.nn.functional.linear(x_TD.to(acc), w32_ED), xd_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_TE, g_TD):  # noqa: D102
        x_TD, w32_ED, drop_P = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            if g_TD is None:
                gx = torch.zeros_like(x_TD)
            elif not g_TD.is_contiguous() or g_TD._base is not None:
                gx = g_TD.clone(memory_format=torch.contiguous_format)
            else:
                gx = g_TD  # fresh from the experts' GEMM / gather: ours to overwrite
            gx.view(-1).index_fill_(0, drop_P, 0.0)
            if g_TE is not None:
                if gx.dtype == w32_ED.dtype:
                    gx.addmm_(g_TE, w32_ED)
                else:
                    gx.add_((g_TE @ w32_ED).to(gx.dtype))
        if ctx.needs_input_grad[1] and g_TE is not None:
            gw = (g_TE.t() @ x_TD.to(w32_ED.dtype)).to(ctx.w_dtype)
        return gx, gw, None


class Router(nn.Module):
    """Per-token gate over E LoRA experts and N null experts (S = E + N slots).

    ``soft`` (LoRAMoE, Dou et al. 2023): ``g = softmax(W_r x)`` over all experts.
    ``topk`` (MoLA, Gao et al. 2024): ``p = softmax(W_r x)``, keep the ``k``
    largest, renormalise: ``g_i = p_i / sum_{j in topk} p_j`` for ``k >= 2``.
    For ``k = 1`` the renormalised gate would be 1 for every token, so the LM
    loss would give the router no gradient; top-1 therefore uses the
    un-renormalised probability ``g = p_max`` (the Switch Transformer
    convention), through which the LM loss trains the router.

    Null experts are the last N rows of ``W_r``: they compete in the softmax and
    the top-k like any expert, and the gates handed to the experts cover the E
    LoRA experts only (soft: ``g_e = p_e``, so ``sum_e g_e = 1 - p_null``).

    Args:
        in_features: D, the input width of the adapted linear.
        num_experts: E, the LoRA experts.
        mode: ``"soft"`` or ``"topk"``.
        top_k: K for ``"topk"``.
        uniform: Debug switch: ignore the logits' values for the gates (uniform
            soft gates; a deterministic round-robin top-k assignment). Logits and
            probabilities are still computed so aux losses keep their shape.
        num_null: N, the null experts.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        mode: str,
        top_k: int,
        uniform: bool = False,
        num_null: int = 0,
    ):
        super().__init__()
        if mode not in ("soft", "topk"):
            raise ValueError(f"router mode {mode!r}: valid values are ['soft', 'topk']")
        slots = num_experts + num_null
        if mode == "topk" and not 1 <= top_k <= slots:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts + null_experts = {slots}]")
        self.num_experts = num_experts
        self.num_null = num_null
        self.mode = mode
        self.top_k = top_k
        self.uniform = uniform
        self.weight = nn.Parameter(torch.empty(slots, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    @property
    def num_slots(self) -> int:
        """S = E + N."""
        return self.num_experts + self.num_null

    def forward(
        self, x_TD: torch.Tensor, drop_P: torch.Tensor | None = None
    ) -> Routing | tuple[Routing, torch.Tensor]:
        """Route T tokens.

        Args:
            x_TD: Tokens, any float dtype.
            drop_P: Optional flat positions of ``x`` that the experts' dropout
                zeroes; then ``x`` with them zeroed is returned too (one autograd
                node for both, see :class:`_RouterLogitsAndDrop`). The router
                itself always sees the undropped ``x``.

        Returns:
            The :class:`Routing` (all fp32); with ``drop_P``, ``(routing, x * m)``.
        """
        if drop_P is None:
            return self.route(_RouterLogits.apply(x_TD, self.weight))
        logits_TE, xd_TD = _RouterLogitsAndDrop.apply(x_TD, self.weight, drop_P)
        return self.route(logits_TE), xd_TD

    def route(self, logits_TE: torch.Tensor) -> Routing:
        """The routing decision (probabilities, gates, experts) from fp32 logits ``W_r x``."""
        probs_TE = torch.softmax(logits_TE, dim=-1)
        E, S, N = self.num_experts, self.num_slots, self.num_null
        if self.mode == "soft":
            gates_TE = probs_TE
            if self.uniform:
                gates_TE = torch.full_like(probs_TE, 1.0 / S)
            if N:
                gates_TE = gates_TE[:, :E]
            return Routing(logits_TE, probs_TE, gates_TE, None, N)
        if self.uniform:
            T, dev = logits_TE.shape[0], logits_TE.device
            start_T = torch.arange(T, device=dev) % S
            offs_K = torch.arange(self.top_k, device=dev)
            experts_TK = (start_T[:, None] + offs_K[None, :]) % S
            gates_TK = torch.full((T, self.top_k), 1.0 / self.top_k, device=dev)
            return Routing(logits_TE, probs_TE, gates_TK.float(), experts_TK, N)
        top_TK, experts_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.top_k == 1:
            return Routing(logits_TE, probs_TE, top_TK, experts_TK, N)  # Switch: g = p_max
        gates_TK = top_TK / top_TK.sum(dim=-1, keepdim=True)
        return Routing(logits_TE, probs_TE, gates_TK, experts_TK, N)
