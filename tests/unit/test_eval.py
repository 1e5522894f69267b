"""Evaluation: batched log-likelihoods and generation vs one-at-a-time loops, the
answer scorers, utilisation vs a hand computation, adapter dir vs in-memory."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from loramoe_ds import AdapterConfig, inject, save_adapter
from loramoe_ds.data import DataConfig
from loramoe_ds.eval import (
    PromptEncoder,
    answer_logliks,
    evaluate_all,
    evaluate_knowledge,
    expert_utilisation,
    generate_greedy,
    knowledge_match,
    load_model,
    normalize_answer,
    score_downstream,
)
from loramoe_ds.model.losses import knowledge_group
from loramoe_ds.tiny import tiny_model
from loramoe_ds.tiny import tiny_sp_tokenizer as tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]

KNOW = [
    {
        "instruction": "What is the capital of France?",
        "output": "Paris",
        "aliases": [],
        "distractors": ["Rome", "the capital", "Hamlet"],
        "task_type": 1,
        "task": "knowledge/capital",
    },
    {
        "instruction": "Who wrote Hamlet?",
        "output": "William Shakespeare",
        "aliases": ["Shakespeare"],
        "distractors": ["Alice", "Bob the market man"],
        "task_type": 1,
        "task": "knowledge/author",
    },
    {
        "instruction": "Reverse the order of the list: apple, pear, fig, plum. Which is first?",
        "output": "plum",
        "distractors": ["apple", "pear", "fig"],
        "task_type": 1,
        "task": "knowledge/word",
    },
]
DOWN = [
    {
        "instruction": "Classify the sentiment of the review as positive or negative.",
        "input": "The movie was wonderful.",
        "output": "positive",
        "task_type": 0,
        "task": "sentiment",
    },
    {
        "instruction": "Compute the sum.",
        "input": "347 + 128",
        "output": "475",
        "task_type": 0,
        "task": "arithmetic",
    },
    {
        "instruction": "Convert the text to uppercase.",
        "input": "river stone cloud river stone",
        "output": "RIVER STONE CLOUD RIVER STONE",
        "task_type": 0,
        "task": "uppercase",
    },
]


def _setup(chat: bool = True, seed: int = 0):
    tok = tiny_tokenizer(chat=chat)
    model = tiny_model("llama", seed=seed, vocab_size=len(tok)).eval()
    return model, tok


def _randomise_adapter(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_params():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _adapter_model(router: str = "soft", seed: int = 0):
    base, tok = _setup(seed=seed)
    cfg = AdapterConfig(router=router, num_experts=[2, 4, 6, 3], rank=2, dropout=0.0)
    model = inject(base, cfg).eval()
    _randomise_adapter(model)
    return model, tok


# -- log-likelihood ranking ------------------------------------------------


@pytest.mark.parametrize("chat", [True, False])
def test_answer_logliks_equal_one_sequence_at_a_time(chat):
    model, tok = _setup(chat=chat)
    enc = PromptEncoder(tok)
    prompts = enc.prompts(KNOW + DOWN)
    assert len({len(p) for p in prompts}) > 3, "prompts must differ in length"
    answers = enc.answers(["Paris", "William Shakespeare", "plum", "positive", "475", "RIVER"])
    got = answer_logliks(model, prompts, answers, enc.pad_id, batch_size=4)
    for p, a, v in zip(prompts, answers, got):
        ids = torch.tensor([p + a])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        ref = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(a))
        assert v == pytest.approx(ref, abs=1e-4)


def test_knowledge_ranking_matches_hand_argmax():
    model, tok = _setup()
    enc = PromptEncoder(tok)
    res = evaluate_knowledge(model, enc, KNOW, batch_size=3, generation=False)
    n_ok, golds = 0, []
    for r, p in zip(KNOW, enc.prompts(KNOW)):
        cands = [r["output"], *r["distractors"]]
        lls = []
        for a in enc.answers(cands):
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + a])).logits[0], -1)
            lls.append(sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(a)))
        n_ok += all(lls[0] > v for v in lls[1:])
        golds.append(lls[0])
    assert res["loglik"]["correct"] == n_ok
    assert res["loglik"]["accuracy"] == pytest.approx(n_ok / len(KNOW))
    assert res["loglik"]["mean_answer_loglik"] == pytest.approx(sum(golds) / 3, abs=1e-4)
    assert "generation" not in res


def test_prompts_match_training_tokenisation():
    from loramoe_ds.data.tokenize import _Tokenize

    _, tok = _setup(chat=False)
    enc = PromptEncoder(tok)
    batch = {k: [r.get(k, "") for r in DOWN] for k in ("instruction", "input", "output")}
    batch.update(source=[0] * 3, line=[1, 2, 3])
    ref = _Tokenize(tok, DataConfig(), ["x.jsonl"])(batch)
    for p, a, ids, plen in zip(
        enc.prompts(DOWN),
        enc.answers([r["output"] for r in DOWN]),
        ref["input_ids"],
        ref["prompt_len"],
    ):
        assert p == ids[:plen] and p + a + [enc.eos_id] == ids


# -- generation ---------------------------------------------------------------


@pytest.mark.parametrize("adapter", [False, True])
def test_batched_left_padded_generation_equals_one_at_a_time(adapter):
    model, tok = _adapter_model() if adapter else _setup()
    enc = PromptEncoder(tok)
    prompts = enc.prompts(KNOW + DOWN)
    batched = generate_greedy(model, prompts, enc, max_new_tokens=6, batch_size=4)
    single = [generate_greedy(model, [p], enc, 6, 1)[0] for p in prompts]
    assert batched == single
    assert any(batched)


@pytest.mark.parametrize(
    "text,norm",
    [
        ("The capital is Paris.", "capital is paris"),
        ("  Twenty-Four ", "twenty four"),
        ("CO₂", "co2"),
        ("a  blue\nwhale!", "blue whale"),
        ("about 100.0 degrees", "about 100 degrees"),
        ("1,000 years, 3.5 m", "1000 years 3 5 m"),
        ("J.R.R. Tolkien", "j r r tolkien"),
        ("Newton's snake_case", "newton s snake case"),
    ],
)
def test_normalize_answer(text, norm):
    assert normalize_answer(text) == norm


@pytest.mark.parametrize(
    "gen,answers,ok",
    [
        ("The capital of France is Paris.", ["Paris"], True),
        ("paris", ["Paris"], True),
        ("Parisian food", ["Paris"], False),  # whole words only
        ("Uranium", ["U"], False),
        ("The symbol is U.", ["U"], True),
        ("There are twenty-four hours.", ["24", "twenty-four"], True),
        ("It is the Atlantic.", ["the Atlantic Ocean", "Atlantic"], True),
        ("written by J.R.R. Tolkien", ["J. R. R. Tolkien"], True),
        ("Boiling: 100.0 degrees Celsius.", ["100 degrees"], True),
        ("Newton's laws", ["Isaac Newton", "Newton"], True),
        ("the", ["the", ""], False),  # answers that normalise to "" never match
        ("", ["Paris"], False),
    ],
)
def test_knowledge_match(gen, answers, ok):
    assert knowledge_match(gen, answers) is ok


@pytest.mark.parametrize(
    "task,gen,gold,ok",
    [
        ("sentiment", "Negative.", "negative", True),
        ("sentiment", "The review is negative.", "negative", False),
        ("extract_number", "77", "77", True),
        ("extract_number", " 77. ", "77", True),
        ("extract_number", "77 cookies", "77", False),
        ("extract_name", "sven", "Sven", True),
        ("arithmetic", "5", "5", True),
        ("arithmetic", "15", "5", False),
        ("uppercase", "MEADOW  ORBIT", "MEADOW ORBIT", True),
        ("uppercase", "Meadow Orbit", "MEADOW ORBIT", False),
        ("reverse_list", "Melon,grape,  lemon.", "melon, grape, lemon", True),
        ("reverse_list", "lemon, grape, melon", "melon, grape, lemon", False),
        ("to_json", '{"age":56, "name":"Sven"}', '{"name": "Sven", "age": 56}', True),
        ("to_json", '{"name": "Sven", "age": "56"}', '{"name": "Sven", "age": 56}', False),
        ("to_json", "name: Sven", '{"name": "Sven", "age": 56}', False),
        ("other_task", " Hello   World ", "hello world", True),
    ],
)
def test_downstream_scorers(task, gen, gold, ok):
    assert score_downstream(task, gen, gold) is ok


def test_limit_takes_every_task_round_robin():
    from loramoe_ds.eval.common import take_limit

    recs = [{"task": t, "i": i} for i, t in enumerate("aaabbc")]
    assert [r["i"] for r in take_limit(recs, 4)] == [0, 3, 5, 1]
    assert take_limit(recs, None) == recs and take_limit(recs, 99) == recs


# -- utilisation --------------------------------------------------------------


class _Capture:
    def __init__(self):
        self.probs = {}

    def record(self, layer, routing):
        self.probs[layer.name] = (layer.layer_idx, routing.probs_TE.detach().clone())


@pytest.mark.parametrize("router", ["soft", "topk"])
def test_utilisation_equals_hand_computation(router):
    model, tok = _adapter_model(router)
    enc = PromptEncoder(tok)
    recs = KNOW + DOWN
    util = expert_utilisation(model, enc, recs, batch_size=2)  # padded batches

    # Hand: each sequence alone (no padding), probabilities captured per linear.
    mass = {}  # (layer, type) -> list over linears of [mass, tokens]
    for r in recs:
        ids = enc.prompts([r])[0] + enc.answers([r["output"]])[0] + [enc.eos_id]
        cap = _Capture()
        for m in model.moe_layers():
            m.recorder = cap
        with torch.no_grad():
            model.base(input_ids=torch.tensor([ids]))
        for m in model.moe_layers():
            m.recorder = None
        for name, (layer, p_TE) in cap.probs.items():
            share = p_TE[:, knowledge_group(p_TE.shape[1])].sum().item()
            acc = mass.setdefault((layer, r["task_type"]), {}).setdefault(name, [0.0, 0])
            acc[0] += share
            acc[1] += p_TE.shape[0]
    assert util["layers"] == [0, 1, 2, 3]
    assert util["num_experts"] == [2, 4, 6, 3] and util["linears_per_layer"] == [3] * 4
    for c, key in ((1, "knowledge"), (0, "downstream")):
        for j, layer in enumerate(util["layers"]):
            per_linear = [m / n for m, n in mass[(layer, c)].values()]
            ref = sum(per_linear) / len(per_linear)
            assert util["knowledge_share"][key][j] == pytest.approx(ref, abs=1e-5)
            assert sum(util["expert_probs"][key][j]) == pytest.approx(1.0, abs=1e-5)
    n_know = sum(len(enc.prompts([r])[0]) + len(enc.answers([r["output"]])[0]) + 1 for r in KNOW)
    assert util["tokens"]["knowledge"] == n_know
    shares = util["knowledge_share"]["knowledge"] + util["knowledge_share"]["downstream"]
    assert any(abs(s - 0.5) > 0.01 for s in shares), "routing should not be trivially uniform"
    assert all(m.recorder is None for m in model.moe_layers())


def test_utilisation_needs_adapter_model():
    model, tok = _setup()
    with pytest.raises(ValueError, match="adapter"):
        expert_utilisation(model, PromptEncoder(tok), KNOW)


# -- loading: adapter dir == in-memory; full-FT dir == base ------------------


def _write_eval_files(tmp_path):
    kf, df = tmp_path / "k.jsonl", tmp_path / "d.jsonl"
    kf.write_text("".join(json.dumps(r) + "\n" for r in KNOW))
    df.write_text("".join(json.dumps(r) + "\n" for r in DOWN))
    return kf, df


def _strip_timing(res):
    res = json.loads(json.dumps(res))
    res.pop("timing")
    res["knowledge"]["generation"].pop("seconds")
    res["knowledge"]["loglik"].pop("seconds")
    res["downstream"].pop("seconds")
    res.get("utilisation", {}).pop("seconds", None)
    return res


def _assert_results_close(a, b):
    for pa, pb in zip(a["knowledge"]["predictions"], b["knowledge"]["predictions"]):
        assert pa.pop("loglik") == pytest.approx(pb.pop("loglik"), abs=1e-3)
    a["knowledge"]["loglik"].pop("mean_answer_loglik")
    b["knowledge"]["loglik"].pop("mean_answer_loglik")
    ua, ub = a.pop("utilisation", None), b.pop("utilisation", None)
    assert (ua is None) == (ub is None)
    if ua is not None:
        for key in ("knowledge", "downstream"):
            assert ua["knowledge_share"][key] == pytest.approx(ub["knowledge_share"][key], abs=1e-6)
        assert ua["tokens"] == ub["tokens"]
    assert a == b


def test_adapter_dir_evaluation_equals_in_memory(tmp_path):
    base_dir = tmp_path / "base"
    base, tok = _setup()
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    model = inject(tiny_model("llama", vocab_size=len(tok)), AdapterConfig(rank=2, dropout=0.0))
    _randomise_adapter(model.eval())
    save_adapter(model, tmp_path / "adapter")
    kf, df = _write_eval_files(tmp_path)
    kw = dict(knowledge_file=kf, downstream_file=df, batch_size=2)
    kw.update(knowledge_max_new_tokens=4, downstream_max_new_tokens=4)
    mem = _strip_timing(evaluate_all(model, tok, **kw))
    loaded, tok2 = load_model(base_dir, adapter=tmp_path / "adapter")
    disk = _strip_timing(evaluate_all(loaded, tok2, **kw))
    assert "utilisation" in mem
    _assert_results_close(mem, disk)

    # A full-fine-tune checkpoint is a plain HF dir: same path as a base model.
    plain, tok3 = load_model(base_dir)
    got = _strip_timing(evaluate_all(plain, tok3, **kw))
    ref = _strip_timing(evaluate_all(base, tok, **kw))
    _assert_results_close(got, ref)


def _launcher():
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "launcher/evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_launcher_writes_results_plots_and_compares(tmp_path, capsys):
    base, tok = _setup()
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    save_adapter(inject(base, AdapterConfig(rank=2, dropout=0.0)), tmp_path / "adapter")
    kf, df = _write_eval_files(tmp_path)
    cli = _launcher()
    common = ["--model", str(tmp_path / "base"), "--knowledge", str(kf), "--downstream", str(df)]
    common += ["--limit", "2", "--max-new-tokens", "4", "--batch-size", "2"]
    assert cli.main([*common, "--out", str(tmp_path / "before.json")]) == 0
    assert (
        cli.main(
            [
                *common,
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(tmp_path / "after.json"),
                "--plot",
                str(tmp_path / "util.png"),
                "--heatmap",
                str(tmp_path / "heat.png"),
            ]
        )
        == 0
    )
    after = json.loads((tmp_path / "after.json").read_text())
    assert after["knowledge"]["n"] == 2 and after["downstream"]["n"] == 2
    assert after["utilisation"]["layers"] == [0, 1, 2, 3]
    for png in ("util.png", "heat.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert cli.main(["--compare", str(tmp_path / "before.json"), str(tmp_path / "after.json")]) == 0
    out = capsys.readouterr().out
    assert "retained" in out and "macro average" in out
    # B = 0 at init: the adapter model equals the base, so nothing changes.
    assert "1.00x" in out or "   - " in out
