"""``model.attn_implementation`` reaches the model and the packed collation.

The flash-attention varlen path (packed rows as one row with the sequence
boundaries in the batch) runs only on a GPU with the ``flash-attn`` package:
``tests/gpu/test_gpu_attention.py`` compares it with SDPA there (docs/gpu.md).
"""

import pytest
import torch

from loramoe_ds.base_model import from_config
from loramoe_ds.config import RunConfig
from loramoe_ds.plan import check_attention
from loramoe_ds.tiny import tiny_config


def test_config_choice_and_error():
    run = RunConfig.from_dict({"model": {"name": "tiny-llama", "attn_implementation": "eager"}})
    assert run.model.attn_implementation == "eager"
    assert RunConfig.from_dict({}).model.attn_implementation == "default"
    with pytest.raises(ValueError, match=r"model\.attn_implementation='flash'"):
        RunConfig.from_dict({"model": {"attn_implementation": "flash"}})


@pytest.mark.parametrize("attn", ["eager", "sdpa", "default"])
def test_from_config_builds_with_the_kernel(attn):
    model = from_config(tiny_config("llama"), attn_implementation=attn)
    want = "sdpa" if attn == "default" else attn  # transformers' choice for Llama
    assert model.config._attn_implementation == want


def test_flash_refused_where_it_cannot_run(monkeypatch):
    import importlib.util

    check_attention("sdpa")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "flash_attn" else real(n, *a)
    )
    with pytest.raises(ValueError, match=r"^model\.attn_implementation=flash_attention_2: the "):
        check_attention("flash_attention_2")
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA GPUs only"):
        check_attention("flash_attention_2")
