"""Device->host syncs inside kernels, counted by CUDA's sync debug mode (GPU only).

The CPU test (tests/distributed/test_device_paths.py) counts the Python-level
reads of the EP dispatch; this one counts every sync a CUDA kernel makes on the
local top-k grouped path (``ep_size = 1``, dropless, no null experts, bf16 on
SM80+), whose budget in docs/design.md ("Device->host syncs") is zero.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from loramoe_ds.model.experts import ExpertBank, local_mixture
from loramoe_ds.model.router import Router

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_grouped_topk_makes_no_sync():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("grouped_mm needs SM80+; the padded bmm fallback reads max(counts)")
    torch.manual_seed(0)
    D, O, E, R, T = 512, 1024, 8, 8, 1000
    bank = ExpertBank(E, D, O, R).cuda().to(torch.bfloat16)
    router = Router(D, E, "topk", 2).cuda().to(torch.bfloat16)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    routing = router(x)
    local_mixture(bank, x, routing, topk_impl="grouped").sum().backward()  # warm-up
    torch.cuda.synchronize()
    routing = router(x)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = local_mixture(bank, x, routing, topk_impl="grouped")
            y.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert not syncs, syncs
