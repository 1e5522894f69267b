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
from loramoe_ds.cost_model.coordinator import Fetch, Release

# The dry-run tests below use test_dry_run's fixtures: its launcher module and a clean environment.
launcher = test_dry_run.launcher
_no_launcher_env = test_dry_run._no_launcher_env

ROOT = Path(__file__).resolve().parents[2]


def _shapes(counts, d=512, o=512, r=8, base_n=(4096,) * 3, slots=None):
    """One adapted linear per layer: the MLP's plain linears ``p0, p1, ...`` then the
    adapted ``down_proj`` (its base, the last of ``base_n``, its router and bank)."""
    lins = tuple(
        cm.LinearShape(i, d, o, e, slots or e, r) for i, e in enumerate(counts)
    )  # one adapted linear per layer
    L = len(counts)
    mods = []
    for i, lin in enumerate(lins):
        mlp = f"model.layers.{i}.mlp"
        names = [f"{mlp}.p{j}" for j in range(len(base_n) - 1)] + [f"{mlp}.down_proj.base"]
        mods += [cm.ModuleShape(((100 * i + j, n),), i, "base", name=names[j])
                 for j, n in enumerate(base_n)]  # fmt: skip
        mods.append(cm.ModuleShape(((-1 - i, lin.router_params),), i, "router", i,
                                   name=f"{mlp}.down_proj.router"))  # fmt: skip
        A, B = lin.experts * lin.rank * d, lin.experts * lin.rank * o
        mods.append(cm.ModuleShape(((-100 - i, A), (-200 - i, B)), i, "bank", i,
                                   name=f"{mlp}.down_proj.experts"))  # fmt: skip
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


def _w(shapes, T, W, P, stage=3, router="topk", K=2, place=None, reuse=0, prefetch_bucket=0, **kw):
    """No persistent parameters, no reuse distance, no prefetch unless asked."""
    place = place or [cm.SHARDED] * shapes.num_layers
    return cm.Workload(tokens=T, seq_len=T, label_tokens=T, gas=1, world=W, ep_size=P,
                       zero_stage=stage, placements=tuple(place), router=router, top_k=K,
                       persistence_threshold=0, max_reuse_distance=reuse,
                       prefetch_bucket=prefetch_bucket, **kw)  # fmt: skip


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
    # the base: forward, recompute (held by the linear's wrapper until its backward
    # ends: no third gather); the router: the wrapper model's forward and backward
    # (its external parameter); both padded to W
    assert c.bytes["zero3_param_allgather"] == (2 * base + 2 * router) * 4
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
    assert cm.zero3_schedule(s, _w(s, 8, W, W, reuse=long)).peak == everything


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


def test_zero3_buffers_hold_a_multi_parameter_gather_twice():
    """ZeRO-3 buffers = the reduce bucket + the most held gathered at once, by hand: one
    replicated layer (base 1000, router 2048, bank A and B of 16384 each), no prefetch,
    no reuse distance. The wrapper model holds the router (2048) through its forward;
    the bank's two parameters arrive in one all-gather whose flat buffer stays while
    they are copied out of it: 2048 + 2 x 32768 elements, the peak (the base, gathered
    alone, is released before)."""
    s = _shapes([4], base_n=(1000,))
    w = _w(s, 8, 2, 1, place=[cm.REPLICATED])
    peak = 2048 + 2 * 2 * 4 * 8 * 512
    assert cm.zero3_live_peak(s, w) == peak
    assert cm.predict(s, w).memory["zero_buffers"] == (w.reduce_bucket + peak) * 4
    assert cm.zero3_gathered_elements(s, w) == 2 * (1000 + 2048 + 2 * 16384)  # fwd + bwd


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


def _chain(*sizes, repeat=()):
    """Modules 0, 1, ... with one parameter each (id = module), fetched and released in
    forward order; then the modules in ``repeat`` again."""
    ev = []
    for m in [*range(len(sizes)), *repeat]:
        ev += [Fetch(m, ((m, sizes[m]),)), Release(m)]
    return ev


