"""flash_attention_2's varlen path on packed rows equals SDPA on padded rows (GPU, bf16).

Needs a CUDA GPU and the optional ``flash-attn`` package (``pip install .[flash]``);
skipped otherwise. The CPU tests only show that ``model.attn_implementation``
reaches the model and the collator (tests/unit/test_attn_implementation.py).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_packing import _equality_records

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        importlib.util.find_spec("flash_attn") is None, reason="needs the flash-attn package"
    ),
]


def test_flash_varlen_packed_equals_sdpa_padded():
    from loramoe_ds.config import AdapterConfig
    from loramoe_ds.data import Collator, PackedCollator
    from loramoe_ds.data.packing import pack_first_fit_decreasing
    from loramoe_ds.model.inject import inject
    from loramoe_ds.tiny import tiny_model

    cfg = AdapterConfig(router="topk", num_experts=4, top_k=2, rank=8, alpha=16.0, dropout=0.0)
    records = _equality_records(10, seed=5)
    rows = pack_first_fit_decreasing(range(10), [len(r["input_ids"]) for r in records], 40)
    losses = {}
    for attn in ("sdpa", "flash_attention_2"):
        base = tiny_model("llama", seed=3, hidden=128)
        base.set_attn_implementation(attn)
        model = inject(base, cfg).cuda().to(torch.bfloat16)
        if attn == "sdpa":
            batch = Collator(0)(records)
        else:
            batch = PackedCollator(0, flash_attn_kwargs=True)(
                [[records[i] for i in row] for row in rows]
            )
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        losses[attn] = float(model(**batch).lm_loss)
    a, b = losses["sdpa"], losses["flash_attention_2"]
    assert abs(a - b) <= 2e-2 * abs(a), losses
