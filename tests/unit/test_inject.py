"""Injection into HF causal LMs: freezing, base equivalence, losses, adapter I/O, training."""

import pytest
import torch

from loramoe_ds import AdapterConfig, inject, load_adapter, save_adapter
from loramoe_ds.model.losses import lbc_loss, load_balance_loss, z_loss
from loramoe_ds.model.moe_linear import MoELoRALinear
from loramoe_ds.tiny import ARCHS, tiny_model


def _batch(seed=0, B=3, S=12, V=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, -4:] = 0  # right padding on sample 0
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[mask == 0] = -100
    task = torch.tensor([1, 0, 1])[:B]
    return dict(input_ids=ids, attention_mask=mask, labels=labels, task_type=task)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("router", ["soft", "topk"])
def test_only_adapters_trainable_and_step0_equals_base(arch, router):
    base = tiny_model(arch)
    n_base = sum(p.numel() for p in base.parameters())
    ids = _batch()["input_ids"]
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    cfg = AdapterConfig(router=router, num_experts="2468", rank=2, dropout=0.0)
    model = inject(base, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = {f"base.{n}" for n, _ in model.adapter_named_parameters()}
    assert trainable == adapter and trainable
    assert all(".router." in n or ".experts." in n for n in trainable)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == n_base
    layers = model.moe_layers()
    assert len(layers) == 4 * 3  # gate/up/down in 4 layers
    assert [m.num_experts for m in layers] == [2, 2, 2, 4, 4, 4, 6, 6, 6, 8, 8, 8]
    assert model.total_experts() == 3 * (2 + 4 + 6 + 8)
    with torch.no_grad():
        out = model(input_ids=ids)
    torch.testing.assert_close(out.logits, ref, atol=0, rtol=0)


def test_lm_loss_matches_hf_loss():
    base = tiny_model("llama")
    b = _batch()
    with torch.no_grad():
        ref = base(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    model = inject(base, AdapterConfig(dropout=0.0))
    with torch.no_grad():
        out = model(**b)
    torch.testing.assert_close(out.lm_loss, ref.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router", ["soft", "topk"])
def test_aux_losses_are_sums_of_per_linear_formulas(router):
    """Model-level aux losses == formulas applied to each linear's captured router output."""
    cfg = AdapterConfig(
        router=router,
        num_experts=4,
        dropout=0.0,
        lbc_beta=0.3,
        load_balance_coef=0.01,
        z_loss_coef=0.001,
    )
    model = inject(tiny_model("llama"), cfg)
    b = _batch()
    captured = {}

    def hook(mod, args, out):
        captured[mod.name] = mod.router(args[0].reshape(-1, mod.in_features))

    hs = [m.register_forward_hook(hook) for m in model.moe_layers()]
    out = model(**b)
    for h in hs:
        h.remove()
    m_BS, m_T = b["attention_mask"], b["attention_mask"].reshape(-1)
    lbc = sum(
        lbc_loss(r.probs_TE.view(3, 12, 4), m_BS, b["task_type"], 0.1, cfg.lbc_variant)
        for r in captured.values()
    )
    zl = sum(z_loss(r.logits_TE, m_T) for r in captured.values())
    lb = 0.0
    for layer in range(4):
        rs = [captured[n] for n in captured if f".layers.{layer}." in n]
        ex = None if router == "soft" else torch.cat([r.experts_TK for r in rs])
        lb = lb + load_balance_loss(torch.cat([r.probs_TE for r in rs]), ex, m_T.repeat(len(rs)))
    torch.testing.assert_close(out.lbc_loss, lbc)
    torch.testing.assert_close(out.z_loss, zl)
    torch.testing.assert_close(out.load_balance_loss, lb)
    total = out.lm_loss + 0.3 * lbc + 0.01 * lb + 0.001 * zl
    torch.testing.assert_close(out.loss, total)
    out.loss.backward()
    for layer in model.moe_layers():
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_lbc_needs_task_type():
    model = inject(tiny_model("llama"), AdapterConfig())
    b = _batch()
    b.pop("task_type")
    with pytest.raises(ValueError, match="task_type"):
        model(**b)


def test_no_match_gives_clear_error():
    with pytest.raises(ValueError, match="matched no nn.Linear.*gate_proj"):
        inject(tiny_model("llama"), AdapterConfig(target_modules=("fc_in",)))


@pytest.mark.parametrize("router", ["soft", "topk"])
def test_adapter_save_load_reproduces_logits(tmp_path, router):
    cfg = AdapterConfig(router=router, num_experts="8228", dropout=0.0)
    model = inject(tiny_model("qwen2", seed=1), cfg)
    with torch.no_grad():
        for p in model.adapter_params():
            p.normal_(std=0.1)
    ids = _batch()["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    fresh = load_adapter(tiny_model("qwen2", seed=1), tmp_path / "adapter")
    with torch.no_grad():
        got = fresh(input_ids=ids).logits
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


def test_model_package_never_imports_deepspeed():
    """Loading an adapter needs no DeepSpeed: model/ never imports it (fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys, loramoe_ds, loramoe_ds.model.inject, loramoe_ds.model.experts;"
        "assert 'deepspeed' not in sys.modules, 'deepspeed imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_adapter_rejects_wrong_base(tmp_path):
    model = inject(tiny_model("llama"), AdapterConfig(num_experts=2))
    save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="shape"):
        load_adapter(tiny_model("llama", hidden=64), tmp_path / "a")


@pytest.mark.parametrize("router", ["soft", "topk"])
def test_training_30_steps_lowers_loss(router):
    """A tiny Llama learns a fixed toy mapping through the experts alone."""
    torch.manual_seed(0)
    cfg = AdapterConfig(router=router, num_experts=4, rank=4, alpha=8, dropout=0.0)
    model = inject(tiny_model("llama", hidden=48), cfg)
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 128, (8, 1), generator=g)
    ids = (start + torch.arange(16)) % 128  # counting sequences: next = current + 1
    labels = ids.clone()
    labels[:, :8] = -100
    batch = dict(input_ids=ids, labels=labels, task_type=torch.tensor([0, 1] * 4))
    opt = torch.optim.AdamW(model.adapter_params(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(30):
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


def test_moe_layer_types():
    model = inject(tiny_model("mistral"), AdapterConfig(target_modules=("q_proj", "down_proj")))
    names = [m.name for m in model.moe_layers()]
    assert all(isinstance(m, MoELoRALinear) for m in model.moe_layers())
    assert names[:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
