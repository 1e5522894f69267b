"""A small controlled world for forgetting experiments: generated facts, downstream
tasks, a word-level vocabulary and a tiny Llama pretrained on the facts.

Shape legend: B samples, S positions, V vocabulary.

Everything is deterministic from ``WorldConfig.seed``:

- ``n_entities`` made-up countries, each with 4 attributes (relations): a
  unique capital, a unique leader, a language (pool of 24) and an export (pool
  of 24). Every (country, relation) pair is a fact, asked as one QA template,
  e.g. ``what is the capital of Zorvia ?`` -> ``Quelm``. Every answer is one
  token, so greedy generation and log-likelihood ranking are exact.
- Facts are split in half per fact: ``train`` facts may appear in the SFT mix
  (the LoRAMoE world-knowledge records, ``task_type`` 1); ``heldout`` facts are
  seen only in pretraining and are the knowledge test set (all of them).
- Downstream tasks (``task_type`` 0), never seen in pretraining, on lists of 3-7
  digits: the ``first``, the ``last`` and the largest (``max``) digit, and
  ``count`` (how many). Their answers are digits, so after SFT a model that
  has lost the QA behaviour answers knowledge questions with digits.

Records are ``{"prompt": [ids], "answer": [ids], "task": str, "task_type": int}``
(``answer`` ends with ``</s>``); prompts are ``<s> <user> ... <asst>``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SPECIALS = ("<pad>", "<s>", "</s>", "<user>", "<asst>")
PAD, BOS, EOS, USER, ASST = range(len(SPECIALS))
RELATIONS = {
    "capital": "what is the capital of {} ?",
    "leader": "who leads {} ?",
    "language": "which language is spoken in {} ?",
    "export": "what does {} export ?",
}
POOL = 24
"""Size of the shared answer pools (language, export)."""
TASKS = ("first", "last", "count", "max")
TASK_PROMPTS = {
    "first": "what is the first digit : {}",
    "last": "what is the last digit : {}",
    "count": "how many digits : {}",
    "max": "what is the largest digit : {}",
}
_ONSETS = "b c d f g k l m n p r s t v z br dr gr kr pl st tr th sh".split()
_VOWELS = "a e i o u ai ei ou ia".split()
_CODAS = ["", "", "n", "r", "l", "s", "m", "x"]


@dataclass(frozen=True)
class WorldConfig:
    """What the world holds (hashing these fields names the pretrained cache)."""

    seed: int = 0
    n_entities: int = 160
    heldout_frac: float = 0.5

    def __post_init__(self) -> None:
        if self.n_entities < 8:
            raise ValueError(f"n_entities={self.n_entities}: need >= 8")
        if not 0.0 < self.heldout_frac < 1.0:
            raise ValueError(f"heldout_frac={self.heldout_frac}: must be in (0, 1)")


def _names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """``n`` new capitalised pronounceable names, none in ``taken`` (updated)."""
    out = []
    while len(out) < n:
        k = rng.choice((2, 2, 3))
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(k))
        name = (name + rng.choice(_CODAS)).capitalize()
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


class World:
    """Facts, vocabulary and task generators of one :class:`WorldConfig`."""

    def __init__(self, cfg: WorldConfig):
        self.cfg = cfg
        rng = random.Random(f"world/{cfg.seed}")
        taken: set[str] = set()
        n = cfg.n_entities
        self.entities = _names(rng, n, taken)
        self.pools = {
            "capital": _names(rng, n, taken),
            "leader": _names(rng, n, taken),
            "language": [s.lower() + "ish" for s in _names(rng, POOL, taken)],
            "export": [s.lower() for s in _names(rng, POOL, taken)],
        }
        self.facts: list[dict[str, Any]] = []
        for i, ent in enumerate(self.entities):
            for rel in RELATIONS:
                pool = self.pools[rel]
                ans = pool[i] if len(pool) == n else rng.choice(pool)
                others = [p for p in pool if p != ans]
                self.facts.append(
                    {
                        "entity": ent,
                        "relation": rel,
                        "answer": ans,
                        "distractors": rng.sample(others, 3),
                        "split": "heldout" if rng.random() < cfg.heldout_frac else "train",
                    }
                )
        words = " ".join(list(RELATIONS.values()) + list(TASK_PROMPTS.values()))
        template = sorted(set(words.replace("{}", " ").split()))
        digits = [str(d) for d in range(10)]
        names = self.entities + [w for pool in self.pools.values() for w in pool]
        self.itos = list(SPECIALS) + template + digits + sorted(set(names))
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    # -- tokens ------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Space-separated words -> ids (every word of the world is one token)."""
        return [self.stoi[w] for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.itos[i] for i in ids)

    def record(self, question: str, answer: str, task: str, task_type: int) -> dict[str, Any]:
        return {
            "prompt": [BOS, USER, *self.encode(question), ASST],
            "answer": [*self.encode(answer), EOS],
            "task": task,
            "task_type": task_type,
        }

    # -- facts -------------------------------------------------------------
    def fact_record(self, fact: dict[str, Any]) -> dict[str, Any]:
        """The QA record of a fact (``task_type`` 1)."""
        q = RELATIONS[fact["relation"]].format(fact["entity"])
        rec = self.record(q, fact["answer"], "knowledge/" + fact["relation"], 1)
        rec["candidates"] = [self.stoi[w] for w in [fact["answer"], *fact["distractors"]]]
        pool = self.pools[fact["relation"]]
        rec["pool"] = [self.stoi[fact["answer"]]] + [
            self.stoi[w] for w in pool if w != fact["answer"]
        ]
        return rec

    def facts_of(self, split: str | None = None) -> list[dict[str, Any]]:
        return [f for f in self.facts if split is None or f["split"] == split]

    # -- downstream tasks ---------------------------------------------------
    def task_record(self, task: str, rng: random.Random) -> dict[str, Any]:
        """One random example of a downstream task (``task_type`` 0)."""
        items = [str(rng.randrange(10)) for _ in range(rng.randint(3, 7))]
        if task == "first":
            ans = items[:1]
        elif task == "last":
            ans = items[-1:]
        elif task == "count":
            ans = [str(len(items))]
        elif task == "max":
            ans = [max(items)]
        else:
            raise ValueError(f"task={task!r}: valid tasks are {list(TASKS)}")
        return self.record(TASK_PROMPTS[task].format(" ".join(items)), " ".join(ans), task, 0)

    def downstream(self, per_task: int, split: str) -> list[dict[str, Any]]:
        """``per_task`` records of every task; ``split`` ``train``/``eval`` use disjoint
        seeds, and a larger ``per_task`` extends the smaller list (nested sizes)."""
        out = []
        for task in TASKS:
            rng = random.Random(f"{self.cfg.seed}/{split}/{task}")
            out.extend(self.task_record(task, rng) for _ in range(per_task))
        return out

    def knowledge_train(self, n: int) -> list[dict[str, Any]]:
        """``n`` QA records of ``train`` facts (nested: a seeded order, cycled if short)."""
        facts = self.facts_of("train")
        random.Random(f"{self.cfg.seed}/know").shuffle(facts)
        return [self.fact_record(facts[i % len(facts)]) for i in range(n)]


