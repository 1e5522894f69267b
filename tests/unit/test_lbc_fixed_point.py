"""The LBC's fixed points: optimising free router logits on the LBC alone.

Reference: :func:`lbc_optimal_shares` (closed form / KKT system, derived in
docs/design.md). ``published`` (Z = I*Q) ends with the *matching* group at
``(1-delta)/2`` of the router weight for even E; ``intended`` (Z = Q/I) at
``(1+delta)/2``.
"""

import pytest
import torch

from loramoe_ds.model.losses import knowledge_group, lbc_loss, lbc_optimal_shares


def optimise_shares(E, delta, variant, types, S=3, iters=300, num_null=0):
    """Minimise the LBC over free per-token logits (L-BFGS); knowledge-group share per record."""
    g = torch.Generator().manual_seed(E * 100 + int(delta * 100))
    logits = torch.randn(len(types), S, E + num_null, generator=g).requires_grad_()
    mask = torch.ones(len(types), S)
    task = torch.tensor(types)
    opt = torch.optim.LBFGS(
        [logits], lr=1, max_iter=iters, tolerance_grad=1e-12, tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = lbc_loss(torch.softmax(logits, -1), mask, task, delta, variant, num_null=num_null)
        loss.backward()
        return loss

    opt.step(closure)
    q = torch.softmax(logits.detach(), -1).sum(1)
    return q[:, knowledge_group(E, num_null=num_null)].sum(1) / q.sum(1), task


@pytest.mark.parametrize("variant", ["published", "intended"])
def test_even_E_closed_form(variant):
    for delta in (0.1, 0.3):
        know, down = lbc_optimal_shares(6, delta, variant)
        sign = -1 if variant == "published" else 1
        assert know == pytest.approx((1 + sign * delta) / 2, abs=1e-12)
        assert down == pytest.approx((1 - sign * delta) / 2, abs=1e-12)


@pytest.mark.parametrize("variant", ["published", "intended"])
@pytest.mark.parametrize("E", [4, 5, 6, 7])
def test_optimising_logits_reaches_the_analytic_share(variant, E):
    types = [1, 0, 1, 0, 0, 1]
    for delta in (0.1, 0.25, 0.5):
        want_know, want_down = lbc_optimal_shares(E, delta, variant, n_know=3, n_down=3)
        share_N, task_N = optimise_shares(E, delta, variant, types)
        for share, t in zip(share_N.tolist(), task_N.tolist()):  # every record, not a mean
            assert share == pytest.approx(want_know if t else want_down, abs=1e-3), (E, delta)
        if variant == "intended":  # knowledge records lean to the knowledge experts
            assert want_know > want_down
        else:  # the published form reverses the intended order
            assert want_know < want_down


def test_single_type_batch_odd_E():
    """One record type: Z can be uniform for any E; share = K(1-/+d) / (K(1-/+d) + D(1+/-d))."""
    E, delta, K, D = 5, 0.2, 3, 2
    for variant, s in (("published", -1), ("intended", 1)):
        want = K * (1 + s * delta) / (K * (1 + s * delta) + D * (1 - s * delta))
        assert lbc_optimal_shares(E, delta, variant, 4, 0)[0] == pytest.approx(want, abs=1e-12)
        share_N, _ = optimise_shares(E, delta, variant, [1, 1, 1, 1])
        assert share_N.tolist() == pytest.approx([want] * 4, abs=1e-3)
