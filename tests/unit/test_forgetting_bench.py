"""The fact-world forgetting benchmark: world generation, batching, scores, table
arithmetic, router shares against a hook-based reference, and a --quick run."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import fact_world as fw
import fact_world_train as fwt
import forgetting as fb
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world():
    return fw.World(fw.WorldConfig(n_entities=24))


def test_world_is_deterministic_and_well_formed(world):
    again = fw.World(fw.WorldConfig(n_entities=24))
    assert again.facts == world.facts and again.itos == world.itos
    other = fw.World(fw.WorldConfig(n_entities=24, seed=1))
    assert other.entities != world.entities
    assert len(world.facts) == 24 * len(fw.RELATIONS)
    assert len(set(world.itos)) == len(world.itos)
    for f in world.facts:
        pool = world.pools[f["relation"]]
        assert f["answer"] in pool and len(f["distractors"]) == 3
        assert f["answer"] not in f["distractors"] and set(f["distractors"]) <= set(pool)
        rec = world.fact_record(f)
        assert rec["answer"] == [world.stoi[f["answer"]], fw.EOS] and rec["task_type"] == 1
        assert rec["prompt"][:2] == [fw.BOS, fw.USER] and rec["prompt"][-1] == fw.ASST
        assert rec["pool"][0] == rec["candidates"][0] == world.stoi[f["answer"]]
        assert sorted(rec["pool"]) == sorted(world.stoi[w] for w in pool)
        assert world.decode(rec["prompt"][2:-1]) == fw.RELATIONS[f["relation"]].format(f["entity"])
    splits = [f["split"] for f in world.facts]
    assert {"train", "heldout"} == set(splits)
    # capitals and leaders are unique per entity
    caps = [f["answer"] for f in world.facts if f["relation"] == "capital"]
    assert len(set(caps)) == len(caps)


def test_downstream_tasks_are_correct_and_nested(world):
    small, big = world.downstream(5, "train"), world.downstream(9, "train")
    for task in fw.TASKS:
        s = [r for r in small if r["task"] == task]
        b = [r for r in big if r["task"] == task]
        assert s == b[:5]
    assert world.downstream(5, "eval") != small
    for r in big:
        words = world.decode(r["prompt"][2:-1]).split(" : ")[1].split()
        ans = world.decode(r["answer"][:-1]).split()
        assert 3 <= len(words) <= 7 and all(w.isdigit() for w in words)
        if r["task"] == "first":
            want = [words[0]]
        elif r["task"] == "last":
            want = [words[-1]]
        elif r["task"] == "count":
            want = [str(len(words))]
        else:
            want = [str(max(int(w) for w in words))]
        assert ans == want and r["task_type"] == 0 and r["answer"][-1] == fw.EOS
    kn = world.knowledge_train(7)
    assert kn == world.knowledge_train(30)[:7]
    heldout = {fw.RELATIONS[f["relation"]].format(f["entity"]) for f in world.facts_of("heldout")}
    train_q = {world.decode(r["prompt"][2:-1]) for r in world.knowledge_train(30)}
    assert train_q and not train_q & heldout  # held-out facts never enter the SFT mix


def test_collate_labels_only_answers(world):
    recs = [world.fact_record(world.facts[0]), world.downstream(1, "train")[0]]
    b = fw.collate(recs)
    for i, r in enumerate(recs):
        n_p, n = len(r["prompt"]), len(r["prompt"]) + len(r["answer"])
        assert b["input_ids"][i, :n].tolist() == r["prompt"] + r["answer"]
        assert b["attention_mask"][i].sum() == n
        assert (b["labels"][i, :n_p] == -100).all() and (b["labels"][i, n:] == -100).all()
        assert b["labels"][i, n_p:n].tolist() == r["answer"]
    assert b["task_type"].tolist() == [1, 0]


def test_rank_and_generation_scoring_hand_cases():
    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.0])
    assert fwt.rank_correct(lp, [0, 1, 3])
    assert not fwt.rank_correct(lp, [0, 1, 2])  # a distractor beats gold
    assert not fwt.rank_correct(lp, [0, 4, 1])  # tie counts wrong
    assert fwt.gen_correct([7], 7) == (True, True)
    assert fwt.gen_correct([3, 9, 7], 7) == (True, False)  # tolerant: wrapped answer
    assert fwt.gen_correct([3, 9, 1, 2, 7], 7) == (False, False)  # beyond the window
    assert fwt.gen_correct([], 7) == (False, False)


def test_greedy_matches_a_plain_loop():
    V = 11

    def fn(ids_BS):  # next token = (sum of the sequence) mod V, one-hot logits
        nxt = ids_BS.sum(1) % V
        return torch.nn.functional.one_hot(nxt, V).float()[:, None].expand(-1, ids_BS.shape[1], V)

    recs = [{"prompt": p} for p in ([5, 3], [1, 1], [4, 4, 4], [7])]
    got = fwt.greedy(fn, recs, max_new=5, chunk=1)
    for r, g in zip(recs, got):
        seq, ref = list(r["prompt"]), []
        for _ in range(5):
            t = sum(seq) % V
            seq.append(t)
            ref.append(t)
        ref = ref[: ref.index(fw.EOS)] if fw.EOS in ref else ref
        assert g == ref


def test_lr_factor_and_epoch_order():
    assert fwt.lr_factor(0, 30, 3) == pytest.approx(1 / 3)
    assert fwt.lr_factor(3, 30, 3) == pytest.approx(1.0)
    assert fwt.lr_factor(30, 30, 3) == pytest.approx(0.1)
    mid = fwt.lr_factor(16, 30, 3)
    assert mid == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 13 / 27)))
    order = fwt.epoch_order(10, 7, 4, seed=3)
    assert len(order) == 7 and all(len(b) == 4 for b in order)
    flat = [i for b in order for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert order == fwt.epoch_order(10, 7, 4, seed=3) != fwt.epoch_order(10, 7, 4, seed=4)


def test_knowledge_shares_match_hooked_router_inputs(world):
    from loramoe_ds.config import AdapterConfig
    from loramoe_ds.model.inject import inject

    pc = fw.PretrainConfig(layers=2, hidden=32, intermediate=64)
    lm = fw.build_model(world.vocab_size, pc)
    model = inject(lm, AdapterConfig(num_experts=5, rank=2)).eval()
    recs = world.downstream(3, "eval")
    got = fwt.knowledge_shares(model, recs)
    # reference: capture each adapted linear's input with hooks, softmax(W x) by hand
    per_layer: dict[int, list[float]] = {}
    for r in recs:
        inputs: dict = {}

        def grab(mod, a, o, inputs=inputs):
            inputs[mod] = a[0]

        hooks = [m.register_forward_hook(grab) for m in model.moe_layers()]
        with torch.no_grad():
            lm(input_ids=torch.tensor([r["prompt"] + r["answer"]]))
        for h in hooks:
            h.remove()
        for m, x in inputs.items():
            p = torch.softmax(x[0] @ m.router.weight.T, -1)
            per_layer.setdefault(m.layer_idx, []).extend(p[:, :3].sum(-1).tolist())
    # knowledge_shares averages over all tokens of a layer's linears (equal counts each)
    want = [statistics.fmean(per_layer[i]) for i in sorted(per_layer)]
    assert got == pytest.approx(want, abs=1e-5)


def test_table_arithmetic():
    assert fb.mean_std([0.5, 0.7, 0.9]) == (
        pytest.approx(0.7),
        pytest.approx(statistics.stdev([0.5, 0.7, 0.9])),
        3,
    )
    assert fb.mean_std([0.4]) == (0.4, 0.0, 1) and fb.mean_std([None]) == (None, None, 0)
    base = {
        "knowledge": {"ll_acc": 0.8, "gen_acc": 0.5, "ll_pool_acc": 0.6},
        "downstream": {"macro": 0.1},
    }

    def res(seed, ll, gen, down):
        return {
            "method": "lora",
            "label": "LoRA",
            "size": 8,
            "seed": seed,
            "train": {"steps": 9, "trainable_params": 2000, "train_s": 1.0},
            "knowledge": {"ll_acc": ll, "gen_acc": gen, "ll_pool_acc": ll / 2},
            "downstream": {"macro": down},
        }

    s = fb.summarize(res(0, 0.6, 0.25, 0.7), base)
    assert s["ll_retained"] == pytest.approx(0.75) and s["gen_retained"] == pytest.approx(0.5)
    assert s["gain"] == pytest.approx(60.0) and s["share_know"] is None
    rows = fb.aggregate([res(0, 0.6, 0.25, 0.7), res(1, 0.4, 0.35, 0.5)], base)
    assert len(rows) == 1 and rows[0]["seeds"] == [0, 1]
    assert rows[0]["ll"] == (pytest.approx(0.5), pytest.approx(math.sqrt(0.02)), 2)
    table = fb.format_table(rows, base, ["lora"])
    assert "| LoRA | 8x | 9 | 2 | 50.0 ± 14.1 | 30.0 ± 7.1 | 25.0 ± 7.1 |" in table
    assert "| +50.0 ± 14.1 |" in table
    runs = [res(0, 0.6, 0.25, 0.7), res(1, 0.4, 0.35, 0.5), res(0, 0.5, 0.2, 0.6)]
    runs[2]["method"] = "other"
    (pr,) = fb.paired(runs, base, "lora", "other")  # only seed 0 is shared
    assert pr["seeds"] == [0] and pr["ll"] == (pytest.approx(0.1), 0.0, 1)
    assert pr["gain"] == (pytest.approx(10.0), 0.0, 1)
    assert "| 8x | 1 | +10.0 | +5.0 | +5.0 | +10.0 |" in fb.format_paired([pr], "a", "b")
    assert fb.make_plan(["a", "b"], [1, 8], [0, 1])[:3] == [("a", 1, 0), ("b", 1, 0), ("a", 8, 0)]


def test_quick_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "fg"
    args = ["--quick", "--out", str(out), "--sizes", "2", "--seeds", "0"]
    assert fb.main(args) == 0
    files = sorted(p.name for p in (out / "results").glob("*.json"))
    assert len(files) == 8  # every method, one size
    r = json.loads((out / "results" / "loramoe_intended__2x__s0.json").read_text())
    assert r["adapter"]["lbc_variant"] == "intended" and r["train"]["lbc_loss_last"] > 0
    assert len(r["shares"]["knowledge"]) == fb.QUICK_PRETRAIN.layers
    n_heldout = len(fw.World(fb.QUICK_WORLD).facts_of("heldout"))
    assert r["knowledge"]["n"] == n_heldout  # every held-out fact scored
    assert (out / "forgetting.png").is_file()
    rn = json.loads((out / "results" / "loramoe_null_sup__2x__s0.json").read_text())
    assert rn["adapter"]["null_experts"] == 2 and rn["adapter"]["router_supervision_coef"] > 0
    table = (out / "table.md").read_text()
    main_table, paired_part = table.split("\n\n", 1)
    assert main_table.count("\n") == 2 + 1 + 8 - 1  # header, rule, base, 8 methods
    assert "| 2x | 1 |" in paired_part  # intended minus published, the one shared seed
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    capsys.readouterr()
    assert fb.main(args) == 0
    assert "8 of 8 runs cached; 0 to go" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")} == mtimes


def test_pretrained_base_cache_roundtrip(tmp_path):
    wc = fw.WorldConfig(n_entities=8)
    pc = fw.PretrainConfig(layers=1, hidden=16, intermediate=32, steps=3, batch_size=4)
    m1, info1 = fw.pretrained_base(wc, pc, tmp_path, log=lambda s: None)
    m2, info2 = fw.pretrained_base(wc, pc, tmp_path, log=lambda s: None)
    assert info1 == info2 and info1["steps"] == 3
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    dirs = list((tmp_path / "fact_world").iterdir())
    assert [d.name for d in dirs] == [fw.cache_key(wc, pc)]