def test_prefetcher_fills_to_max_live_and_flat_buffers_are_held():
    """By hand (DeepSpeed 0.19.8 ``fetch_sub_module``): a, b, c, d of 10, 20, 30, 40
    elements, no reuse distance, max_live 35, bucket 100. Fetch a: gathers a (10 live),
    then the prefetcher, below min(35 - 10, 100) = 25, pops b (20) and c (30, the one
    crossing the limit) into one call: a flat buffer of 50 (60 live). Release a (50).
    Fetch b: the first wait copies b and c out of the flat buffer, which stays until c
    is waited too: 50 + 50 = 100 held, the peak; at 50 live nothing is prefetched.
    Release b (80). Fetch c frees the buffer (30), prefetches d (limit 5: 70), ... Every
    parameter is gathered once: 100 elements."""
    g = cm.coordinate(_chain(10, 20, 30, 40), world=1, max_live=35, prefetch_bucket=100)
    assert g.per_micro == [100] and g.peak == 100 and g.persistent == 0
    # no prefetch: one parameter held at a time
    assert cm.coordinate(_chain(10, 20, 30, 40), world=1).peak == 40
    # gloo's all-gather holds its output twice while it runs: at the prefetch of b and
    # c, 60 held + the 50 of that call
    g = cm.coordinate(_chain(10, 20, 30, 40), world=1, max_live=35, prefetch_bucket=100,
                      gather_copy=True)  # fmt: skip
    assert g.peak == 110


def test_prefetcher_keeps_what_it_looked_past():
    """a (p, 10), b (q, 10), a again; no reuse distance. Without prefetch p is released
    after a and gathered again: 30 elements. With it, the first fetch's prefetch pops q
    (gathered) and p's second use (already gathered: skipped, but marked), so the
    release after a keeps p (``__most_recent_step_id_param_fetched_for``): 20."""
    ev = _chain(10, 10, repeat=(0,))
    assert cm.coordinate(ev, world=1).per_micro == [30]
    assert cm.coordinate(ev, world=1, prefetch_bucket=100).per_micro == [20]
    # a reuse distance longer than b keeps p as well; persistent parameters are
    # gathered once per step instead
    assert cm.coordinate(ev, world=1, max_reuse_distance=11).per_micro == [20]
    g = cm.coordinate(ev, world=4, persistence_threshold=10)
    assert g.per_micro == [0] and g.persistent == 2 * 12


def test_backward_leftovers_are_released_at_the_end_of_the_micro_batch():
    """A module fetched in backward whose post-hook never runs (the embedding: its input
    needs no gradient) is released by ``release_backward_leftovers``: the next
    micro-batch gathers it again."""
    ev = _chain(8) + [Fetch(0, ((0, 8),), forward=False)]
    assert cm.coordinate(ev, world=2, micro_batches=2).per_micro == [16, 16]


def test_recompute_is_released_after_the_backward_that_triggered_it():
    """Under checkpointing the frozen parameters fetched by the recompute belong to the
    newest module in backward, released when its backward ends, whatever the reuse
    distance: container c (backward), recompute of x (10), y (20), then y's and x's
    backward, then c's release. With no reuse distance x and y are gathered in forward
    and again by the recompute, which holds them through their backward (c is still
    running); with a long one they stay from forward on, but c's release drops them
    all the same, so a later use gathers again."""
    F, R = Fetch, Release
    fwd = [F(1, ((1, 10),)), R(1), F(2, ((2, 20),)), R(2)]
    bwd = [F(0, (), forward=False), F(1, ((1, 10),), recompute=True), R(1),
           F(2, ((2, 20),), recompute=True), R(2), F(2, ((2, 20),), forward=False),
           R(2, forward=False), F(1, ((1, 10),), forward=False), R(1, forward=False),
           R(0, forward=False)]  # fmt: skip
    short = cm.coordinate(fwd + bwd, world=1)  # released after every module
    assert short.per_micro == [30 + 30]
    long = cm.coordinate(fwd + bwd, world=1, max_reuse_distance=10**9)
    assert long.per_micro == [30]  # kept from forward on; the recompute gathers nothing
    # the recompute's parameters are released with c, so a later use gathers again
    again = bwd[:-1] + [R(0, forward=False), F(1, ((1, 10),), forward=False)]
    assert cm.coordinate(fwd + again, world=1, max_reuse_distance=10**9).per_micro == [40]
