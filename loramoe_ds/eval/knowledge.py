"""Closed-book world-knowledge QA, measured two ways.

1. **Generation** (what a user sees): greedy decoding, at most ``max_new_tokens``
   new tokens, scored by :func:`knowledge_match`: the record is correct when the
   normalised gold answer *or any alias* occurs as a whole-word span inside the
   normalised generation. Normalisation (:func:`normalize_answer`): Unicode NFKC,
   lower case; in numbers thousands commas are dropped ("1,000" -> "1000") and
   zero decimals too ("100.0" -> "100"); every other punctuation character (and
   ``_``) becomes a space; the articles ``a an the`` are removed; whitespace is
   collapsed. So "The capital is Paris." matches "Paris", "twenty-four" matches
   "twenty four", "J.R.R. Tolkien" matches "J. R. R. Tolkien", "Newton's laws"
   matches "Newton", but "U" does not match inside "Uranium".
2. **Log-likelihood ranking** (format-robust): the gold answer and each of the
   record's ``distractors`` are scored by the summed log-probability of their
   tokens after the prompt (:func:`~loramoe_ds.eval.common.answer_logliks`);
   the record is correct when the gold answer scores strictly highest. Reported
   beside it: the same ranking with per-token mean log-probability (less biased
   toward short answers) and the mean log-likelihood of the gold answer.

SFT often changes answer *format* (terse or bare answers) more than knowledge,
which the generation metric counts as forgetting; the ranking metric does not
depend on format, so a drop in both is real forgetting.

Records: ``{instruction, input?, output, aliases?, distractors, task?}``.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Sequence
from typing import Any

from torch import nn

from loramoe_ds.eval.common import (
    DEFAULT_BATCH_SIZE,
    PromptEncoder,
    answer_logliks,
    generate_greedy,
)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_ZERO_DECIMALS = re.compile(r"(?<=\d)\.0+\b")
_PUNCT = re.compile(r"[^\w\s]|_")
_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """SQuAD-style answer normalisation (see the module docstring for the rule)."""
    s = unicodedata.normalize("NFKC", text).lower()
    s = _ZERO_DECIMALS.sub("", _THOUSANDS.sub("", s))
    s = _PUNCT.sub(" ", s)
    s = _ARTICLES.sub(" ", s)
    return _SPACES.sub(" ", s).strip()


def knowledge_match(generation: str, answers: Sequence[str]) -> bool:
    """True when any normalised answer is a whole-word span of the normalised generation.

    Args:
        generation: Model output.
        answers: The gold answer followed by its aliases; answers that
            normalise to the empty string are ignored.
    """
    gen = f" {normalize_answer(generation)} "
    for ans in answers:
        a = normalize_answer(ans)
        if a and f" {a} " in gen:
            return True
    return False


def evaluate_knowledge(
    model: nn.Module,
    enc: PromptEncoder,
    records: Sequence[dict],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = 16,
    generation: bool = True,
    loglik: bool = True,
) -> dict[str, Any]:
    """Knowledge QA accuracy by generation and by log-likelihood ranking.

    Args:
        model: HF causal LM or :class:`~loramoe_ds.model.lm.LoRAMoEModel`.
        enc: Prompt encoder (training's prompt format).
        records: Knowledge records (see the module docstring).
        batch_size: Sequences per forward.
        max_new_tokens: Generation budget.
        generation: Run the generation metric.
        loglik: Run the ranking metric (records without distractors are
            skipped and counted in ``loglik.skipped``).

    Returns:
        ``{"n", "generation": {"accuracy", "correct", "seconds"},
        "loglik": {"accuracy", "accuracy_per_token", "mean_answer_loglik",
        "n", "skipped", "seconds"}, "per_task": {task: {...}}, "predictions": [...]}``.
    """
    records = list(records)
    prompts = enc.prompts(records)
    preds: list[dict[str, Any]] = [
        {"instruction": r["instruction"], "gold": r["output"], "task": r.get("task", "knowledge")}
        for r in records
    ]
    res: dict[str, Any] = {"n": len(records)}
    if generation:
        t0 = time.perf_counter()
        gens = generate_greedy(model, prompts, enc, max_new_tokens, batch_size)
        n_ok = 0
        for p, r, g in zip(preds, records, gens):
            p["generation"] = g
            p["gen_correct"] = knowledge_match(g, [r["output"], *(r.get("aliases") or [])])
            n_ok += p["gen_correct"]
        res["generation"] = {
            "accuracy": n_ok / max(len(records), 1),
            "correct": n_ok,
            "max_new_tokens": max_new_tokens,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    if loglik:
        t0 = time.perf_counter()
        pair_prompt, pair_answer, spans = [], [], []
        for i, r in enumerate(records):
            cands = [r["output"], *(r.get("distractors") or [])]
            if len(cands) < 2:
                spans.append(None)
                continue
            ans_ids = enc.answers(cands)
            spans.append((len(pair_answer), len(cands)))
            pair_prompt.extend([prompts[i]] * len(cands))
            pair_answer.extend(ans_ids)
        ll = answer_logliks(model, pair_prompt, pair_answer, enc.pad_id, batch_size)
        n_ok = n_ok_tok = 0
        gold_ll = []
        for p, span in zip(preds, spans):
            if span is None:
                continue
            s, k = span
            sc = ll[s : s + k]
            mean_tok = [v / len(pair_answer[s + j]) for j, v in enumerate(sc)]
            p["loglik"] = [round(v, 4) for v in sc]
            p["ll_correct"] = all(sc[0] > v for v in sc[1:])
            p["ll_tok_correct"] = all(mean_tok[0] > v for v in mean_tok[1:])
            n_ok += p["ll_correct"]
            n_ok_tok += p["ll_tok_correct"]
            gold_ll.append(sc[0])
        n = len(gold_ll)
        res["loglik"] = {
            "accuracy": n_ok / max(n, 1),
            "accuracy_per_token": n_ok_tok / max(n, 1),
            "mean_answer_loglik": sum(gold_ll) / max(n, 1),
            "correct": n_ok,
            "n": n,
            "skipped": len(records) - n,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    per_task: dict[str, dict[str, Any]] = {}
    for p in preds:
        t = per_task.setdefault(p["task"], {"n": 0, "gen_correct": 0, "ll_correct": 0})
        t["n"] += 1
        t["gen_correct"] += int(p.get("gen_correct", False))
        t["ll_correct"] += int(p.get("ll_correct", False))
    res["per_task"] = dict(sorted(per_task.items()))
    res["predictions"] = preds
    return res
