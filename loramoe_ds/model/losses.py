"""Auxiliary router losses in fp32, padding masked (docs/design.md, "Auxiliary losses").

Shape legend: B samples (rows), S sequence positions, T = B*S tokens, E router
slots (LoRA experts plus null experts, when there are any), K experts per
token, N records (a record is one training example: a row of an unpacked batch,
or one segment of a packed row).

``w[t,e]`` are router probabilities (softmax over all slots); a token belongs
to record ``seg[t]`` (``-1``: padding, never counted).

Each loss is split into *sums* that can be concatenated or added over
data-parallel ranks (``record_sums``, ``load_balance_sums``) and a function of
those sums (``lbc_from_sums``, ``load_balance_from_sums``): the model computes the
sums, an optional gather (``aux_loss_scope = "global_batch"``) joins them over
ranks, and the loss of the joined sums equals the loss a single process holding
every rank's samples computes.

Deliberate difference from the official LoRAMoE code (docs/design.md,
"Localized balancing constraint"): the official code sums Q over padding positions; here padding
is masked. Both sum the per-linear losses over all adapted linears.
"""

from __future__ import annotations

import torch

LBC_EPS = 1e-10


def knowledge_group(
    num_experts: int, device: torch.device | None = None, num_null: int = 0
) -> torch.Tensor:
    """Boolean mask over the ``E + N`` router slots of the world-knowledge group.

    The knowledge group is the LoRA experts ``e < E/2`` (for odd E,
    ``[0, ceil(E/2))``) plus every null expert ``[E, E+N)``; the rest,
    ``[ceil(E/2), E)``, is the downstream group.

    Args:
        num_experts: E, the LoRA experts.
        device: Device of the mask.
        num_null: N, the null experts.
    """
    e = torch.arange(num_experts + num_null, device=device)
    return (e * 2 < num_experts) | (e >= num_experts)


def row_segments(mask_BS: torch.Tensor) -> torch.Tensor:
    """Record index of every token of an unpacked batch: its row, ``-1`` on padding (``seg_T``)."""
    B, S = mask_BS.shape
    rows_BS = torch.arange(B, device=mask_BS.device)[:, None].expand(B, S)
    return torch.where(mask_BS.bool(), rows_BS, -1).reshape(-1)


def record_sums(probs_TE: torch.Tensor, seg_T: torch.Tensor, num_records: int) -> torch.Tensor:
    """``Q[n,e] = sum_{t: seg[t]=n} w[t,e]`` in fp32 (padding, ``seg = -1``, excluded).

    Args:
        probs_TE: Router probabilities.
        seg_T: Record index of each token in ``[0, num_records)``, ``-1`` on padding.
        num_records: N.

    Returns:
        ``q_NE`` (fp32; a record with no tokens has a zero row).
    """
    w_TE = probs_TE.float()
    keep_T = seg_T >= 0
    q_NE = w_TE.new_zeros(num_records, w_TE.shape[-1])
    return q_NE.index_add(0, seg_T[keep_T], w_TE[keep_T])


def lbc_importance(
    task_type_N: torch.Tensor, num_experts: int, delta: float, device=None, num_null: int = 0
) -> torch.Tensor:
    """``I[n,e] = 1+delta`` where slot group and record type match, else ``1-delta``
    (over the ``E + N`` slots; null experts are in the knowledge group)."""
    know_E = knowledge_group(num_experts, device, num_null)
    is_know_N = task_type_N.to(device).bool()
    match_NE = know_E[None, :] == is_know_N[:, None]
    return torch.where(match_NE, 1.0 + delta, 1.0 - delta).float()


