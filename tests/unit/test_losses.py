"""Aux losses against values computed by hand from docs/design.md, "Auxiliary losses"."""

import math

import torch

from loramoe_ds.model.losses import knowledge_group, lbc_loss, load_balance_loss, z_loss


def test_knowledge_group_is_lower_half():
    assert knowledge_group(4).tolist() == [True, True, False, False]
    assert knowledge_group(6).tolist() == [True] * 3 + [False] * 3
    assert knowledge_group(5).tolist() == [True, True, True, False, False]


def test_lbc_hand_computed_with_padding_and_mixed_types():
    # B=2 samples, S=3 positions, E=4 experts; sample 0 has its last position padded.
    w = torch.tensor(
        [
            [[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.9, 0.05, 0.03, 0.02]],
            [[0.4, 0.3, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1], [0.0, 0.5, 0.5, 0.0]],
        ]
    )
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    task = torch.tensor([0, 1])  # sample 0 downstream, sample 1 world knowledge
    delta = 0.1
    # Q[b,e] = sum_t m w (padding excluded)
    Q0 = [0.35, 0.45, 0.55, 0.65]
    Q1 = [1.1, 0.9, 0.8, 0.2]
    # sample 0 (downstream): experts 2,3 (downstream group) get 1+delta
    I0 = [0.9, 0.9, 1.1, 1.1]
    # sample 1 (knowledge): experts 0,1 get 1+delta
    I1 = [1.1, 1.1, 0.9, 0.9]
    Z = [q * i for q, i in zip(Q0 + Q1, I0 + I1)]
    mean = sum(Z) / 8
    var = sum((z - mean) ** 2 for z in Z) / 7  # unbiased
    expected = var / (mean**2 + 1e-10)
    got = lbc_loss(w, m, task, delta)
    assert got.dtype == torch.float32
    assert math.isclose(got.item(), expected, rel_tol=1e-5)


def test_lbc_padding_never_counts():
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(2, 5, 4), -1)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    w2 = w.clone()
    w2[0, 3:] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # change padded positions only
    t = torch.tensor([1, 0])
    torch.testing.assert_close(lbc_loss(w, m, t, 0.1), lbc_loss(w2, m, t, 0.1))


def test_lbc_rewards_the_right_group():
    """Mass on the matching group gives a lower loss than mass on the wrong group."""
    good = torch.tensor([[[0.45, 0.45, 0.05, 0.05]], [[0.05, 0.05, 0.45, 0.45]]])
    bad = good.flip(0)
    m = torch.ones(2, 1)
    t = torch.tensor([1, 0])
    assert lbc_loss(good, m, t, 0.1) != lbc_loss(bad, m, t, 0.1)
    flat = torch.full((2, 1, 4), 0.25)
    # uniform routing: Z = Q*I takes only the values 0.275/0.225 -> known value
    Z = torch.tensor([0.275, 0.275, 0.225, 0.225, 0.225, 0.225, 0.275, 0.275])
    torch.testing.assert_close(lbc_loss(flat, m, t, 0.1), Z.var() / (Z.mean() ** 2 + 1e-10))


def test_load_balance_hand_computed_topk_with_padding():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05]])
    experts = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1]])
    mask = torch.tensor([1, 1, 1, 0])  # last token is padding
    # assignments over 3 real tokens x 2 slots = 6: e0: 2, e1: 2, e2: 2
    f = [2 / 6, 2 / 6, 2 / 6]
    P = [(0.5 + 0.1 + 0.2) / 3, (0.3 + 0.6 + 0.2) / 3, (0.2 + 0.3 + 0.6) / 3]
    expected = 3 * sum(a * b for a, b in zip(f, P))
    assert math.isclose(load_balance_loss(p, experts, mask).item(), expected, rel_tol=1e-6)


def test_load_balance_soft_uses_argmax_and_balanced_is_one():
    p = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    # argmax: e0, e1 -> f = [.5, .5]; P = [.45, .55]; L = 2 * (.5*.45 + .5*.55) = 1
    assert math.isclose(load_balance_loss(p, None, torch.ones(2)).item(), 1.0, rel_tol=1e-6)
    p = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    # all to e0: f=[1,0], P=[.65,.35] -> 2*.65
    assert math.isclose(load_balance_loss(p, None, torch.ones(2)).item(), 1.3, rel_tol=1e-6)


def test_z_loss_hand_computed_masked():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0], [50.0, 50.0]])
    mask = torch.tensor([1, 1, 0])
    l0 = math.log(2.0)
    l1 = math.log(math.exp(1) + math.exp(2))
    expected = (l0**2 + l1**2) / 2
    assert math.isclose(z_loss(logits, mask).item(), expected, rel_tol=1e-6)


def test_lbc_intended_divides_by_importance():
    """Same hand-computed batch as above, Z = Q / I."""
    w = torch.tensor(
        [
            [[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.9, 0.05, 0.03, 0.02]],
            [[0.4, 0.3, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1], [0.0, 0.5, 0.5, 0.0]],
        ]
    )
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    Q = [0.35, 0.45, 0.55, 0.65, 1.1, 0.9, 0.8, 0.2]
    I = [0.9, 0.9, 1.1, 1.1, 1.1, 1.1, 0.9, 0.9]
    Z = torch.tensor([q / i for q, i in zip(Q, I)], dtype=torch.float64)
    expected = (Z.var() / (Z.mean() ** 2 + 1e-10)).item()
    got = lbc_loss(w, m, torch.tensor([0, 1]), 0.1, variant="intended")
    assert math.isclose(got.item(), expected, rel_tol=1e-5)


def test_packed_records_give_the_rows_lbc_and_sums_add_up():
    """Q per record from seq ids equals Q per row; load-balance sums are additive."""
    from loramoe_ds.model.losses import (
        lbc_from_sums,
        load_balance_from_sums,
        load_balance_sums,
        record_sums,
    )

    torch.manual_seed(0)
    w = torch.softmax(torch.randn(3, 4, 5), -1)
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    t = torch.tensor([1, 0, 1])
    # the same tokens as one "packed" stream of 3 records
    seg = torch.where(m.bool(), torch.arange(3)[:, None].expand(3, 4), -1).reshape(-1)
    q = record_sums(w.reshape(12, 5), seg, 3)
    torch.testing.assert_close(q, (w * m[..., None]).sum(1))
    torch.testing.assert_close(
        lbc_from_sums(q, t, 0.2, "intended"), lbc_loss(w, m, t, 0.2, "intended")
    )
    ex = torch.topk(w.reshape(12, 5), 2, -1).indices
    halves = [
        load_balance_sums(w.reshape(12, 5)[s], ex[s], m.reshape(-1)[s])
        for s in (slice(0, 5), slice(5, 12))
    ]
    whole = load_balance_loss(w.reshape(12, 5), ex, m.reshape(-1))
    torch.testing.assert_close(load_balance_from_sums(halves[0] + halves[1], 5, 2), whole)
