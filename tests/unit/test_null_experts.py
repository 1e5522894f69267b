"""Null experts and router supervision (docs/design.md, "Null experts", "Router supervision").

References computed another way: the softmax over every router slot taken by
hand, the per-expert Python loop, a per-token / per-record loop over the BCE
formula, and the LBC's closed-form optimum with the null slots counted in the
knowledge group.
"""

import math

import pytest
import torch
from test_experts import _bank, assert_fused_matches_loop
from test_lbc_fixed_point import optimise_shares

from loramoe_ds.config import AdapterConfig
from loramoe_ds.model.inject import inject
from loramoe_ds.model.losses import knowledge_group, lbc_optimal_shares
from loramoe_ds.model.moe_linear import MoELoRALinear
from loramoe_ds.model.router import Router
from loramoe_ds.model.topk import sort_by_expert
from loramoe_ds.tiny import tiny_model


def test_knowledge_group_holds_the_null_slots():
    assert knowledge_group(4, num_null=2).tolist() == [True, True, False, False, True, True]
    assert knowledge_group(5, num_null=1).tolist() == [True, True, True, False, False, True]
    assert knowledge_group(6).tolist() == [True] * 3 + [False] * 3


def test_soft_gates_are_the_softmax_over_every_slot():
    E, N, D = 4, 3, 16
    router = Router(D, E, "soft", 1, num_null=N)
    assert router.weight.shape == (E + N, D)
    x = torch.randn(9, D)
    r = router(x)
    want = torch.softmax(x @ router.weight.detach().t(), dim=-1)  # by hand, all 7 slots
    torch.testing.assert_close(r.probs_TE, want)
    torch.testing.assert_close(r.gates_TK, want[:, :E])
    assert (r.gates_TK.sum(-1) < 1).all() and r.num_experts == E and r.num_slots == E + N


@pytest.mark.parametrize(
    "mode,K,impl",
    [("soft", 1, "auto"), ("topk", 1, "grouped"), ("topk", 2, "grouped"), ("topk", 3, "dense"),
     ("topk", 2, "dense")],
)  # fmt: skip
@pytest.mark.parametrize("E,N", [(4, 2), (3, 1), (2, 3)])
def test_fused_with_null_experts_matches_loop(mode, K, impl, E, N):
    """Forward and every gradient; top-k tokens routed to a null slot get nothing from it."""
    D, O, R, T = 24, 16, 4, 40
    router = Router(D, E, mode, K, num_null=N)
    x = assert_fused_matches_loop(_bank(E, D, O, R), router, T, impl)
    if mode == "topk":  # the test really routes some (token, slot) pairs to null slots
        assert (router(x).experts_TK >= E).any()


def test_topk_null_assignments_cost_no_rows():
    E, N, T, K = 4, 4, 50, 2
    g = torch.Generator().manual_seed(0)
    experts_TK = torch.stack([torch.randperm(E + N, generator=g)[:K] for _ in range(T)])
    order_N, counts_E = sort_by_expert(experts_TK, E, None, E + N)
    flat = experts_TK.reshape(-1)
    want = [i for e in range(E) for i in range(T * K) if int(flat[i]) == e]  # plain loop
    assert order_N.tolist() == want and counts_E.tolist() == [
        int((flat == e).sum()) for e in range(E)
    ]
    assert len(want) < T * K


@pytest.mark.parametrize("mode,K", [("soft", 1), ("topk", 1), ("topk", 2)])
def test_all_weight_on_the_null_slots_is_the_base_exactly(mode, K):
    D, O, E, N = 16, 12, 4, 2
    torch.manual_seed(0)
    layer = MoELoRALinear(torch.nn.Linear(D, O), E, 4, 8.0, 0.0, mode, K, "l", 0, null_experts=N)
    with torch.no_grad():
        layer.experts.lora_B.normal_()
        layer.router.weight.zero_()
        layer.router.weight[E:] = 100.0  # x > 0: null logits beat the experts' by > 1e3
    x = torch.rand(2, 7, D) + 0.5
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)
    with torch.no_grad():
        layer.router.weight[E:] = -100.0  # and the other way round, the experts are really on
    assert (layer(x) - layer.base(x)).abs().max() > 1e-3


