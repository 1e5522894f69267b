"""Fused expert compute equals the per-expert loop; equivalences with LoRA and the base."""

import pytest
import torch
from _matmul_dtypes import MatmulDtypes
from torch import nn

from loramoe_ds.model.experts import ExpertBank, local_mixture
from loramoe_ds.model.grouped_mm import grouped_matmul
from loramoe_ds.model.moe_linear import MoELoRALinear
from loramoe_ds.model.reference import loop_mixture
from loramoe_ds.model.router import Router
from loramoe_ds.model.topk import sort_by_expert


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
    assert_fused_matches_loop(_bank(E, D, O, R), Router(D, E, mode, max(K, 1)), T, impl)


def assert_fused_matches_loop(bank, router, T, impl):
    """The fused mixture equals the per-expert loop: output and the gradients of the
    input, both LoRA factors and the router."""
    x = torch.randn(T, bank.in_features, requires_grad=True)
    params = [x, bank.lora_A, bank.lora_B, router.weight]
    fused, g_fused = _grads(lambda: local_mixture(bank, x, router(x), topk_impl=impl), params)
    loop, g_loop = _grads(lambda: loop_mixture(bank, x, router(x)), params)
    torch.testing.assert_close(fused, loop, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fused, g_loop):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    return x


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


# -- base output and scale folded into the expert GEMMs ----------------------------------------
@pytest.mark.parametrize(
    "mode,K,impl", [("soft", 0, "auto"), ("topk", 2, "dense"), ("topk", 2, "grouped")]
)
def test_out_and_scale_folded_match_loop(mode, K, impl):
    """``local_mixture(out, scale) == out + scale * loop``, values and every gradient."""
    E, R, D, O, T, s = 4, 3, 16, 24, 29, 2.5
    bank = _bank(E, D, O, R)
    router = Router(D, E, mode, max(K, 1))
    x = torch.randn(T, D, requires_grad=True)
    y0 = torch.randn(T, O, requires_grad=True)
    params = [x, y0, bank.lora_A, bank.lora_B, router.weight]
    got, g_got = _grads(
        lambda: local_mixture(bank, x, router(x), None, impl, out_TO=y0, scale=s), params
    )
    ref, g_ref = _grads(lambda: y0 + s * loop_mixture(bank, x, router(x)), params)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["dense", "grouped"])
def test_bank_computes_in_the_input_dtype_with_fp32_masters(impl):
    """fp32 weights, bf16 rows: bf16 GEMMs forward and backward, fp32 weight grads."""
    E, R, D, O, T = 4, 4, 32, 16, 40
    bank = _bank(E, D, O, R)
    router = Router(D, E, "topk", 2)
    x = torch.randn(T, D)
    with torch.no_grad():
        routing = router(x)  # (the router's own backward runs in fp32 by design)
    xb = x.to(torch.bfloat16).requires_grad_(True)
    with MatmulDtypes() as rec:
        y = local_mixture(bank, xb, routing, None, impl)
        y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16
    assert rec.seen and all(d == {torch.bfloat16} for _, d in rec.seen), [
        s for s in rec.seen if s[1] != {torch.bfloat16}
    ]
    assert bank.lora_A.grad.dtype == torch.float32 and bank.lora_B.grad.dtype == torch.float32
    ref = loop_mixture(bank, x, routing)  # fp32 reference
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)


# -- dropout ----------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.05, 0.2])
def test_dropped_positions_are_bernoulli(p):
    """Count, uniformity and independence of neighbours of a Bernoulli(p) sequence."""
    from loramoe_ds.model.moe_linear import dropped_positions

    n = 400_000
    torch.manual_seed(0)
    pos = dropped_positions(n, p)
    assert pos.dtype == torch.int64 and (pos[1:] > pos[:-1]).all()
    assert 0 <= int(pos[0]) and int(pos[-1]) < n
    sd = (n * p * (1 - p)) ** 0.5
    assert abs(pos.numel() - n * p) < 5 * sd
    drop = torch.zeros(n, dtype=torch.bool)
    drop[pos] = True
    for part in drop.view(8, -1):  # every eighth of the sequence
        assert abs(int(part.sum()) - n / 8 * p) < 5 * (n / 8 * p * (1 - p)) ** 0.5
    pairs = int((drop[1:] & drop[:-1]).sum())  # P(neighbour dropped) = p^2
    assert abs(pairs - (n - 1) * p * p) < 5 * ((n - 1) * p * p) ** 0.5
    torch.manual_seed(0)
    assert torch.equal(dropped_positions(n, p), pos)  # seeded: reproducible


@pytest.mark.parametrize("mode,k", [("soft", 1), ("topk", 2)])
def test_layer_sparse_dropout_matches_loop(mode, k):
    """CPU dropout p <= 0.25: ``W0 x + s * loop(x * m / (1 - p))``, values and gradients."""
    from loramoe_ds.model.moe_linear import dropped_positions

    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    p = 0.1
    layer = _wrap(lin, 4, 2, mode, k, dropout=p)
    with torch.no_grad():
        layer.experts.lora_B.normal_()
    x = torch.randn(3, 7, 16, requires_grad=True)
    params = [x, layer.experts.lora_A, layer.experts.lora_B, layer.router.weight]

    def ref():
        x_TD = x.reshape(-1, 16)
        pos = dropped_positions(x_TD.numel(), p)
        xd = x_TD.reshape(-1).index_fill(0, pos, 0.0).view_as(x_TD) / (1 - p)
        delta = loop_mixture(layer.experts, xd, layer.router(x_TD))
        return lin(x) + layer.scaling * delta.view(3, 7, 12)

    torch.manual_seed(1)
    got, g_got = _grads(lambda: layer(x), params)
    torch.manual_seed(1)
    exp, g_exp = _grads(ref, params)
    torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_got, g_exp):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    layer.eval()  # no dropout at evaluation
    torch.testing.assert_close(
        layer(x), lin(x) + layer.scaling * loop_mixture(
            layer.experts, x.reshape(-1, 16), layer.router(x.reshape(-1, 16))
        ).view(3, 7, 12), atol=1e-5, rtol=1e-5,
    )  # fmt: skip


