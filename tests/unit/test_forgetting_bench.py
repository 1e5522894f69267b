"""Pure pieces of ``bench/forgetting.py``: budgets, LR schedule, subsets, metric
arithmetic, the resumable cache skip and the table. No SmolLM2 needed."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("forgetting", ROOT / "bench" / "forgetting.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["forgetting"] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


fb = _load()


def test_budget_steps_epoch_matched():
    # 1x: 12/task * 7 + 74 knowledge = 158 records; 4x: 48*7 + 74 = 410.
    assert fb.budget_steps(158, 8, 1.0) == 20
    assert fb.budget_steps(410, 8, 1.0) == 52
    assert fb.budget_steps(16, 8, 2.0) == 4
    assert fb.budget_steps(1, 8, 0.1) == 1  # never zero steps
    with pytest.raises(ValueError, match="batch_size"):
        fb.budget_steps(10, 0, 1.0)


def test_run_steps_equal_vs_epochs():
    assert fb.run_steps("steps", 158, 8, 30, 1.0) == 30
    assert fb.run_steps("steps", 410, 8, 30, 1.0) == 30
    assert fb.run_steps("epochs", 410, 8, 30, 1.0) == 52
    with pytest.raises(ValueError, match="budget"):
        fb.run_steps("tokens", 1, 1, 1, 1.0)


def test_lr_factor_warmup_then_cosine():
    total, warm = 30, 3
    assert fb.lr_factor(0, total, warm) == pytest.approx(1 / 3)
    assert fb.lr_factor(2, total, warm) == pytest.approx(1.0)
    assert fb.lr_factor(3, total, warm) == pytest.approx(1.0)
    mid = warm + (total - warm) / 2
    assert fb.lr_factor(int(mid), total, warm) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - warm) / (total - warm)))
    )
    assert fb.lr_factor(total, total, warm) == pytest.approx(0.1)
    vals = [fb.lr_factor(s, total, warm) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_subset_records_nested_and_counts():
    down = [{"task": t, "i": i} for t in ("a", "b") for i in range(20)]
    know = [{"task": "knowledge/x", "task_type": 1, "i": i} for i in range(3)]
    small = fb.subset_records(down, know, 2)
    big = fb.subset_records(down, know, 8)
    assert len(small) == 2 * 2 + 3 and len(big) == 2 * 8 + 3
    assert small[-3:] == know and big[-3:] == know
    key = lambda r: (r["task"], r["i"])  # noqa: E731
    assert {key(r) for r in small} <= {key(r) for r in big}
    assert fb.subset_records(down, know, 2) == small  # deterministic
    with pytest.raises(ValueError, match="fewer than"):
        fb.subset_records(down, know, 21)


def test_retained_and_gain():
    assert fb.retained(0.45, 0.9) == pytest.approx(0.5)
    assert fb.retained(0.3, 0.0) is None
    assert fb.gain(0.6, 0.25) == pytest.approx(35.0)
    assert fb.mean_spread([0.5, 0.7, None]) == (pytest.approx(0.6), pytest.approx(0.1), 2)
    assert fb.mean_spread([None]) == (None, None, 0)


def _result(method, size, seed, gen, ll, down):
    return {
        "method": method,
        "label": method,
        "size": size,
        "seed": seed,
        "steps": 30,
        "trainable_params": 1_000_000,
        "total_experts": None,
        "train_s": 10.0,
        "eval": {
            "knowledge": {"generation": {"accuracy": gen}, "loglik": {"accuracy": ll}},
            "downstream": {"macro_accuracy": down},
        },
    }


BASE = {
    "knowledge": {"generation": {"accuracy": 0.8}, "loglik": {"accuracy": 0.5}},
    "downstream": {"macro_accuracy": 0.1},
}


def test_aggregate_mean_and_spread_over_seeds():
    rows = fb.aggregate(
        [_result("lora", 1, 0, 0.4, 0.5, 0.3), _result("lora", 1, 1, 0.8, 0.4, 0.5)], BASE
    )
    (row,) = rows
    assert row["seeds"] == [0, 1]
    assert row["know_gen_retained"][0] == pytest.approx(0.75)
    assert row["know_gen_retained"][1] == pytest.approx(0.25)
    assert row["know_ll_retained"][0] == pytest.approx(0.9)
    assert row["down_gain"][0] == pytest.approx(30.0)
    table = fb.format_table(rows, ["lora"])
    assert (
        "| lora | 1x | 30 | 2 | 75.0% ± 25.0 | 90.0% ± 10.0 | +30.0 ± 10.0 | - | 1.00M |" in table
    )


def test_pending_skips_finished_runs(tmp_path):
    plan = [("lora", 1, 0), ("lora", 4, 0), ("full_sft", 1, 0)]
    fb.write_json_atomic(tmp_path / f"{fb.run_key('lora', 4, 0)}.json", {"done": True})
    assert fb.pending(plan, tmp_path) == [("lora", 1, 0), ("full_sft", 1, 0)]
    assert json.loads((tmp_path / "lora__4x__s0.json").read_text()) == {"done": True}
    assert not list(tmp_path.glob("*.tmp"))


def test_make_plan_orders_core_first_and_dedups():
    methods = list(fb.make_methods())
    plan = fb.make_plan(methods, [1, 4], [0], [1], ["lora", "loramoe_lbc"])
    assert len(plan) == len(set(plan)) == 4 * 2 + 2 * 2 + 3 * 2
    assert plan[0] == ("full_sft", 1, 0)
    assert [p for p in plan if p[2] == 1] == [
        ("lora", 1, 1),
        ("loramoe_lbc", 1, 1),
        ("lora", 4, 1),
        ("loramoe_lbc", 4, 1),
    ]
    assert plan[-1][0].startswith("mola") and plan[-1][1] == 1


def test_methods_budgets_match():
    ms = fb.make_methods()
    assert ms["lora"].lora_rank == fb.LORAMOE_EXPERTS * fb.EXPERT_RANK
    assert ms["full_sft"].lr < ms["lora"].lr
    assert ms["loramoe_lbc"].adapter["lbc_beta"] == 0.1
    assert ms["loramoe_nolbc"].adapter["lbc_beta"] == 0.0
    assert {ms[f"mola_{p}"].adapter["num_experts"] for p in ("2468", "8642", "5555")} == {
        "2468",
        "8642",
        "5555",
    }
    assert len({m.lr for m in ms.values() if m.kind != "full"}) == 1


def test_check_base_refuses_other_eval_sizes(tmp_path):
    base = {
        "knowledge": {"loglik": {"n": 4, "skipped": 0}, "generation": {"n": 2}},
        "downstream": {"n": 7},
    }
    sets = {"know_ll": [{}] * 4, "know_gen": [{}] * 2, "down": [{}] * 7}
    fb.check_base(base, sets, tmp_path / "base.json")
    with pytest.raises(ValueError, match="another --out"):
        fb.check_base(base, dict(sets, down=[{}] * 8), tmp_path / "base.json")
