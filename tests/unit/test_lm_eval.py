"""lm-evaluation-harness on a LoRAMoE adapter, offline, on the tiny model: the shipped
tasks run, and the multiple-choice accuracy equals a plain loop over the same strings."""

from __future__ import annotations

import json

import pytest
import torch

from loramoe_ds.config import AdapterConfig
from loramoe_ds.data import demo_path
from loramoe_ds.eval.harness import SHIPPED_TASKS, run_lm_eval
from loramoe_ds.model.inject import inject
from loramoe_ds.tiny import tiny_model
from loramoe_ds.tiny import tiny_sp_tokenizer as tiny_tokenizer

LIMIT = 6


@pytest.fixture(scope="module")
def adapted():
    tok = tiny_tokenizer(chat=True)
    cfg = AdapterConfig(router="soft", num_experts=2, rank=2, dropout=0.0)
    model = inject(tiny_model("llama", vocab_size=len(tok)), cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.adapter_params():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, tok


def _loglik(lm, tok, context: str, choice: str) -> float:
    """Sum log p(choice | context), the continuation split as lm-eval splits it."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + choice, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx) :]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(lm(input_ids=ids).logits[0].double(), -1)
    n = len(whole)
    return float(sum(logp[n - len(cont) - 1 + i, t] for i, t in enumerate(cont)))


def test_shipped_tasks_score_an_adapter_offline(adapted, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = adapted
    res = run_lm_eval(model, tok, ["loramoe"], limit=LIMIT, batch_size=4)
    assert set(SHIPPED_TASKS) <= set(res)
    assert 0.0 <= res["loramoe_knowledge_gen"]["tolerant_match"] <= 1.0
    assert 0.0 <= res["loramoe_downstream"]["exact_match"] <= 1.0

    # The multiple-choice accuracy, recomputed with plain forward passes of the
    # adapted model over the chat-rendered prompt and each choice.
    docs = [json.loads(x) for x in open(demo_path("eval_knowledge.jsonl"))][:LIMIT]
    correct = 0
    for d in docs:
        user = f"{d['instruction']}\n\n{d['input']}" if d.get("input") else d["instruction"]
        context = tok.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
        lls = [_loglik(model.base, tok, context, c) for c in [d["output"], *d["distractors"]]]
        correct += int(max(range(len(lls)), key=lls.__getitem__) == 0)
    assert res["loramoe_knowledge_mc"]["acc"] == pytest.approx(correct / LIMIT)


def test_adapter_changes_the_scores(adapted):
    # The experts are in the evaluated path: zeroing lora_B (delta 0) changes the
    # log-likelihood lm-eval computes, to the unadapted base model's.
    from loramoe_ds.eval.harness import hflm

    model, tok = adapted
    lm = hflm(model, tok, batch_size=2)
    from lm_eval.api.instance import Instance

    req = [Instance("loglikelihood", {}, ("What is the capital of France?", " Paris"), 0)]
    before = lm.loglikelihood(req)[0][0]
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    try:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.zero_()
        after = lm.loglikelihood(req)[0][0]
        plain = tiny_model("llama", vocab_size=len(tok)).eval()  # same seed: the base alone
        base_only = _loglik(plain, tok, "What is the capital of France?", " Paris")
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    assert before != pytest.approx(after, abs=1e-6)
    assert after == pytest.approx(base_only, abs=1e-4)