def lbc_from_sums(
    q_NE: torch.Tensor,
    task_type_N: torch.Tensor,
    delta: float,
    variant: str = "published",
    eps: float = LBC_EPS,
    num_null: int = 0,
) -> torch.Tensor:
    """LoRAMoE localized balancing constraint from per-record router-weight sums.

    ``published`` (Dou et al. 2023, eq. 9-11, and the official ``cv_squared(I*Q)``):
    ``Z = flatten(I * Q)``. ``intended``: ``Z = flatten(Q / I)``. Both:
    ``L = Var(Z) / (Mean(Z)^2 + eps)`` (unbiased variance).

    The minimiser makes Z uniform. For even E and equal-length records the
    matching group's share of a record's router weight is then ``(1-delta)/2``
    (published) or ``(1+delta)/2`` (intended); docs/design.md derives both and
    the odd-E case.

    Args:
        q_NE: ``Q`` from :func:`record_sums` (fp32).
        task_type_N: 1 = world knowledge, 0 = downstream, per record.
        delta: Importance offset in [0, 1).
        variant: ``"published"`` or ``"intended"``.
        eps: Stabiliser of the denominator.
        num_null: N, the null experts (the last N columns of ``q_NE``).

    Returns:
        Scalar fp32 loss (0 when Z has fewer than two entries).
    """
    E = q_NE.shape[-1] - num_null
    imp_NE = lbc_importance(task_type_N, E, delta, q_NE.device, num_null)
    if variant == "published":
        z = (imp_NE * q_NE).flatten()
    elif variant == "intended":
        z = (q_NE / imp_NE).flatten()
    else:
        raise ValueError(f"lbc variant {variant!r}: valid values are ['published', 'intended']")
    if z.numel() < 2:
        return z.sum() * 0.0
    return z.var(unbiased=True) / (z.mean() ** 2 + eps)


def lbc_loss(
    probs_BSE: torch.Tensor,
    mask_BS: torch.Tensor,
    task_type_B: torch.Tensor,
    delta: float,
    variant: str = "published",
    eps: float = LBC_EPS,
    num_null: int = 0,
) -> torch.Tensor:
    """LBC of an unpacked batch: one record per row (see :func:`lbc_from_sums`).

    ``Q[b,e] = sum_t m[b,t] w[b,t,e]``; ``I[b,e] = 1+delta`` if (e in the knowledge
    group and type_b = 1) or (e in the downstream group and type_b = 0), else
    ``1-delta``; ``Z = flatten(I * Q)`` (published) or ``flatten(Q / I)``
    (intended); ``L = Var(Z) / (Mean(Z)^2 + eps)``.

    Args:
        probs_BSE: Router probabilities.
        mask_BS: 1 for real tokens, 0 for padding.
        task_type_B: 1 = world knowledge, 0 = downstream.
        delta: Importance offset in [0, 1).
        variant: ``"published"`` or ``"intended"``.
        eps: Stabiliser of the denominator.
        num_null: N, the null experts (the last N slots).
    """
    B, S, _ = probs_BSE.shape
    q_BE = record_sums(probs_BSE.reshape(B * S, -1), row_segments(mask_BS), B)
    return lbc_from_sums(q_BE, task_type_B, delta, variant, eps, num_null)


