"""The cached SmolLM2 directory behaves like any HF model: its config has no GGUF
quantization_config, and a model loaded from it saves and reloads. Tested on a tiny Llama
written the way an older conversion left it (no GGUF file needed)."""

from __future__ import annotations

import json

import pytest
import torch

from loramoe_ds.smollm2 import CACHE_VERSION, MARKER, ensure_smollm2
from loramoe_ds.tiny import tiny_model

GGUF_QUANT = {"dequantize": False, "gguf_file": "x.gguf", "quant_method": "gguf"}


@pytest.fixture
def old_cache(tmp_path):
    d = tmp_path / "smollm2-135m-instruct"
    tiny_model("llama", layers=2).save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "quantization_config": GGUF_QUANT}))
    return d


def test_old_cache_refuses_save_then_is_cleaned_in_place(old_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    stale = AutoModelForCausalLM.from_pretrained(old_cache, dtype=torch.float32)
    with pytest.raises(Exception, match="(?i)gguf|quantiz|serializ"):
        stale.save_pretrained(tmp_path / "stale_copy")
    before = (old_cache / "model.safetensors").stat().st_mtime_ns

    assert ensure_smollm2(old_cache) == old_cache  # no GGUF read: only the config changes
    assert (old_cache / "model.safetensors").stat().st_mtime_ns == before
    assert "quantization_config" not in json.loads((old_cache / "config.json").read_text())
    assert json.loads((old_cache / MARKER).read_text()) == {"version": CACHE_VERSION}

    model = AutoModelForCausalLM.from_pretrained(old_cache, dtype=torch.float32)
    model.save_pretrained(tmp_path / "copy")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "copy", dtype=torch.float32)
    ref = model.state_dict()
    for name, t in again.state_dict().items():
        assert torch.equal(t, ref[name]), name
    ids = torch.tensor([[1, 5, 9, 2]])
    assert torch.equal(model(ids).logits, again(ids).logits)
