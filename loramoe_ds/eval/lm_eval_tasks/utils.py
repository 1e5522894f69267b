"""Datasets and scoring of the shipped lm-evaluation-harness tasks (offline: the demo eval
sets inside the package; ``--metadata '{"data_file": PATH}'`` points a task at another
JSONL of the same fields)."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo"


def _load(default: str, data_file: str | None = None):
    import datasets

    path = Path(data_file) if data_file else DEMO / default
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in rows:
        r["input"] = r.get("input") or ""
        r["aliases"] = list(r.get("aliases") or [])
        r["distractors"] = list(r.get("distractors") or [])
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def knowledge(data_file: str | None = None, **_: object):
    """The knowledge QA set (``output``, ``aliases``, ``distractors``)."""
    return _load("eval_knowledge.jsonl", data_file)


def downstream(data_file: str | None = None, **_: object):
    """The downstream task set (``output`` is the exact answer)."""
    return _load("eval_downstream.jsonl", data_file)


def prompt(doc: dict) -> str:
    """The user message, as in training: the instruction, then the input if any."""
    return f"{doc['instruction']}\n\n{doc['input']}" if doc["input"] else doc["instruction"]


def normalise(text: str) -> str:
    """Lower case, punctuation and articles dropped, whitespace collapsed (SQuAD style)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def tolerant_match(doc: dict, results: list[str]) -> dict[str, float]:
    """1 when the normalised gold answer or an alias occurs in the normalised generation."""
    pred = normalise(results[0])
    golds = [normalise(g) for g in [doc["output"], *doc["aliases"]]]
    return {"tolerant_match": float(any(g and g in pred for g in golds))}


def exact_match(doc: dict, results: list[str]) -> dict[str, float]:
    """1 when the normalised generation (first line) equals the normalised answer."""
    first = results[0].strip().split("\n")[0] if results[0].strip() else ""
    return {"exact_match": float(normalise(first) == normalise(doc["output"]))}


def choices(doc: dict) -> list[str]:
    """The gold answer first, then the distractors."""
    return [doc["output"], *doc["distractors"]]