def lbc_optimal_shares(
    num_experts: int,
    delta: float,
    variant: str,
    n_know: int = 1,
    n_down: int = 1,
    num_null: int = 0,
) -> tuple[float, float]:
    """Knowledge-group share of the router weight at the LBC's minimum (reference).

    For a batch of ``n_know`` knowledge and ``n_down`` downstream records of equal
    length whose routing is free, the minimiser of ``Var(Z)/Mean(Z)^2`` is found
    in closed form: within a record every expert of a group gets the same ``Q``,
    so Z takes four values ``x = (z_k^know, z_d^know, z_k^down, z_d^down)`` with
    multiplicities ``c``; minimising ``x^T C x`` with ``1^T C x`` fixed and both
    record types summing to the same length is a linear KKT system
    (docs/design.md, "Localized balancing constraint"). For even E (or one
    record type) Z becomes uniform and the shares are ``(1 -/+ delta)/2``
    (published) / ``(1 +/- delta)/2`` (intended) for knowledge / downstream records.

    Null experts count as knowledge-group slots (``num_null``): the optimum
    depends only on the two groups' sizes.

    Returns:
        (share of the knowledge group for knowledge records, for downstream records);
        a share is ``nan`` when that record type is absent.
    """
    if variant not in ("published", "intended"):
        raise ValueError(f"lbc variant {variant!r}: valid values are ['published', 'intended']")
    K = int(knowledge_group(num_experts, num_null=num_null).sum())
    D = num_experts + num_null - K
    hi, lo = 1.0 + delta, 1.0 - delta
    # I on (knowledge group, downstream group) per record type; Q = z * q_per_z(I).
    imp = {1: (hi, lo), 0: (lo, hi)}
    types = [t for t, n in ((1, n_know), (0, n_down)) if n]
    n_of = {1: n_know, 0: n_down}
    # One unknown z per (record type, group): multiplicity c, Q per unit z s.
    s = [1 / i if variant == "published" else i for t in types for i in imp[t]]
    c = torch.tensor([n_of[t] * m for t in types for m in (K, D)], dtype=torch.float64)
    G = len(c)
    # Constraints on x besides the stationarity rows: fixed mean (c^T x = 1) and,
    # with both record types, equal record lengths (sum of K*Q_k + D*Q_d equal).
    cols = [c]
    if len(types) == 2:
        length = torch.tensor([m * si for m, si in zip((K, D, K, D), s)], dtype=torch.float64)
        cols.append(torch.cat([length[:2], -length[2:]]))
    A = torch.stack(cols, 1)
    M = torch.cat([
        torch.cat([2 * torch.diag(c), -A], 1),
        torch.cat([A.T, torch.zeros(len(cols), len(cols), dtype=torch.float64)], 1),
    ])  # fmt: skip
    b = torch.zeros(G + len(cols), dtype=torch.float64)
    b[G] = 1.0
    x = torch.linalg.solve(M, b)[:G]
    shares = {1: float("nan"), 0: float("nan")}
    for j, t in enumerate(types):
        qk, qd = float(x[2 * j]) * s[2 * j], float(x[2 * j + 1]) * s[2 * j + 1]
        shares[t] = K * qk / (K * qk + D * qd)
    return shares[1], shares[0]


