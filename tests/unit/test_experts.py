"""Fused expert compute equals the per-expert loop; equivalences with LoRA and the base."""

import pytest
import torch
from torch import nn

from loramoe_ds.model.experts import ExpertBank, grouped_matmul, local_mixture, sort_by_expert
from loramoe_ds.model.moe_linear import MoELoRALinear
from loramoe_ds.model.reference import loop_mixture
from loramoe_ds.model.router import Router


def _bank(E, D, O, R, seed=0):
    torch.manual_seed(seed)
    bank = ExpertBank(E, D, O, R)
    with torch.no_grad():
        bank.lora_B.normal_()  # non-zero B so the test can fail
    return bank


def _grads(fn, params):
    for p in params:
        p.grad = None
    out = fn()
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(7))
    (out * g).sum().backward()
    return out.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize(
    "E,R,D,O,T", [(2, 4, 16, 24, 7), (4, 8, 32, 16, 33), (8, 4, 24, 40, 64), (3, 2, 8, 8, 1)]
)
@pytest.mark.parametrize(
    "mode,K,impl",
    [("soft", 0, "auto"), ("topk", 1, "grouped"), ("topk", 2, "grouped"), ("topk", 1, "dense"),
     ("topk", 2, "dense")],
)  # fmt: skip
def test_fused_matches_loop(E, R, D, O, T, mode, K, impl):
    bank = _bank(E, D, O, R)
    router = Router(D, E, mode, max(K, 1))
    x = torch.randn(T, D, requires_grad=True)
    params = [x, bank.lora_A, bank.lora_B, router.weight]
    fused, g_fused = _grads(lambda: local_mixture(bank, x, router(x), topk_impl=impl), params)
    loop, g_loop = _grads(lambda: loop_mixture(bank, x, router(x)), params)
    torch.testing.assert_close(fused, loop, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fused, g_loop):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_grouped_matmul_paths_agree():
    """grouped_mm (aligned dims) and the padded-bmm fallback (odd dims) give the loop result."""
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])
    for K, M in [(16, 8), (6, 3)]:  # 16-byte aligned -> grouped_mm; odd -> padded bmm
        x = torch.randn(int(counts.sum()), K, requires_grad=True)
        w = torch.randn(4, K, M, requires_grad=True)
        y = grouped_matmul(x, w, counts)
        starts = torch.cumsum(counts, 0) - counts
        ref = torch.cat([x[s : s + c] @ w[e] for e, (s, c) in enumerate(zip(starts, counts))])
        torch.testing.assert_close(y, ref)
        gy = torch.autograd.grad(y.sum(), [x, w])
        gr = torch.autograd.grad(ref.sum(), [x, w])
        for a, b in zip(gy, gr):
            torch.testing.assert_close(a, b)


def test_dense_and_grouped_topk_agree_with_capacity():
    """Both top-k implementations drop the same over-capacity assignments."""
    bank = _bank(4, 16, 8, 4)
    router = Router(16, 4, "topk", 2)
    x = torch.randn(40, 16)
    outs = [local_mixture(bank, x, router(x), 0.5, impl) for impl in ("dense", "grouped")]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    full = local_mixture(bank, x, router(x), None, "dense")
    assert not torch.allclose(outs[0], full)  # capacity 0.5 really dropped something


def test_auto_picks_dense_for_narrow_banks():
    from loramoe_ds.model import experts as ex

    bank = _bank(4, 16, 8, 4)
    router = Router(16, 4, "topk", 2)
    x = torch.randn(5, 16)
    called = []
    orig = ex.grouped_matmul
    ex.grouped_matmul = lambda *a: called.append(1) or orig(*a)
    try:
        local_mixture(bank, x, router(x))  # E*R = 16 <= 256: dense, no grouped GEMM
        assert not called
        local_mixture(bank, x, router(x), topk_impl="grouped")
        assert called
    finally:
        ex.grouped_matmul = orig
    with pytest.raises(ValueError, match="topk_impl='sparse'"):
        local_mixture(bank, x, router(x), topk_impl="sparse")


def test_capacity_drops_overflow_in_token_order():
    experts = torch.tensor([[0], [0], [0], [1]])
    order, counts = sort_by_expert(experts, 2, capacity=2)
    assert order.tolist() == [0, 1, 3]
    assert counts.tolist() == [2, 1]


def _wrap(linear, E, R, router="soft", k=1, dropout=0.0):
    return MoELoRALinear(linear, E, R, 2 * R, dropout, router, k, "x.0.proj", 0)


def test_b_zero_equals_base():
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    x = torch.randn(3, 5, 16)
    for mode, k in [("soft", 1), ("topk", 2)]:
        layer = _wrap(lin, 4, 4, mode, k)
        torch.testing.assert_close(layer(x), lin(x), atol=0, rtol=0)


def test_one_expert_top1_equals_single_lora():
    """E=1 with top-1 (gate 1) is exactly a LoRA linear W0 x + s B A x."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    layer = _wrap(lin, 1, 4, "topk", 1)
    with torch.no_grad():
        layer.experts.lora_B.normal_()
    x = torch.randn(2, 7, 16)
    A, B = layer.experts.lora_A[0], layer.experts.lora_B[0]  # (R, D), (R, O)
    ref = lin(x) + layer.scaling * (x @ A.t()) @ B
    torch.testing.assert_close(layer(x), ref, atol=1e-6, rtol=1e-6)
    soft = _wrap(lin, 1, 4, "soft")
    soft.experts.load_state_dict(layer.experts.state_dict())
    torch.testing.assert_close(soft(x), ref, atol=1e-6, rtol=1e-6)


def test_layer_scaling_and_dropout_shared_mask():
    """Fused path with dropout: one mask shared across experts (documented)."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    layer = _wrap(lin, 2, 2, "soft", dropout=0.5)
    with torch.no_grad():
        layer.experts.lora_B.normal_()
    x = torch.randn(4, 8)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    mask_x = nn.functional.dropout(x, 0.5, training=True)
    routing = layer.router(x)
    ref = lin(x) + layer.scaling * loop_mixture(layer.experts, mask_x, routing)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)


def test_router_topk_renormalises_and_is_fp32():
    torch.manual_seed(0)
    r = Router(8, 5, "topk", 2)
    x = torch.randn(6, 8, dtype=torch.bfloat16)
    out = r.to(torch.bfloat16)(x)
    assert out.probs_TE.dtype == torch.float32 and out.gates_TK.dtype == torch.float32
    torch.testing.assert_close(out.gates_TK.sum(-1), torch.ones(6))
    top, idx = out.probs_TE.topk(2, -1)
    assert torch.equal(idx, out.experts_TK)
    torch.testing.assert_close(out.gates_TK, top / top.sum(-1, keepdim=True))
