"""CUDA + bf16: the expert paths, a full training step, the EP dispatcher's dtypes, the benches.

Never run by CI (the ``gpu`` mark is excluded by default) and skipped without a
CUDA device. On a GPU machine::

    python -m pytest -m gpu tests/gpu -q

References are computed another way: the per-expert fp32 loop, the fp32 model,
the local (non-dispatched) fp32 bank. bf16 has an 8-bit mantissa, so results are
compared by relative Frobenius error (``|a - b| / |b|``) against a bound a few
times the bf16 rounding of the inputs.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _matmul_dtypes import MatmulDtypes

from loramoe_ds.model.experts import ExpertBank, local_mixture
from loramoe_ds.model.reference import loop_mixture
from loramoe_ds.model.router import Router

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO = Path(__file__).resolve().parents[2]
BF16_REL = 3e-2  # relative error bound for bf16 compute vs the fp32 reference


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _bank(E, D, O, R, seed=0):
    torch.manual_seed(seed)
    bank = ExpertBank(E, D, O, R)
    with torch.no_grad():
        bank.lora_B.normal_(std=0.5)
    return bank.cuda()


@pytest.mark.parametrize(
    "mode,k,impl", [("soft", 1, "auto"), ("topk", 2, "dense"), ("topk", 2, "grouped"),
                    ("topk", 1, "grouped")],
)  # fmt: skip
@pytest.mark.parametrize("D,O,E,R,T", [(128, 256, 4, 8, 512), (576, 1536, 6, 4, 300)])
def test_bf16_paths_match_fp32_loop(mode, k, impl, D, O, E, R, T):
    """bf16 bank and rows (soft, dense top-k, grouped top-k incl. the CUDA grouped GEMM)
    against the fp32 per-expert loop: output and every gradient."""
    bank32 = _bank(E, D, O, R)
    bank16 = copy.deepcopy(bank32).to(torch.bfloat16)
    router = Router(D, E, mode, k).cuda()
    x32 = torch.randn(T, D, device="cuda", requires_grad=True)
    x16 = x32.detach().to(torch.bfloat16).requires_grad_(True)
    with torch.no_grad():
        routing = router(x32)  # one routing decision for both (ties could differ in bf16)
    g = torch.randn(T, O, device="cuda")
    y32 = loop_mixture(bank32, x32, routing)
    y32.backward(g)
    with MatmulDtypes() as rec:
        y16 = local_mixture(bank16, x16, routing, None, impl)
        y16.backward(g.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert all(d == {torch.bfloat16} for _, d in rec.seen), rec.seen
    assert _rel(y16, y32) < BF16_REL
    assert _rel(x16.grad, x32.grad) < BF16_REL
    assert _rel(bank16.lora_A.grad, bank32.lora_A.grad) < BF16_REL
    assert _rel(bank16.lora_B.grad, bank32.lora_B.grad) < BF16_REL


@pytest.mark.parametrize("router", ["soft", "topk"])
def test_bf16_training_step(router):
    """A tiny Llama in bf16 on the GPU: inject, forward, backward, AdamW. Loss and
    adapter gradients match the fp32 model's; several steps lower the loss."""
    from loramoe_ds import AdapterConfig, inject
    from loramoe_ds.tiny import tiny_model

    cfg = AdapterConfig(
        router=router, num_experts=4, rank=8, dropout=0.0, top_k=2,
        lbc_beta=0.1 if router == "soft" else 0.0, load_balance_coef=0.01, z_loss_coef=0.001,
    )  # fmt: skip
    base = tiny_model("llama", seed=0, vocab_size=256, layers=2, hidden=128)
    m32 = inject(copy.deepcopy(base), cfg).cuda()
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in m32.moe_layers():
            layer.experts.lora_B.normal_(std=0.05)  # B = 0 would hide the A/router grads
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 256, (4, 64), generator=g).cuda()
    batch = dict(input_ids=ids, labels=ids, task_type=torch.tensor([1, 0, 1, 0]).cuda())
    out32, out16 = m32(**batch), m16(**batch)
    out32.loss.backward()
    out16.loss.backward()
    assert torch.isfinite(out16.loss)
    assert abs(float(out16.lm_loss) - float(out32.lm_loss)) < 2e-2 * float(out32.lm_loss)
    grads32 = dict(m32.adapter_named_parameters())
    for name, p16 in m16.adapter_named_parameters():
        p32 = grads32[name]
        assert p16.dtype == torch.bfloat16 and p16.grad is not None
        assert torch.isfinite(p16.grad).all(), name
        assert _rel(p16.grad, p32.grad) < 0.1, name  # through 2 layers of bf16 activations
    opt = torch.optim.AdamW(m16.adapter_params(), lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        loss = m16(**batch).loss
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    owner = not dist.is_initialized()
    if owner:
        backend = "nccl" if dist.is_nccl_available() else "gloo"
        torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    yield None
    if owner:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode,k", [("soft", 1), ("topk", 2)])
def test_ep_dispatcher_bf16_gemms_fp32_masters(one_rank_group, mode, k):
    """EP on CUDA: bf16 rows go through bf16 expert GEMMs against the fp32 bank;
    output bf16, bank grads fp32, values match the fp32 local bank."""
    from loramoe_ds.parallel.dispatch import EPDispatcher

    E, R, D, O, T = 8, 8, 256, 512, 384
    bank = _bank(E, D, O, R)
    ref_bank = copy.deepcopy(bank)
    router = Router(D, E, mode, k).cuda()
    ep = EPDispatcher(bank, E, one_rank_group, 1, 0)
    x = torch.randn(T, D, device="cuda")
    with torch.no_grad():
        routing = router(x)
    g = torch.randn(T, O, device="cuda")
    with MatmulDtypes() as rec:
        y = ep(x.to(torch.bfloat16), routing)
        y.backward(g.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert rec.seen and all(d == {torch.bfloat16} for _, d in rec.seen), rec.seen
    assert bank.lora_A.dtype == torch.float32 and bank.lora_A.grad.dtype == torch.float32
    assert bank.lora_B.grad.dtype == torch.float32
    ref = local_mixture(ref_bank, x, routing, None, "grouped")
    ref.backward(g)
    assert _rel(y, ref) < BF16_REL
    assert _rel(bank.lora_A.grad, ref_bank.lora_A.grad) < BF16_REL
    assert _rel(bank.lora_B.grad, ref_bank.lora_B.grad) < BF16_REL


def _run(args: list[str]) -> str:
    out = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_benches_run_on_cuda():
    """bench/layer.py and bench/step.py run unchanged with --device cuda (bf16)."""
    layer = _run(["bench/layer.py", "--device", "cuda", "--tokens", "512", "--repeats", "2",
                  "--dims", "256x512", "--experts", "4", "--ranks", "4"])  # fmt: skip
    assert "| 256x512 | 4 | 4 | soft |" in layer
    step = _run(["bench/step.py", "--device", "cuda", "--models", "tiny", "--repeats", "2"])
    for cfg in ("floor", "lora", "soft", "top2_dense", "top2_grouped"):
        assert f"| tiny | {cfg} |" in step