def _supervision_by_loop(routings, mask_BS, type_B, num_experts, num_null):
    """Mean over linears of mean over rows of the token mean of -log(share on the slots
    the row's type may use), one token at a time. Knowledge rows may use experts
    [0, ceil(E/2)) and the null slots; downstream rows [ceil(E/2), E) and the null slots."""
    E, N = num_experts, num_null
    know_slots = list(range((E + 1) // 2)) + list(range(E, E + N))
    down_slots = list(range((E + 1) // 2, E)) + list(range(E, E + N))
    per_linear = []
    for probs_TE in routings:
        B, S = mask_BS.shape
        p_BSE = probs_TE.view(B, S, -1)
        rows = []
        for b in range(B):
            slots = know_slots if type_B[b] else down_slots
            terms = [-torch.log(p_BSE[b, t, slots].sum()) for t in range(S) if mask_BS[b, t]]
            rows.append(sum(terms) / len(terms))
        per_linear.append(sum(rows) / B)
    return sum(per_linear) / len(per_linear)


@pytest.mark.parametrize("router,K", [("soft", 1), ("topk", 2)])
def test_supervision_loss_matches_the_formula_by_loop(router, K):
    cfg = AdapterConfig(
        router=router, top_k=K, num_experts=4, null_experts=2, rank=4, alpha=8.0, dropout=0.0,
        lbc_beta=0.1, router_supervision_coef=0.7, target_modules=("gate_proj", "down_proj"),
    )  # fmt: skip
    model = inject(tiny_model("llama", seed=1), cfg)
    model.train()
    captured = []
    hooks = [
        m.router.register_forward_hook(lambda _m, _a, out: captured.append(out.probs_TE))
        for m in model.moe_layers()
    ]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (4, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[3, 5:] = 0
    labels = torch.where(mask.bool(), ids, -100)
    task = torch.tensor([1, 0, 0, 1])
    out = model(input_ids=ids, attention_mask=mask, labels=labels, task_type=task)
    for h in hooks:
        h.remove()
    assert len(captured) == len(model.moe_layers())
    ref = _supervision_by_loop(captured, mask, task, 4, 2)
    torch.testing.assert_close(out.router_supervision_loss, ref, rtol=1e-5, atol=1e-6)
    assert 0.1 < float(ref.detach()) < 5
    total = out.lm_loss + 0.1 * out.lbc_loss + 0.7 * ref
    torch.testing.assert_close(out.loss, total, rtol=1e-6, atol=1e-6)
    routers = [m.router.weight for m in model.moe_layers()]
    got_g = torch.autograd.grad(out.router_supervision_loss, routers, retain_graph=True)
    ref_g = torch.autograd.grad(ref, routers)
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_supervision_needs_task_type_and_a_downstream_group():
    cfg = AdapterConfig(num_experts=1, null_experts=1, router_supervision_coef=1.0, lbc_beta=0)
    model = inject(tiny_model("llama", seed=1), cfg)
    ids = torch.randint(1, 100, (2, 5))
    with pytest.raises(ValueError, match="router_supervision_coef > 0 needs the per-sample"):
        model(input_ids=ids, labels=ids)
    with pytest.raises(ValueError, match="needs a downstream expert group"):
        model(input_ids=ids, labels=ids, task_type=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="null_experts=-1"):
        AdapterConfig(null_experts=-1)


@pytest.mark.parametrize("N", [0, 2])
def test_supervision_alone_separates_free_logits(N):
    """Minimising the supervision loss over free logits takes every record's weight off
    the other type's experts (the null slots are allowed for both); without null slots
    the knowledge-group share goes to the type (1 or 0). No interior optimum."""
    from loramoe_ds.model.losses import (
        row_segments,
        supervision_from_sums,
        supervision_masks,
        supervision_sums,
    )

    E, S = 4, 3
    allow_k, allow_d = supervision_masks(E, num_null=N)
    logits = torch.zeros(4 * S, E + N, requires_grad=True)
    task = torch.tensor([1, 0, 1, 0])
    seg = row_segments(torch.ones(4, S))
    count = torch.full((4,), float(S))
    opt = torch.optim.Adam([logits], lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        ll = supervision_sums(logits, allow_k, allow_d, seg, 4)
        loss = supervision_from_sums(ll, count, task)
        loss.backward()
        opt.step()
    w = torch.softmax(logits.detach(), -1).view(4, S, -1)
    on_down_experts = w[..., 2:4].sum(-1).mean(1)  # experts [E/2, E)
    on_know_experts = w[..., 0:2].sum(-1).mean(1)  # experts [0, E/2)
    assert on_down_experts[task == 1].max() < 0.01 and on_know_experts[task == 0].max() < 0.01
    if N == 0:
        assert on_know_experts[task == 1].min() > 0.99
    assert float(loss.detach()) < 0.01 and math.isfinite(float(loss.detach()))


@pytest.mark.parametrize("variant", ["published", "intended"])
def test_lbc_optimum_counts_null_slots_in_the_knowledge_group(variant):
    """The LBC over 4 experts + 2 null slots reaches the closed form with K = 4, D = 2."""
    E, N, delta = 4, 2, 0.25
    types = [1, 0, 1, 0, 0, 1]
    want_know, want_down = lbc_optimal_shares(E, delta, variant, 3, 3, num_null=N)
    share_N, task_N = optimise_shares(E, delta, variant, types, num_null=N)
    for share, t in zip(share_N.tolist(), task_N.tolist()):
        assert share == pytest.approx(want_know if t else want_down, abs=1e-3)
    # equal to the no-null optimum of a 6-expert layer whose knowledge group has 4 slots:
    # the optimum depends only on the group sizes
    assert want_know != pytest.approx(lbc_optimal_shares(6, delta, variant, 3, 3)[0], abs=1e-3)
