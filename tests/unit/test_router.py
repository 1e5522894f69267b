"""Router: top-k gates (Switch gate for k=1), the LM loss trains the router, fp32 logits."""

import pytest
import torch

from loramoe_ds import AdapterConfig, inject
from loramoe_ds.model.experts import ExpertBank, local_mixture
from loramoe_ds.model.router import Router
from loramoe_ds.tiny import tiny_model


def test_top1_gate_is_the_unrenormalised_probability():
    torch.manual_seed(0)
    r = Router(8, 5, "topk", 1)
    out = r(torch.randn(6, 8))
    top, idx = out.probs_TE.max(-1)
    assert torch.equal(out.experts_TK[:, 0], idx)
    torch.testing.assert_close(out.gates_TK[:, 0], top, atol=0, rtol=0)
    assert (out.gates_TK < 1).all()  # renormalised it would be exactly 1


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("impl", ["dense", "grouped"])
def test_mixture_gradient_wrt_router_matches_finite_differences(k, impl):
    """d(mixture)/d(W_r) through the top-k gates, against fp64 finite differences."""
    torch.manual_seed(k)
    D, E, O, T = 6, 4, 5, 9
    bank = ExpertBank(E, D, O, 3).double()
    with torch.no_grad():
        bank.lora_B.normal_()
    router = Router(D, E, "topk", k).double()
    x = torch.randn(T, D, dtype=torch.float64)

    def f(w):
        routing = torch.func.functional_call(router, {"weight": w}, (x,))
        return local_mixture(bank, x, routing, topk_impl=impl)

    w0 = router.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (w0,), eps=1e-6, atol=1e-6)
    router.weight = torch.nn.Parameter(w0.detach().clone())
    local_mixture(bank, x, router(x), topk_impl=impl).square().sum().backward()
    assert router.weight.grad.abs().max() > 1e-3


@pytest.mark.parametrize("k", [1, 2, 3])
def test_lm_loss_alone_trains_every_router(k):
    """No aux loss: the routers' gradient comes from the LM loss only, and is non-zero."""
    torch.manual_seed(0)
    cfg = AdapterConfig(
        router="topk", top_k=k, num_experts=4, rank=2, dropout=0.0, lbc_beta=0.0,
        load_balance_coef=0.0, z_loss_coef=0.0,
    )  # fmt: skip
    model = inject(tiny_model("llama"), cfg)
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.experts.lora_B.normal_(std=0.1)  # B = 0 at init would block every gradient
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    for layer in model.moe_layers():
        g = layer.router.weight.grad
        assert g is not None and torch.isfinite(g).all()
        assert g.abs().max() > 1e-6, f"{layer.name}: router gets no gradient with top_k={k}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_logits_fp32_and_keep_no_fp32_copy(dtype):
    """Logits/grads equal ``F.linear(x.float(), w.float())``; the backward keeps ``x`` as is."""
    torch.manual_seed(0)
    r = Router(16, 4, "soft", 1).to(dtype)
    x = torch.randn(7, 16, dtype=dtype, requires_grad=True)
    out = r(x)
    assert out.logits_TE.dtype == torch.float32
    saved = out.logits_TE.grad_fn.saved_tensors
    acts = [t for t in saved if t.shape == x.shape]
    assert [t.dtype for t in acts] == [dtype]  # x itself, no fp32 copy of a bf16 x
    g = torch.randn(7, 4)
    gx, gw = torch.autograd.grad(out.logits_TE, [x, r.weight], g)
    x2 = x.detach().clone().requires_grad_(True)
    w2 = r.weight.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(x2.float(), w2.float())
    rx, rw = torch.autograd.grad(ref, [x2, w2], g)
    torch.testing.assert_close(out.logits_TE, ref, atol=0, rtol=0)
    assert gx.dtype == dtype and gw.dtype == dtype
    torch.testing.assert_close(gx, rx, atol=0, rtol=0)
    torch.testing.assert_close(gw, rw, atol=0, rtol=0)


def test_router_with_dropout_positions_one_gradient_buffer():
    """``router(x, drop_P)``: routing of the undropped x, x zeroed at drop_P, and the
    input gradient = router part + experts' part zeroed at drop_P, for a fresh,
    an expanded and a missing experts' gradient."""
    from loramoe_ds.model.moe_linear import dropped_positions

    torch.manual_seed(0)
    r = Router(10, 3, "soft", 1)
    x = torch.randn(8, 10, requires_grad=True)
    pos = dropped_positions(x.numel(), 0.2)
    keep = torch.ones(80).index_fill(0, pos, 0.0).view(8, 10)
    routing, xd = r(x, pos)
    torch.testing.assert_close(xd, x * keep, atol=0, rtol=0)
    torch.testing.assert_close(routing.probs_TE, r(x).probs_TE, atol=0, rtol=0)
    g_l = torch.randn(8, 3)
    w = torch.randn(10, 4)
    g_h = torch.randn(8, 4)
    for experts in ("fresh", "expanded", "none"):
        x.grad = None
        r.zero_grad(set_to_none=True)
        routing, xd = r(x, pos)
        loss = (routing.logits_TE * g_l).sum()
        if experts == "fresh":
            loss = loss + ((xd @ w) * g_h).sum()
            part = (g_h @ w.t()) * keep
        elif experts == "expanded":
            loss = loss + xd.sum()
            part = keep
        else:
            part = torch.zeros_like(keep)
        loss.backward()
        torch.testing.assert_close(x.grad, g_l @ r.weight.detach() + part, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r.weight.grad, g_l.t() @ x.detach(), atol=1e-6, rtol=1e-6)
