"""Downstream task accuracy: greedy generation scored by a task-appropriate match.

The whole generation (up to EOS, surrounding whitespace stripped) must *be* the
answer; a verbose answer that merely contains it is wrong under ``accuracy``
but counted under the lenient diagnostic ``contains`` (normalised gold answer is
a whole-word span of the normalised generation, the knowledge rule), which
separates format drift from task failure.

Match rules (:data:`MATCHERS`, by the record's ``task``):

==================  =========================================================
sentiment           label: :func:`~loramoe_ds.eval.knowledge.normalize_answer`
                    equality ("Negative." == "negative")
extract_name,       exact after collapsing whitespace, dropping one trailing
extract_number,     ``.`` and case-folding ("sven." == "Sven"; "77" != "77 cookies")
arithmetic
uppercase           exact and case-sensitive (case *is* the task); only
                    whitespace runs are collapsed
reverse_list        comma-separated items equal in order, each item stripped and
                    case-folded, trailing ``.`` dropped
to_json             both parse as JSON and the parsed values are equal (key
                    order and spacing free); unparseable output is wrong
anything else       exact after collapsing whitespace and case-folding
==================  =========================================================

The macro average weights every task equally; ``micro_accuracy`` pools records.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from loramoe_ds.eval.common import DEFAULT_BATCH_SIZE, PromptEncoder, generate_greedy
from loramoe_ds.eval.knowledge import knowledge_match, normalize_answer

_SPACES = re.compile(r"\s+")


def _squash(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def _drop_period(text: str) -> str:
    return text[:-1].rstrip() if text.endswith(".") else text


def match_label(gen: str, gold: str) -> bool:
    """Classification: normalised label equality."""
    return normalize_answer(gen) == normalize_answer(gold)


def match_exact(gen: str, gold: str) -> bool:
    """Extraction / arithmetic: exact up to whitespace, one trailing period and case."""
    return _drop_period(_squash(gen)).casefold() == _drop_period(_squash(gold)).casefold()


def match_case_sensitive(gen: str, gold: str) -> bool:
    """Case transformations: exact, case-sensitive, whitespace runs collapsed."""
    return _squash(gen) == _squash(gold)


def match_list(gen: str, gold: str) -> bool:
    """Lists: comma-separated items equal in order (stripped, case-folded)."""

    def items(s: str) -> list[str]:
        return [x.strip().casefold() for x in _drop_period(_squash(s)).split(",")]

    return items(gen) == items(gold)


def match_json(gen: str, gold: str) -> bool:
    """JSON: both parse and the parsed values are equal."""
    try:
        return json.loads(gen.strip()) == json.loads(gold)
    except (json.JSONDecodeError, TypeError):
        return False


def match_default(gen: str, gold: str) -> bool:
    """Fallback: exact after collapsing whitespace and case-folding."""
    return _squash(gen).casefold() == _squash(gold).casefold()


MATCHERS: dict[str, Callable[[str, str], bool]] = {
    "sentiment": match_label,
    "extract_name": match_exact,
    "extract_number": match_exact,
    "arithmetic": match_exact,
    "uppercase": match_case_sensitive,
    "reverse_list": match_list,
    "to_json": match_json,
}
"""Task name -> ``match(generation, gold)``; unknown tasks use :func:`match_default`."""


def score_downstream(task: str, generation: str, gold: str) -> bool:
    """Whether ``generation`` answers a ``task`` record whose answer is ``gold``."""
    return MATCHERS.get(task, match_default)(generation, gold)


def default_max_new_tokens(enc: PromptEncoder, records: Sequence[dict], floor: int = 16) -> int:
    """``max(floor, longest gold answer in tokens + 4)``: never truncates a right answer."""
    longest = max((len(a) for a in enc.answers([r["output"] for r in records])), default=0)
    return max(floor, longest + 4)


def evaluate_downstream(
    model: nn.Module,
    enc: PromptEncoder,
    records: Sequence[dict],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Per-task and macro accuracy of greedy generation.

    Args:
        model: HF causal LM or :class:`~loramoe_ds.model.lm.LoRAMoEModel`.
        enc: Prompt encoder (training's prompt format).
        records: ``{instruction, input, output, task}`` records.
        batch_size: Prompts per generate call.
        max_new_tokens: Generation budget; ``None``: :func:`default_max_new_tokens`.

    Returns:
        ``{"n", "macro_accuracy", "micro_accuracy", "macro_contains",
        "per_task": {task: {"n", "correct", "accuracy", "contains"}},
        "max_new_tokens", "seconds", "predictions": [...]}``.
    """
    records = list(records)
    t0 = time.perf_counter()
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(enc, records)
    gens = generate_greedy(model, enc.prompts(records), enc, max_new_tokens, batch_size)
    per_task: dict[str, dict[str, Any]] = {}
    preds = []
    for r, g in zip(records, gens):
        task = r.get("task") or "downstream"
        ok = score_downstream(task, g, r["output"])
        loose = knowledge_match(g, [r["output"]])
        t = per_task.setdefault(task, {"n": 0, "correct": 0, "contains_correct": 0})
        t["n"] += 1
        t["correct"] += int(ok)
        t["contains_correct"] += int(loose)
        preds.append({"task": task, "gold": r["output"], "generation": g, "correct": ok})
    for t in per_task.values():
        t["accuracy"] = t["correct"] / t["n"]
        t["contains"] = t["contains_correct"] / t["n"]
    k = max(len(per_task), 1)
    return {
        "n": len(records),
        "macro_accuracy": sum(t["accuracy"] for t in per_task.values()) / k,
        "micro_accuracy": sum(t["correct"] for t in per_task.values()) / max(len(records), 1),
        "macro_contains": sum(t["contains"] for t in per_task.values()) / k,
        "per_task": dict(sorted(per_task.items())),
        "max_new_tokens": max_new_tokens,
        "seconds": round(time.perf_counter() - t0, 2),
        "predictions": preds,
    }
