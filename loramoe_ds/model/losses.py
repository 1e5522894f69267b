"""Auxiliary router losses, exactly as DESIGN section 3, in fp32, padding masked.

Shape legend: B samples, S sequence positions, T = B*S tokens, E experts,
K experts per token.

``w[b,t,e]`` are router probabilities (softmax over all experts), ``m[b,t]`` the
attention (non-padding) mask. Padding never counts.

Deliberate differences from the official LoRAMoE code (documented):
the official code sums Q over padding positions; here padding is masked. Both
sum the per-linear losses over all adapted linears.
"""

from __future__ import annotations

import torch

LBC_EPS = 1e-10


def knowledge_group(num_experts: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean mask of the world-knowledge experts ``e < E/2`` (the rest: downstream).

    For odd E the knowledge group is ``[0, ceil(E/2))`` (``e < E/2`` literally).
    """
    return torch.arange(num_experts, device=device) * 2 < num_experts


def lbc_loss(
    probs_BSE: torch.Tensor,
    mask_BS: torch.Tensor,
    task_type_B: torch.Tensor,
    delta: float,
    eps: float = LBC_EPS,
) -> torch.Tensor:
    """LoRAMoE localized balancing constraint (Dou et al. 2023, eq. 9-11).

    ``Q[b,e] = sum_t m[b,t] w[b,t,e]``;
    ``I[b,e] = 1+delta`` if (e in the knowledge group and type_b = 1) or
    (e in the downstream group and type_b = 0), else ``1-delta``;
    ``Z = flatten(I * Q)``; ``L = Var(Z) / (Mean(Z)^2 + eps)`` (unbiased var).

    Args:
        probs_BSE: Router probabilities.
        mask_BS: 1 for real tokens, 0 for padding.
        task_type_B: 1 = world knowledge, 0 = downstream.
        delta: Importance offset in [0, 1).
        eps: Stabiliser of the denominator.

    Returns:
        Scalar fp32 loss (0 when Z has fewer than two entries).
    """
    w = probs_BSE.float()
    q_BE = (w * mask_BS.to(w.dtype).unsqueeze(-1)).sum(dim=1)
    know_E = knowledge_group(w.shape[-1], w.device)
    is_know_B = task_type_B.to(w.device).bool()
    match_BE = know_E[None, :] == is_know_B[:, None]
    imp_BE = torch.where(match_BE, 1.0 + delta, 1.0 - delta).to(w.dtype)
    z = (imp_BE * q_BE).flatten()
    if z.numel() < 2:
        return z.sum() * 0.0
    return z.var(unbiased=True) / (z.mean() ** 2 + eps)


def load_balance_loss(
    probs_TE: torch.Tensor, experts_TK: torch.Tensor | None, mask_T: torch.Tensor
) -> torch.Tensor:
    """Switch/MoLA load-balancing loss ``E * sum_e f_e P_e``.

    ``f_e``: fraction of routed (token, slot) assignments that go to expert e;
    ``P_e``: mean router probability of expert e; both over real tokens only.
    For soft routing (``experts_TK is None``) the assignment is the arg-max
    expert (top-1, as in the Switch Transformer).

    To follow MoLA, pass the concatenation over all adapted linears of one
    decoder layer (they share E).

    Args:
        probs_TE: Router probabilities.
        experts_TK: Routed expert indices, or ``None`` for soft routing.
        mask_T: 1 for real tokens.

    Returns:
        Scalar fp32 loss (1.0 when perfectly balanced).
    """
    p = probs_TE.float()
    E = p.shape[-1]
    if experts_TK is None:
        experts_TK = p.argmax(dim=-1, keepdim=True)
    m_T = mask_T.to(p.dtype)
    n_tok = m_T.sum().clamp(min=1.0)
    K = experts_TK.shape[-1]
    onehot_TE = torch.zeros_like(p).scatter_add_(
        1, experts_TK, m_T[:, None].expand(-1, K).contiguous()
    )
    f_E = onehot_TE.sum(0) / (n_tok * K)
    P_E = (p * m_T[:, None]).sum(0) / n_tok
    return E * (f_E * P_E).sum()


def z_loss(logits_TE: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean_t logsumexp(logits_t)^2`` over real tokens (ST-MoE)."""
    lse_T = torch.logsumexp(logits_TE.float(), dim=-1)
    m_T = mask_T.to(lse_T.dtype)
    return (lse_T.square() * m_T).sum() / m_T.sum().clamp(min=1.0)
