"""Evaluation: world-knowledge QA, downstream accuracy, expert utilisation.

Typical use (no DeepSpeed needed)::

    from loramoe_ds.eval import load_model, evaluate_all
    model, tok = load_model("smollm2", adapter="runs/x/adapter")
    results = evaluate_all(model, tok, limit=20)

``evaluate_all`` runs :func:`~loramoe_ds.eval.knowledge.evaluate_knowledge`
(generation + log-likelihood ranking against distractors),
:func:`~loramoe_ds.eval.downstream.evaluate_downstream` (per-task and macro
accuracy) and, for adapter models,
:func:`~loramoe_ds.eval.utilisation.expert_utilisation`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from torch import nn

from loramoe_ds.data import DataConfig, demo_path
from loramoe_ds.eval.common import (
    DEFAULT_BATCH_SIZE,
    PromptEncoder,
    answer_logliks,
    generate_greedy,
    load_model,
    print0,
    read_jsonl,
)
from loramoe_ds.eval.downstream import evaluate_downstream, score_downstream
from loramoe_ds.eval.knowledge import evaluate_knowledge, knowledge_match, normalize_answer
from loramoe_ds.eval.utilisation import expert_utilisation
from loramoe_ds.model.lm import LoRAMoEModel

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "PromptEncoder",
    "answer_logliks",
    "default_eval_files",
    "evaluate_all",
    "evaluate_downstream",
    "evaluate_knowledge",
    "expert_utilisation",
    "generate_greedy",
    "knowledge_match",
    "load_model",
    "normalize_answer",
    "print0",
    "read_jsonl",
    "score_downstream",
]


def default_eval_files() -> tuple[str, str]:
    """The shipped ``(eval_knowledge.jsonl, eval_downstream.jsonl)``."""
    return demo_path("eval_knowledge.jsonl"), demo_path("eval_downstream.jsonl")


def evaluate_all(
    model: nn.Module,
    tokenizer: Any,
    knowledge_file: str | os.PathLike[str] | None = None,
    downstream_file: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    data_cfg: DataConfig | None = None,
    utilisation: bool = True,
    knowledge_max_new_tokens: int = 16,
    downstream_max_new_tokens: int | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Knowledge QA, downstream accuracy and (adapter models) expert utilisation.

    Args:
        model: HF causal LM or :class:`~loramoe_ds.model.lm.LoRAMoEModel`.
        tokenizer: Its tokenizer.
        knowledge_file: Knowledge JSONL (default: the shipped eval set).
        downstream_file: Downstream JSONL (default: the shipped eval set).
        limit: First ``limit`` records of each file (``None``: all).
        batch_size: Sequences per forward.
        data_cfg: Prompt format of the training run (template, system prompt).
        utilisation: Also measure expert utilisation (adapter models only).
        knowledge_max_new_tokens: Generation budget for knowledge QA.
        downstream_max_new_tokens: Generation budget for downstream tasks
            (``None``: longest gold answer + 4, at least 16).
        verbose: Print each stage's result and time as it finishes (rank 0).

    Returns:
        ``{"knowledge": ..., "downstream": ..., "utilisation"?: ..., "timing": ...}``.
    """
    kf, df = default_eval_files()
    kf, df = knowledge_file or kf, downstream_file or df
    enc = PromptEncoder(tokenizer, data_cfg)
    know = read_jsonl(kf, limit)
    down = read_jsonl(df, limit)
    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "files": {"knowledge": str(kf), "downstream": str(df)},
        "prompt_format": enc.fmt.kind,
    }
    out["knowledge"] = evaluate_knowledge(
        model, enc, know, batch_size, max_new_tokens=knowledge_max_new_tokens
    )
    k = out["knowledge"]
    if verbose:
        print0(
            f"[eval] knowledge n={k['n']}: generation {k['generation']['accuracy']:.3f} "
            f"({k['generation']['seconds']:.0f}s), loglik-rank {k['loglik']['accuracy']:.3f} "
            f"({k['loglik']['seconds']:.0f}s)"
        )
    out["downstream"] = evaluate_downstream(
        model, enc, down, batch_size, max_new_tokens=downstream_max_new_tokens
    )
    d = out["downstream"]
    if verbose:
        print0(
            f"[eval] downstream n={d['n']}: macro {d['macro_accuracy']:.3f} ({d['seconds']:.0f}s)"
        )
    if utilisation and isinstance(model, LoRAMoEModel):
        t1 = time.perf_counter()
        for r in know:
            r.setdefault("task_type", 1)
        for r in down:
            r.setdefault("task_type", 0)
        out["utilisation"] = expert_utilisation(model, enc, know + down, batch_size)
        out["utilisation"]["seconds"] = round(time.perf_counter() - t1, 2)
    out["timing"] = {"eval_s": round(time.perf_counter() - t0, 2)}
    return out