def collate(records: list[dict[str, Any]], device: str = "cpu") -> dict[str, Any]:
    """Right-padded batch: ``input_ids, attention_mask, labels`` (B,S) and ``task_type`` (B,).

    ``labels`` follow the HF convention (the loss at t predicts ``labels[t]``)
    and are -100 everywhere but the answer tokens.
    """
    import torch

    S = max(len(r["prompt"]) + len(r["answer"]) for r in records)
    ids = torch.full((len(records), S), PAD, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(records):
        seq = r["prompt"] + r["answer"]
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
        labels[b, len(r["prompt"]) : len(seq)] = torch.tensor(r["answer"])
    tt = torch.tensor([r["task_type"] for r in records], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_type": tt}
    return {k: v.to(device) for k, v in out.items()}


# -- the pretrained base model ------------------------------------------------------------


@dataclass(frozen=True)
class PretrainConfig:
    """Tiny Llama and the schedule that teaches it every fact."""

    layers: int = 4
    hidden: int = 128
    intermediate: int = 384
    heads: int = 4
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


def build_model(vocab_size: int, pcfg: PretrainConfig) -> Any:
    """A randomly initialised Llama of ``pcfg``'s shape (fp32)."""
    import torch
    import transformers

    torch.manual_seed(pcfg.seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=pcfg.hidden,
        intermediate_size=pcfg.intermediate,
        num_hidden_layers=pcfg.layers,
        num_attention_heads=pcfg.heads,
        num_key_value_heads=pcfg.heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return transformers.LlamaForCausalLM(cfg)


def cache_key(wcfg: WorldConfig, pcfg: PretrainConfig) -> str:
    """Hash of both configs *and* the generated world (vocabulary, facts, templates):
    any change to the generator gives a new cache entry, never a stale model."""
    world = World(wcfg)
    blob = json.dumps(
        {
            "world": asdict(wcfg),
            "pretrain": asdict(pcfg),
            "itos": world.itos,
            "facts": world.facts,
            "relations": RELATIONS,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_root() -> Path:
    return Path(os.environ.get("LORAMOE_CACHE", Path.home() / ".cache" / "loramoe_ds"))


def pretrained_base(
    wcfg: WorldConfig,
    pcfg: PretrainConfig,
    cache_root: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    log: Any = print,
) -> tuple[Any, dict[str, Any]]:
    """The base model that knows the world's facts: loaded from the cache or pretrained.

    Pretraining: AdamW, warmup + cosine, on the QA records of *every* fact (loss
    on the answer); the downstream tasks are never seen. Saved atomically under
    ``<cache_root>/fact_world/<hash of both configs>``.

    Returns:
        ``(model in eval mode on device, info)`` with the pretraining loss/time.
    """
    import torch
    import transformers

    from loramoe_ds.io import atomic_dir

    world = World(wcfg)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    path = root / "fact_world" / cache_key(wcfg, pcfg)
    if (path / "config.json").is_file():
        model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
        info = json.loads((path / "pretrain_info.json").read_text())
        return model.to(device).eval(), info

    model = build_model(world.vocab_size, pcfg).to(device)
    recs = [world.fact_record(f) for f in world.facts]
    opt = torch.optim.AdamW(model.parameters(), lr=pcfg.lr, weight_decay=0.0)
    warm = max(pcfg.steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, pcfg.steps, warm))
    rng = random.Random(pcfg.seed)
    order: list[int] = []
    t0 = __import__("time").perf_counter()
    model.train()
    for step in range(pcfg.steps):
        if len(order) < pcfg.batch_size:
            order += rng.sample(range(len(recs)), len(recs))
        batch = collate([recs[order.pop()] for _ in range(pcfg.batch_size)], device)
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 500 == 0 or step == 0:
            log(f"  pretrain step {step + 1}/{pcfg.steps} loss {loss.item():.4f}")
    info = {"steps": pcfg.steps, "final_loss": loss.item(), "seconds": 0.0}
    info["seconds"] = round(__import__("time").perf_counter() - t0, 1)
    model.eval()
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        (tmp / "pretrain_info.json").write_text(json.dumps(info))
    return model, info


def lr_factor(step: int, total: int, warmup: int, final: float = 0.1) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine to ``final`` (step from 0)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token CE over labelled positions (the same math as ``LoRAMoEModel``)."""
    import torch

    logits_BSV = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target_BS = batch["labels"][:, 1:]
    keep_BS = target_BS != -100
    return torch.nn.functional.cross_entropy(
        logits_BSV[:, :-1][keep_BS].float(), target_BS[keep_BS]
    )
