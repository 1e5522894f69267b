"""Multi-process (gloo, CPU) expert-parallel training equals a single-process model.

Reference semantics: each rank's loss is its own micro-batch's (LM loss = mean
over that micro-batch's labelled tokens; LBC per micro-batch), and DeepSpeed
averages data-parallel gradients, so the distributed objective is
``mean over ranks r and GAS micro-batches m of loss(r, m)``. The single-process
reference computes every ``loss(r, m)`` on its own micro-batch and averages them
(it does *not* concatenate the global batch into one LM mean).
"""

from __future__ import annotations

import _common as C
import pytest
import torch

pytestmark = pytest.mark.distributed

CASES = {
    2: [
        dict(key="ep2_soft_z3_clip_rls", ep=2, router="soft", stage=3, gas=1, clip=0.5, steps=3,
             export=True, rls=10.0),
        dict(key="ep2_topk_z3_gas2_sched", ep=2, router="topk", stage=3, gas=2, clip=0.0,
             steps=3, sched=True),
        dict(key="ep1_soft_z3_replicated", ep=1, router="soft", stage=3, gas=1, clip=0.5, steps=2),
        dict(key="ep2_topk_z2_clip", ep=2, router="topk", stage=2, gas=1, clip=0.5, steps=2),
        dict(key="ep2_soft_z0", ep=2, router="soft", stage=0, gas=1, clip=0.0, steps=2),
    ],
    4: [
        dict(key="ep4_topk_z3_clip_sched", ep=4, router="topk", stage=3, gas=1, clip=0.5,
             steps=3, sched=True, export=True),
        dict(key="ep2_soft_z3_gas2_clip", ep=2, router="soft", stage=3, gas=2, clip=0.5, steps=2),
        dict(key="ep2_topk_z3", ep=2, router="topk", stage=3, gas=1, clip=0.0, steps=2),
        dict(key="ep4_soft_z3", ep=4, router="soft", stage=3, gas=1, clip=0.0, steps=2),
        dict(key="ep1_topk_z3_replicated_rls", ep=1, router="topk", stage=3, gas=1, clip=0.0,
             steps=2, rls=10.0),
        # MoLA 2468 (4 layers): at ep 4 the 2- and 6-expert banks are replicated, the others
        # sharded (the default rule); at ep 2 every bank is sharded, or as placed explicitly.
        dict(key="mola_ep4_topk_z3_clip", ep=4, router="topk", stage=3, gas=1, clip=0.5,
             steps=3, export=True, **C.MOLA),
        dict(key="mola_ep4_soft_z3_clip", ep=4, router="soft", stage=3, gas=1, clip=0.5,
             steps=3, **C.MOLA),
        dict(key="mola_ep2_soft_z3", ep=2, router="soft", stage=3, gas=1, clip=0.0, steps=3,
             **C.MOLA),
        dict(key="mola_ep2_topk_z3_placed", ep=2, router="topk", stage=3, gas=1, clip=0.5,
             steps=3, placements=["sharded", "replicated", "sharded", "replicated"], **C.MOLA),
    ],
}  # fmt: skip
PLACED = {  # the placement each case must get, per decoder layer
    "mola_ep4_topk_z3_clip": ["replicated", "sharded", "replicated", "sharded"],
    "mola_ep4_soft_z3_clip": ["replicated", "sharded", "replicated", "sharded"],
    "mola_ep2_soft_z3": ["sharded"] * 4,
    "mola_ep2_topk_z3_placed": ["sharded", "replicated", "sharded", "replicated"],
}
WORLD_IDX = [(w, i) for w in CASES for i in range(len(CASES[w]))]


