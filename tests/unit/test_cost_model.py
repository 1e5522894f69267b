"""The cost model's arithmetic and the ``auto`` layout rules, against formulas written out here.

The bytes model is checked against counted collectives by
tests/distributed/test_plan_check.py; here: the terms against hand-derived
formulas (docs/benchmarks.md's crossover), the auto rules and their config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import test_dry_run

from loramoe_ds import cost_model as cm
from loramoe_ds.config import load_run_config
from loramoe_ds.cost_model.collectives import rows_bytes

# The dry-run tests below use test_dry_run's fixtures: its launcher module and a clean environment.
launcher = test_dry_run.launcher
_no_launcher_env = test_dry_run._no_launcher_env

ROOT = Path(__file__).resolve().parents[2]


def _shapes(counts, d=512, o=512, r=8, base_n=(4096,) * 3, slots=None):
    lins = tuple(
        cm.LinearShape(i, d, o, e, slots or e, r) for i, e in enumerate(counts)
    )  # one adapted linear per layer
    L = len(counts)
    mods = []
    for i, lin in enumerate(lins):
        mods += [cm.ModuleShape(((100 * i + j, n),), i, "base") for j, n in enumerate(base_n)]
        mods.append(cm.ModuleShape(((-1 - i, lin.router_params),), i, "router", i))
        A, B = lin.experts * lin.rank * d, lin.experts * lin.rank * o
        mods.append(cm.ModuleShape(((-100 - i, A), (-200 - i, B)), i, "bank", i))
    return cm.ModelShapes(
        base_params=tuple(base_n) * L,
        base_backward=(True,) * (len(base_n) * L),
        base_in_layer=(True,) * (len(base_n) * L),
        embed_params=0,
        head_index=0,
        layer_params=sum(base_n),
        linears=lins,
        modules=tuple(mods),
        num_layers=L,
        hidden=d,
        intermediate=2 * d,
        heads=8,
        kv_heads=8,
        head_dim=d // 8,
        vocab=1000,
    )


def _w(shapes, T, W, P, stage=3, router="topk", K=2, place=None, reuse=0, **kw):
    place = place or [cm.SHARDED] * shapes.num_layers
    return cm.Workload(tokens=T, seq_len=T, label_tokens=T, gas=1, world=W, ep_size=P,
                       zero_stage=stage, placements=tuple(place), router=router, top_k=K,
                       persistence_threshold=0, max_reuse_distance=reuse, **kw)  # fmt: skip


def test_topk_rows_and_zero3_terms_match_hand_formulas():
    """Top-k rows: 3 passes x T K (D+O) x a (ckpt on); ZeRO-3: ceil(n/W)*W per pass."""
    s = _shapes([4], base_n=(1001,))
    T, W, P = 64, 4, 4
    w = _w(s, T, W, P, activation_checkpointing=True)
    c = cm.predict(s, w)
    assert c.bytes["ep_rows_a2a"] == 3 * T * 2 * (512 + 512) * 4
    assert c.bytes["ep_counts_a2a"] == 2 * 4 * 8  # fwd + recompute, E int64 counts
    router = 4 * 512
    base = -(-1001 // W) * W
    # base: fwd + bwd + recompute; router (trainable): 3 passes; both padded to W
    assert c.bytes["zero3_param_allgather"] == (3 * base + 3 * router) * 4
    assert c.bytes["engine_grad_reduce"] == router * 4
    assert "expert_grad_allreduce" not in c.bytes  # EDP of size 1


def test_zero3_recompute_releases_the_layer_after_its_last_module():
    """Checkpointing: DeepSpeed releases a layer's recomputed frozen weights after the
    backward of the module that starts the layer's backward (a replicated bank, else the
    last base module), so the layer's other base modules gather theirs again.

    Reference by hand (DeepSpeed 0.19.8 ``ds_recompute_parameters``; measured on the
    tiny model by bench/plan_check.py): with a reuse distance longer than the whole
    step nothing else is released before the micro-batch ends, so one micro-batch
    gathers every parameter once in forward, plus, per layer, every base module but
    the last one again in backward (every one when the bank is replicated). Measured
    by tests/distributed/test_plan_check.py.
    """
    base_n = (1000, 2000, 3000)
    s = _shapes([4, 4], base_n=base_n)
    W = 2
    routers = 2 * 4 * 512
    everything = 2 * sum(base_n) + routers
    long = 10**12
    on = cm.zero3_gathered_elements(s, _w(s, 8, W, W, reuse=long, activation_checkpointing=True))
    off = cm.zero3_gathered_elements(s, _w(s, 8, W, W, reuse=long))
    assert off == everything
    assert on == everything + 2 * (1000 + 2000)
    # a replicated bank starts its backward before the base: the whole layer's base again
    rep = dict(place=[cm.REPLICATED] * 2, reuse=long)
    banks = 2 * 2 * 4 * 8 * 512
    on = cm.zero3_gathered_elements(s, _w(s, 8, W, W, activation_checkpointing=True, **rep))
    assert cm.zero3_gathered_elements(s, _w(s, 8, W, W, **rep)) == everything + banks
    assert on == everything + banks + 2 * (1000 + 2000 + 3000)
    # the peak held at once: the whole engine model after forward
    assert cm.zero3_schedule(s, _w(s, 8, W, W, reuse=long))[2] == everything


def test_soft_rows_send_every_token_to_every_ep_rank():
    s = _shapes([6])
    T, P = 10, 2
    c = cm.predict(s, _w(s, T, 4, P, router="soft"))
    L = 3
    assert c.bytes["ep_rows_a2a"] == 2 * P * T * (512 + L + 512) * 4
    assert c.bytes["expert_grad_allreduce"] == 6 * 8 * 1024 // P * 4  # EDP group of 2


def test_checkpointed_soft_rows_skip_the_return_of_the_layer_ending_linear():
    """Non-reentrant checkpointing stops its recompute at the last op that saves a
    tensor: a soft linear ending its layer sums its returned rows (nothing saved),
    so the recompute sends its rows out but not back; top-k multiplies the
    returned rows by their gates (saved), so it is recomputed in full."""
    T, P, L, D, O = 10, 2, 3, 512, 256
    ends = cm.LinearShape(0, D, O, 6, 6, 8, ends_layer=True)
    mid = cm.LinearShape(0, D, O, 6, 6, 8)
    soft = _w(_shapes([6]), T, 2, P, router="soft", activation_checkpointing=True)
    full = 3 * P * T * (D + L + O) * 4  # forward, recompute, backward
    assert rows_bytes(mid, soft, 3) == full
    assert rows_bytes(ends, soft, 3) == full - P * T * O * 4
    topk = _w(_shapes([6]), T, 2, P, K=2, activation_checkpointing=True)
    assert rows_bytes(ends, topk, 3) == rows_bytes(mid, topk, 3) == 3 * T * 2 * (D + O) * 4
    # a top-k input needing no gradient gets no rows back, unless checkpointing
    # makes the embedding's output (so every input) require grad
    first = cm.LinearShape(0, D, O, 6, 6, 8, input_grad=False)
    plain = _w(_shapes([6]), T, 2, P, K=2)
    assert rows_bytes(first, plain, 2) == T * 2 * (D + O) * 4 + T * 2 * O * 4
    assert rows_bytes(first, topk, 3) == 3 * T * 2 * (D + O) * 4
    # without checkpointing nothing is skipped
    assert (
        rows_bytes(ends, _w(_shapes([6]), T, 2, P, router="soft"), 2) == 2 * P * T * (D + L + O) * 4
    )


@pytest.mark.parametrize("E,r,K", [(4, 8, 2), (16, 8, 2), (64, 16, 2), (8, 16, 1)])
def test_placement_flips_at_the_documented_crossover(E, r, K):
    """docs/benchmarks.md: top-k at P = W, ZeRO-3, no recompute: T* = 3 E r / (2 K)."""
    s = _shapes([E], r=r)
    t_star = 3 * E * r / (2 * K)
    below = cm.choose_placements(s, _w(s, int(t_star * 0.9), 4, 4, K=K))
    above = cm.choose_placements(s, _w(s, int(t_star * 1.1) + 1, 4, 4, K=K))
    assert below == [cm.SHARDED] and above == [cm.REPLICATED]


def test_indivisible_layers_stay_replicated():
    s = _shapes([2, 4, 6, 8])
    got = cm.choose_placements(s, _w(s, 1, 4, 4))  # 1 token: sharding is cheaper where allowed
    assert got == [cm.REPLICATED, cm.SHARDED, cm.REPLICATED, cm.SHARDED]


def test_memory_items_partition_as_zero_says():
    s = _shapes([4], base_n=(1000,))
    W = 4
    m3 = cm.predict(s, _w(s, 8, W, 1, stage=3, place=[cm.REPLICATED])).memory
    m2 = cm.predict(s, _w(s, 8, W, 1, stage=2, place=[cm.REPLICATED])).memory
    assert m2["base"] == 1000 * 4 and m3["base"] == 1000  # 1/W under ZeRO-3
    n_train = 4 * 512 + 4 * 8 * 1024
    assert m2["optimizer"] == m3["optimizer"] == n_train / W * 12
    assert m2["adapter"] == n_train * 4 and m3["adapter"] == n_train / W * 4


def test_zero_stage_rule():
    assert cm.choose_zero_stage(10 * cm.GIB, 80 * cm.GIB) == 2
    assert cm.choose_zero_stage(90 * cm.GIB, 80 * cm.GIB) == 3


def test_step_time_uses_the_slow_link_only_across_nodes():
    s = _shapes([4])
    w = _w(s, 64, 16, 1, place=[cm.REPLICATED])
    c = cm.predict(s, w)
    one_node = cm.step_seconds(c, w, 16, 100.0, 10.0, 1e30)["comm"]
    two_nodes = cm.step_seconds(c, w, 8, 100.0, 10.0, 1e30)["comm"]
    assert one_node == pytest.approx(c.total_wire / 100.0)
    assert two_nodes == pytest.approx(c.total_wire / 10.0)


# -- config and dry run --------------------------------------------------------


def test_auto_values_parse_and_bad_values_are_one_line():
    run = load_run_config(None, ["parallel.ep_size=auto", "parallel.zero_stage=auto"])
    assert run.parallel.ep_size == "auto" and run.parallel.zero_stage == "auto"
    with pytest.raises(ValueError, match=r"parallel.ep_size='four': must be an int >= 1 or 'auto'"):
        load_run_config(None, ["parallel.ep_size=four"])
    with pytest.raises(ValueError, match=r"parallel.memory_budget_gb=-1.0: must be > 0"):
        load_run_config(None, ["parallel.memory_budget_gb=-1"])


def test_dry_run_auto_prints_choice_and_every_option(launcher, capsys):
    """tiny-llama, 4 ranks, MoLA-like [2,3,4,8] top-2: ZeRO-2 fits; every option listed."""
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--dry-run", "--world-size", "4",
            "parallel.ep_size=auto", "parallel.zero_stage=auto", "adapter.router=topk",
            "adapter.num_experts=[2,3,4,8]", "data.max_length=8",
            "train.micro_batch_size=1"]  # fmt: skip
    assert launcher.main(argv) == 0
    out = capsys.readouterr().out
    assert "auto layout: ep_size" in out and "ZeRO-2" in out.split("auto layout:")[1].split("\n")[0]
    opts = [x for x in out.splitlines() if "layers sharded; wire" in x]
    assert any(x.startswith("->") for x in opts) and len(opts) >= 2
    assert sum(x.startswith("->") for x in opts) == 1
    assert "ZeRO-3" in out  # the rejected stage is listed with its numbers too
    for item in ("base", "optimizer", "activations_no_ckpt", "activations_ckpt"):
        assert f"{item} " in out
    assert "zero3_param_allgather" in out and "engine_grad_reduce" in out


def test_dry_run_small_budget_forces_zero3(launcher, capsys, tmp_path):
    """A budget (1.29 MB) the replicated fp32 base and its state exceed; the ZeRO-3 layout fits.

    ZeRO-3 saves memory only for parameters it releases: none persistent, no reuse
    distance, no prefetch (with DeepSpeed's defaults the whole tiny model stays
    gathered).
    """
    ds = tmp_path / "ds.json"
    ds.write_text(
        '{"zero_optimization": {"reduce_bucket_size": 1000, '
        '"stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0, '
        '"stage3_prefetch_bucket_size": 0}}'
    )
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--dry-run", "--world-size", "4",
            "--deepspeed", str(ds), "parallel.ep_size=auto", "parallel.zero_stage=auto",
            "parallel.memory_budget_gb=0.0012", "data.max_length=8",
            "train.micro_batch_size=1"]  # fmt: skip
    assert launcher.main(argv) == 0
    out = capsys.readouterr().out
    chosen = next(x for x in out.splitlines() if x.startswith("->"))
    assert "ZeRO-3" in chosen and "does not fit" not in chosen
    assert any("ZeRO-2" in x and "(does not fit)" in x for x in out.splitlines())


def test_cost_model_is_pure_arithmetic():
    """cost_model/ imports the stdlib, placement.py and itself; placement.py the stdlib only."""
    import ast
    import sys

    files = sorted((ROOT / "loramoe_ds" / "cost_model").glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "collectives.py", "memory.py"}, files
    own = {"loramoe_ds.cost_model." + f.stem for f in files} | {"loramoe_ds.cost_model"}
    cases = [(f, own | {"loramoe_ds.placement"}) for f in files]
    cases.append((ROOT / "loramoe_ds" / "placement.py", set()))
    for path, allowed in cases:
        tree = ast.parse(path.read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        foreign = {m for m in mods if m.split(".")[0] not in sys.stdlib_module_names} - allowed
        assert not foreign, (path.name, foreign)


def test_zero3_live_peak_is_what_the_prefetcher_fills_up_to():
    """With prefetch on, DeepSpeed gathers ahead while fewer than
    ``stage3_max_live_parameters`` elements are live: the peak is that bound (or the
    whole engine model when smaller), never less than the release simulation's."""
    s = _shapes([4, 4], base_n=(1000, 2000, 3000))
    W, long = 2, 10**12
    everything = 2 * 6000 + 2 * 4 * 512
    no_prefetch = _w(s, 8, W, W, reuse=0, prefetch_bucket=0)
    one_module = cm.zero3_live_peak(s, no_prefetch)
    assert one_module == cm.zero3_schedule(s, no_prefetch)[2] == 3000
    assert cm.zero3_live_peak(s, _w(s, 8, W, W, reuse=0, max_live=5000)) == 5000
    assert cm.zero3_live_peak(s, _w(s, 8, W, W, reuse=0, max_live=10**9)) == everything
    assert cm.zero3_live_peak(s, _w(s, 8, W, W, reuse=long, max_live=100)) == everything