def supervision_masks(
    num_experts: int, device: torch.device | None = None, num_null: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router slots each record type may use under router supervision.

    Knowledge records: the knowledge group (knowledge experts and null experts,
    :func:`knowledge_group`). Downstream records: the downstream experts and the
    null experts. Without null experts the two masks are complements.

    Returns:
        ``(allowed for knowledge records, allowed for downstream records)``,
        boolean masks over the ``E + N`` slots.
    """
    know_S = knowledge_group(num_experts, device, num_null)
    null_S = torch.arange(num_experts + num_null, device=device) >= num_experts
    return know_S, ~know_S | null_S


def supervision_sums(
    logits_TE: torch.Tensor,
    allow_know_E: torch.Tensor,
    allow_down_E: torch.Tensor,
    seg_T: torch.Tensor,
    num_records: int,
) -> torch.Tensor:
    """Per record, the summed log router share on the slots each record type may use.

    ``a_y[t] = sum_{e allowed for type y} w[t,e]`` (:func:`supervision_masks`),
    computed stably from the logits: ``log a_y[t] = logsumexp(l[t, allowed_y]) -
    logsumexp(l[t])``. Without null experts ``a_1 = s`` (the knowledge-group
    share) and ``a_0 = 1 - s``.

    Args:
        logits_TE: Router logits over all slots.
        allow_know_E: Slots allowed for knowledge records.
        allow_down_E: Slots allowed for downstream records.
        seg_T: Record index of each token, ``-1`` on padding.
        num_records: N.

    Returns:
        ``ll_N2`` (fp32): ``[sum_t log a_1[t], sum_t log a_0[t]]`` per record.
    """
    l_TE = logits_TE.float()
    lse_T = torch.logsumexp(l_TE, dim=-1)
    lk_T = torch.logsumexp(l_TE[:, allow_know_E], dim=-1) - lse_T
    ld_T = torch.logsumexp(l_TE[:, allow_down_E], dim=-1) - lse_T
    return record_sums(torch.stack([lk_T, ld_T], dim=1), seg_T, num_records)


def supervision_from_sums(
    ll_N2: torch.Tensor, count_N: torch.Tensor, task_type_N: torch.Tensor
) -> torch.Tensor:
    """Router supervision loss: the mean over records of each record's token mean of
    ``-log a_y[t]``, the log router share on the slots its type ``y`` may use.

    ``L = mean_n [ -(1/len_n) sum_{t in n} log a_{y_n}[t] ]`` over the records with
    at least one token (docs/design.md, "Router supervision"). Without null
    experts this is the binary cross-entropy between the knowledge-group share
    and the record type.

    Args:
        ll_N2: :func:`supervision_sums`.
        count_N: Tokens of each record.
        task_type_N: 1 = world knowledge, 0 = downstream.

    Returns:
        Scalar fp32 loss (0 for a batch with no tokens).
    """
    is_know_N = task_type_N.to(ll_N2.device).bool()
    nll_N = -torch.where(is_know_N, ll_N2[:, 0], ll_N2[:, 1])
    has_N = count_N > 0
    if not bool(has_N.any()):
        return ll_N2.sum() * 0.0
    return (nll_N[has_N] / count_N[has_N].to(nll_N)).mean()


def load_balance_sums(
    probs_TE: torch.Tensor, experts_TK: torch.Tensor | None, mask_T: torch.Tensor
) -> torch.Tensor:
    """Additive statistics of the load-balancing loss: ``[count_E, psum_E, n]`` (fp32).

    ``count_e``: routed (token, slot) assignments to e; ``psum_e``: summed router
    probability of e; ``n``: real tokens. For soft routing (``experts_TK is
    None``) the assignment is the arg-max expert (top-1, as in Switch).

    Returns:
        ``(2E + 1,)`` fp32; ``psum`` carries the gradient, the counts do not.
    """
    p_TE = probs_TE.float()
    if experts_TK is None:
        experts_TK = p_TE.argmax(dim=-1, keepdim=True)
    m_T = mask_T.to(p_TE.dtype)
    K = experts_TK.shape[-1]
    count_E = torch.zeros_like(p_TE[0]).scatter_add_(
        0, experts_TK.reshape(-1), m_T[:, None].expand(-1, K).reshape(-1)
    )
    psum_E = (p_TE * m_T[:, None]).sum(0)
    return torch.cat([count_E.detach(), psum_E, m_T.sum().reshape(1)])


def load_balance_from_sums(sums_X: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """``E * sum_e f_e P_e`` with ``f = count / (n K)``, ``P = psum / n``."""
    E = num_experts
    count_E, psum_E, n = sums_X[:E], sums_X[E : 2 * E], sums_X[2 * E].clamp(min=1.0)
    return E * ((count_E / (n * top_k)) * (psum_E / n)).sum()


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
    K = 1 if experts_TK is None else experts_TK.shape[-1]
    sums = load_balance_sums(probs_TE, experts_TK, mask_T)
    return load_balance_from_sums(sums, probs_TE.shape[-1], K)


def z_loss(logits_TE: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean_t logsumexp(logits_t)^2`` over real tokens (ST-MoE)."""
    lse_T = torch.logsumexp(logits_TE.float(), dim=-1)
    m_T = mask_T.to(lse_T.dtype)
    return (lse_T.square() * m_T).sum() / m_T.sum().clamp(min=1.0)
