"""The top-k combine is deterministic: bitwise independent of the order of the expert rows.

``index_add`` (the former combine) accumulates in row order on CPU and in no
fixed order on CUDA; a recomputed forward under activation checkpointing could
then differ in the last bit and flip a near-tied top-k choice later in the
decoder layer. :func:`combine_topk` writes each row to its (token, slot) place
and sums the K slots in slot order. The reordered-accumulation check below runs
on CPU; that CUDA's kernels keep the same property is the GPU test's part.
"""

from __future__ import annotations

import torch

from loramoe_ds.model.experts import ExpertBank, local_mixture
from loramoe_ds.model.reference import loop_mixture
from loramoe_ds.model.router import Routing
from loramoe_ds.model.topk import combine_topk

T, K, O = 64, 4, 24


def _rows(seed=0, drop=0):
    """Rows of varied magnitude (so the summation order shows in the last bits)."""
    g = torch.Generator().manual_seed(seed)
    order_N = torch.randperm(T * K, generator=g)[drop:]
    y_NO = torch.randn(order_N.numel(), O, generator=g) * 10.0 ** torch.randint(
        -4, 4, (order_N.numel(), 1), generator=g
    )
    return y_NO, order_N


def test_combine_is_bitwise_independent_of_row_order():
    y_NO, order_N = _rows()
    ref = combine_topk(y_NO, order_N, T, K)
    for seed in range(3):
        p = torch.randperm(order_N.numel(), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(combine_topk(y_NO[p], order_N[p], T, K), ref)
    # The data is sensitive: the scatter-add it replaces differs under a reordering.
    scat = lambda y, o: y.new_zeros(T, O).index_add(0, o // K, y)  # noqa: E731
    p = torch.randperm(order_N.numel(), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(scat(y_NO[p], order_N[p]), scat(y_NO, order_N))


def test_combine_equals_slot_sum_and_handles_missing_rows():
    """Equals the sum over slots of a dense (T, K, O) grid; missing rows (null experts,
    capacity drops) count zero; ``out_TO`` is added, in place on request."""
    y_NO, order_N = _rows(seed=1, drop=37)
    grid = torch.zeros(T * K, O)
    grid[order_N] = y_NO
    assert torch.equal(combine_topk(y_NO, order_N, T, K), grid.view(T, K, O).sum(1))
    base = torch.randn(T, O)
    want = base + grid.view(T, K, O).sum(1)
    assert torch.equal(combine_topk(y_NO, order_N, T, K, base), want)
    out = base.clone()
    assert combine_topk(y_NO, order_N, T, K, out, inplace=True) is out
    assert torch.equal(out, want)


def test_combine_backward_is_a_gather():
    """Each row's gradient is exactly its token's upstream gradient (no accumulation)."""
    y_NO, order_N = _rows(seed=2, drop=5)
    y_NO.requires_grad_(True)
    g_TO = torch.randn(T, O)
    (gy,) = torch.autograd.grad(combine_topk(y_NO, order_N, T, K), y_NO, g_TO)
    assert torch.equal(gy, g_TO[order_N // K])


def _relabelled(bank: ExpertBank, routing: Routing, perm_E: torch.Tensor):
    """The same mixture with experts renamed: expert e becomes perm_E[e]."""
    other = ExpertBank(bank.num_experts, bank.in_features, bank.out_features, bank.rank)
    inv = torch.argsort(perm_E)
    with torch.no_grad():
        other.lora_A.copy_(bank.lora_A[inv])
        other.lora_B.copy_(bank.lora_B[inv])
    return other, Routing(routing.logits_TE, routing.probs_TE, routing.gates_TK,
                          perm_E[routing.experts_TK])  # fmt: skip


def test_grouped_topk_forward_and_backward_independent_of_expert_order():
    """Renaming the experts reorders the grouped rows; output, input grad and gate grads
    stay bitwise equal (K=3, so a reordered accumulation would show), and match the
    per-expert loop."""
    torch.manual_seed(0)
    E, D, R, k = 6, 16, 4, 3
    bank = ExpertBank(E, D, O, R)
    with torch.no_grad():
        bank.lora_B.normal_()
    x = torch.randn(T, D)
    logits = torch.randn(T, E)
    probs = logits.softmax(-1)
    top, experts = probs.topk(k, -1)
    results = []
    for perm in (torch.arange(E), torch.tensor([5, 3, 1, 0, 4, 2])):
        xg = x.clone().requires_grad_(True)
        gates = (top / top.sum(-1, keepdim=True)).clone().requires_grad_(True)
        b, r = _relabelled(bank, Routing(logits, probs, gates, experts), perm)
        y = local_mixture(b, xg, r, topk_impl="grouped")
        gx, gg = torch.autograd.grad(y, [xg, gates], torch.ones_like(y))
        results.append((y.detach(), gx, gg))
        loop = loop_mixture(b, x, r)
        torch.testing.assert_close(y.detach(), loop, atol=1e-5, rtol=1e-5)
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)