def reference(base_state, init, case, world, lrs):
    """Single-process run: same weights, same micro-batches, plain torch AdamW."""
    from loramoe_ds.model.inject import inject

    factory, cfg, _ = C.case_model(case)
    torch.manual_seed(0)
    model = inject(factory(), cfg)
    missing, unexpected = model.base.load_state_dict(base_state, strict=False)
    adapter = dict(model.adapter_named_parameters())
    assert not unexpected and set(missing) == set(adapter)
    with torch.no_grad():
        for n, p in adapter.items():
            p.copy_(init[n])
    params = list(adapter.values())
    hp = C.optim()
    rls = case.get("rls", 1.0)  # train.router_lr_scale: the routers' LR is rls * lr
    routers = [p for n, p in adapter.items() if n.endswith("router.weight")]
    groups = [{"params": routers, "scale": rls},
              {"params": [p for n, p in adapter.items() if not n.endswith("router.weight")],
               "scale": 1.0}]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
                            weight_decay=hp.weight_decay)  # fmt: skip
    losses, grads, G = {}, None, case["gas"]
    for step in range(case["steps"]):
        opt.zero_grad()
        total = 0.0
        for r in range(world):
            for m in range(G):
                out = model(**C.batch(r, step, m))
                losses[(r, step, m)] = out.loss.item()
                total = total + out.loss / (world * G)
        total.backward()
        if step == 0:
            grads = {n: p.grad.detach().clone() for n, p in adapter.items()}
        if case["clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, case["clip"])
        for grp in opt.param_groups:
            grp["lr"] = lrs[step] * grp["scale"]
        opt.step()
    final = {n: p.detach().clone() for n, p in adapter.items()}
    return losses, grads, final


def _close(a, b, atol, what):
    assert a.shape == b.shape, what
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= atol * max(1.0, scale), f"{what}: max abs err {err:.3g} (scale {scale:.3g})"


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """``launched(world) -> (world, results, out)``: one launch per world size, on first use."""
    done = {}

    def get(world):
        if world not in done:
            out = tmp_path_factory.mktemp(f"eq{world}")
            results = C.launch(world, "equivalence", {"cases": CASES[world]}, out, timeout=900)
            done[world] = world, results, out
        return done[world]

    return get


@pytest.fixture(params=sorted(CASES), ids=lambda w: f"world{w}")
def run(request, launched):
    return launched(request.param)


@pytest.mark.parametrize("world,idx", WORLD_IDX)
def test_matches_single_process(launched, world, idx):
    """Loss, every trainable gradient and the params after a few AdamW steps match."""
    world, results, out = launched(world)
    case = CASES[world][idx]
    key = case["key"]
    res = [results[r][key] for r in range(world)]
    init = res[0]["init"]
    want_init = C.case_model(case)[2]
    for n in want_init:
        torch.testing.assert_close(init[n], want_init[n], rtol=0, atol=0)
    lrs = res[0]["lrs"]
    if case.get("sched"):
        assert len(set(lrs)) > 1, f"schedule should change the LR: {lrs}"
    losses, grads, final = reference(res[0]["base"], init, case, world, lrs)
    for r in range(world):
        got = [d["loss"] for d in res[r]["losses"]]
        want = [losses[(r, s, m)] for s in range(case["steps"]) for m in range(case["gas"])]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-5, atol=2e-6)
    assert set(res[0]["grads"]) == set(grads)
    for n, g in grads.items():
        assert g.abs().max() > 0, f"{n}: reference grad is zero (test too weak)"
        _close(res[0]["grads"][n], g, 2e-5, f"grad {n}")
    # Adam divides by sqrt(v): an element whose gradient is ~0 (|g| ~ 1e-8) turns fp32
    # rounding noise into a step of up to lr. So: tight everywhere but a handful of
    # elements, and those within the Adam step bound lr * steps.
    # A router at router_lr_scale x the LR moves (and rounds) that much more.
    rls = case.get("rls", 1.0)
    for n, p in final.items():
        scale = rls if n.endswith("router.weight") else 1.0
        bound, tight = 2 * max(lrs) * scale * case["steps"], 2e-5 * scale
        err = (res[0]["final"][n] - p).abs()
        loose = int((err > tight).sum())
        assert loose <= max(1, err.numel() // 200), (
            f"{n}: {loose} elements off by > {tight:g} (max {err.max():.3g})"
        )
        assert err.max() <= bound, f"{n}: max err {err.max():.3g} > Adam step bound {bound}"
    # every rank gathers the same full state
    for r in range(1, world):
        for n in final:
            torch.testing.assert_close(res[r]["final"][n], res[0]["final"][n], rtol=0, atol=0)


@pytest.mark.parametrize("world,idx", WORLD_IDX)
def test_experts_placed(launched, world, idx):
    """Sharded banks: EP ranks hold different experts, EDP replicas identical ones,
    each the slice ``[ep_rank*L, (ep_rank+1)*L)`` of the full bank; replicated banks
    are not local shards (the engine holds them)."""
    world, results, _ = launched(world)
    case = CASES[world][idx]
    ep, key = case["ep"], case["key"]
    full = results[0][key]["final"]
    layers = [n.removesuffix(".experts.lora_A") for n in full if n.endswith("experts.lora_A")]
    placed = results[0][key]["placements"]
    want = PLACED.get(key, ["replicated" if ep == 1 else "sharded"] * len(placed))
    assert placed == want
    index = {int(n.split(".layers.")[1].split(".")[0]) for n in layers}
    assert sorted(index) == list(range(len(placed)))
    sharded = [n for n in layers if placed[int(n.split(".layers.")[1].split(".")[0])] == "sharded"]
    banks = [results[r][key]["local_banks"] for r in range(world)]
    for r in range(world):
        assert results[r][key]["placements"] == placed
        assert sorted(banks[r]) == sorted(sharded)
        p = r % ep
        for n in sharded:
            lo, a, b = banks[r][n]
            E, L = full[f"{n}.experts.lora_A"].shape[0], a.shape[0]
            assert L == E // ep and lo == p * L
            torch.testing.assert_close(a, full[f"{n}.experts.lora_A"][lo : lo + L], rtol=0, atol=0)
            torch.testing.assert_close(b, full[f"{n}.experts.lora_B"][lo : lo + L], rtol=0, atol=0)
    for r in range(world):
        for q in range(world):
            for n in sharded:
                (_, a1, b1), (_, a2, b2) = banks[r][n], banks[q][n]
                if r % ep == q % ep:
                    assert torch.equal(a1, a2) and torch.equal(b1, b2)
                else:
                    assert not torch.allclose(a1, a2) and not torch.allclose(b1, b2)


def test_zero3_partitions_base(run):
    """Per-rank storage of the frozen base is ~1/W of the model under ZeRO-3 (every ZeRO-3 case)."""
    world, results, _ = run
    cases = [c for c in CASES[world] if c["stage"] == 3]
    assert cases
    for case in cases:
        for r in range(world):
            local, full = results[r][case["key"]]["storage"]
            assert full > 10_000
            assert local <= full / world + 64 * world, (case["key"], local, full)
            assert local >= full / world - 64 * world, (case["key"], local, full)


def test_export_loads_without_deepspeed(run):
    """The gathered adapter export loads with load_adapter onto the plain base model."""
    world, results, out = run
    from loramoe_ds.model.adapter_io import load_adapter

    cases = [c for c in CASES[world] if c.get("export")]
    assert cases
    for case in cases:
        base = C.case_model(case)[0]()
        loaded = load_adapter(base, out / f"adapter_{case['key']}")
        got = dict(loaded.adapter_named_parameters())
        final = results[0][case["key"]]["final"]
        assert set(got) == set(final)
        for n, p in got.items():
            torch.testing.assert_close(p.detach(), final[n], rtol=0, atol=0)
