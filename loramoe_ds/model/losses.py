"""Auxiliary router losses in fp32, padding masked (docs/design.md, "Auxiliary losses").

Shape legend: B samples (rows), S sequence positions, T = B*S tokens, E experts,
K experts per token, N records (a record is one training example: a row of an
unpacked batch, or one segment of a packed row), C = E + 1 columns of the
gathered LBC sums (E sums + the record's type).

``w[t,e]`` are router probabilities (softmax over all experts); a token belongs
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


def knowledge_group(num_experts: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean mask of the world-knowledge experts ``e < E/2`` (the rest: downstream).

    For odd E the knowledge group is ``[0, ceil(E/2))`` (``e < E/2`` literally).
    """
    return torch.arange(num_experts, device=device) * 2 < num_experts


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
    task_type_N: torch.Tensor, num_experts: int, delta: float, device=None
) -> torch.Tensor:
    """``I[n,e] = 1+delta`` where expert group and record type match, else ``1-delta``."""
    know_E = knowledge_group(num_experts, device)
    is_know_N = task_type_N.to(device).bool()
    match_NE = know_E[None, :] == is_know_N[:, None]
    return torch.where(match_NE, 1.0 + delta, 1.0 - delta).float()


def lbc_from_sums(
    q_NE: torch.Tensor,
    task_type_N: torch.Tensor,
    delta: float,
    variant: str = "published",
    eps: float = LBC_EPS,
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

    Returns:
        Scalar fp32 loss (0 when Z has fewer than two entries).
    """
    imp_NE = lbc_importance(task_type_N, q_NE.shape[-1], delta, q_NE.device)
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
    """
    B, S, _ = probs_BSE.shape
    rows_BS = torch.arange(B, device=probs_BSE.device)[:, None].expand(B, S)
    seg_T = torch.where(mask_BS.bool(), rows_BS, -1).reshape(-1)
    q_BE = record_sums(probs_BSE.reshape(B * S, -1), seg_T, B)
    return lbc_from_sums(q_BE, task_type_B, delta, variant, eps)


def lbc_optimal_shares(
    num_experts: int, delta: float, variant: str, n_know: int = 1, n_down: int = 1
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

    Returns:
        (share of the knowledge group for knowledge records, for downstream records);
        a share is ``nan`` when that record type is absent.
    """
    K = int((knowledge_group(num_experts)).sum())
    D = num_experts - K
    hi, lo = 1.0 + delta, 1.0 - delta
    # Q = z / I (published) or z * I (intended); I per (record type, group).
    i_know, i_down = (hi, lo), (lo, hi)  # (I on knowledge group, I on downstream group)
    f = (lambda z, i: z / i) if variant == "published" else (lambda z, i: z * i)
    if variant not in ("published", "intended"):
        raise ValueError(f"lbc variant {variant!r}: valid values are ['published', 'intended']")
    groups = []  # (multiplicity, row of "record length" constraint, type)
    if n_know:
        groups += [
            (n_know * K, (K / i_know[0] if variant == "published" else K * i_know[0]), 1),
            (n_know * D, (D / i_know[1] if variant == "published" else D * i_know[1]), 1),
        ]
    if n_down:
        groups += [
            (n_down * K, (K / i_down[0] if variant == "published" else K * i_down[0]), 0),
            (n_down * D, (D / i_down[1] if variant == "published" else D * i_down[1]), 0),
        ]
    G = len(groups)
    c = torch.tensor([g[0] for g in groups], dtype=torch.float64)
    a = torch.tensor([g[1] for g in groups], dtype=torch.float64)
    typ = torch.tensor([g[2] for g in groups])
    rows = [torch.cat([2 * torch.diag(c), -c[:, None]], 1)]
    rhs = [torch.zeros(G, dtype=torch.float64)]
    cons = [torch.cat([c, torch.zeros(1, dtype=torch.float64)])]
    rhs_c = [1.0]
    if n_know and n_down:  # both record types have the same length
        d = torch.where(typ == 1, a, -a)
        rows = [torch.cat([rows[0], -d[:, None]], 1)]
        cons = [
            torch.cat([cons[0], torch.zeros(1, dtype=torch.float64)]),
            torch.cat([d, torch.zeros(2, dtype=torch.float64)]),
        ]
        rhs_c = [1.0, 0.0]
    M = torch.cat([rows[0]] + [r[None] for r in cons])
    b = torch.cat(rhs + [torch.tensor(rhs_c, dtype=torch.float64)])
    x = torch.linalg.solve(M, b)[:G]
    shares = {}
    for t in (1, 0):
        idx = (typ == t).nonzero().flatten().tolist()
        if not idx:
            shares[t] = float("nan")
            continue
        ik = i_know if t == 1 else i_down
        qk, qd = f(float(x[idx[0]]), ik[0]), f(float(x[idx[1]]), ik[1])
        shares[t] = K * qk / (K * qk + D * qd)
    return shares[1], shares[0]


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