# -- expert-parallel dispatcher dtypes (one gloo rank) ----------------------------------------
@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    owner = not dist.is_initialized()
    if owner:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    yield None
    if owner:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode,k", [("soft", 1), ("topk", 2)])
def test_ep_dispatcher_fp32_equals_local_and_bf16_gemms(one_rank_group, mode, k):
    """One EP rank: fp32 rows give the local result; bf16 rows run bf16 expert GEMMs
    against the fp32 bank, whose gradients stay fp32."""
    from loramoe_ds.parallel.dispatch import EPDispatcher

    E, R, D, O, T = 4, 4, 32, 16, 24
    bank = _bank(E, D, O, R)
    router = Router(D, E, mode, k)
    ep = EPDispatcher(bank, E, one_rank_group, 1, 0)
    x = torch.randn(T, D, requires_grad=True)
    params = [x, bank.lora_A, bank.lora_B, router.weight]
    got, g_got = _grads(lambda: ep(x, router(x)), params)
    exp, g_exp = _grads(lambda: local_mixture(bank, x, router(x), topk_impl="grouped"), params)
    torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_got, g_exp):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    bank.zero_grad(set_to_none=True)
    xb = x.detach().to(torch.bfloat16)
    with torch.no_grad():
        routing = router(x)  # (the router's own backward runs in fp32 by design)
    with MatmulDtypes() as rec:
        y = ep(xb, routing)
        y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16
    assert rec.seen and all(d == {torch.bfloat16} for _, d in rec.seen), [
        s for s in rec.seen if s[1] != {torch.bfloat16}
    ]
    assert bank.lora_A.grad.dtype == torch.float32 and bank.lora_B.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), exp.detach(), atol=0.05, rtol=0.02)


def test_sparse_dropout_gradient_is_the_mask_for_any_incoming_gradient():
    """The in-place backward of the CPU dropout also handles an expanded gradient."""
    from loramoe_ds.model.moe_linear import _ZeroAt, dropped_positions

    x = torch.randn(6, 10, requires_grad=True)
    torch.manual_seed(0)
    pos = dropped_positions(x.numel(), 0.2)
    keep = torch.ones(60).index_fill(0, pos, 0.0).view(6, 10)
    xd = _ZeroAt.apply(x, pos)
    torch.testing.assert_close(xd, x * keep, atol=0, rtol=0)
    xd.sum().backward()  # stride-0 gradient
    torch.testing.assert_close(x.grad, keep, atol=0, rtol=0)
    x.grad = None
    w = torch.randn(10, 3)
    g = torch.randn(6, 3)
    (_ZeroAt.apply(x, pos) @ w).backward(g)  # fresh gradient, zeroed in place
    torch.testing.assert_close(x.grad, (g @ w.t()) * keep, atol=0, rtol=0)


@pytest.mark.parametrize(
    "device,dtype,cap,want",
    [("cuda", torch.bfloat16, (9, 0), True), ("cuda", torch.bfloat16, (8, 0), True),
     ("cuda", torch.bfloat16, (7, 5), False), ("cuda", torch.bfloat16, (7, 0), False),
     ("cuda", torch.float32, (9, 0), False), ("cuda", torch.bfloat16, None, False),
     ("cpu", torch.float32, None, True), ("cpu", torch.bfloat16, None, True),
     ("cpu", torch.float16, None, False), ("mps", torch.bfloat16, None, False)],
)  # fmt: skip
def test_grouped_mm_needs_sm80_bf16_on_cuda(device, dtype, cap, want):
    """torch's grouped GEMM kernels: bf16 on SM80+ (a T4 or V100 falls back to the
    padded bmm instead of raising); fp32 and bf16 on CPU."""
    from loramoe_ds.model.grouped_mm import grouped_mm_supported

    assert grouped_mm_supported(device, dtype, cap) is want


def test_aligned_groups_give_the_unaligned_result(monkeypatch):
    """Groups padded to 8 rows (what the GPU path does) compute the same rows and grads."""
    from loramoe_ds.model import experts as ex
    from loramoe_ds.model.grouped_mm import aligned_rows

    torch.manual_seed(0)
    bank = _bank(4, 16, 8, 8)
    counts = torch.tensor([3, 0, 9, 2])
    x = torch.randn(int(counts.sum()), 16)
    c = torch.rand(int(counts.sum()))
    outs = []
    for align in (1, 8):
        monkeypatch.setattr(ex, "group_align_rows", lambda *a, n=align: n)
        xg, cg = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
        y = bank(xg, counts_E=counts, row_scale_N=cg)
        grads = torch.autograd.grad((y * torch.arange(y.numel()).view_as(y)).sum(),
                                    [xg, cg, bank.lora_A, bank.lora_B])  # fmt: skip
        outs.append((y, *grads))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    dest, padded = aligned_rows(counts, 8, int(counts.sum()))
    assert padded.tolist() == [8, 0, 16, 8]
    assert dest.tolist() == [0, 1, 2, *range(8, 17), 24, 25]
