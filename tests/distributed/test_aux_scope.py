"""``aux_loss_scope="global_batch"``: the LBC and load balance over every data-parallel rank.

Reference: one process holding every rank's micro-batch. Each rank's loss is
``lm_r + z_coef * z_r`` (its own micro-batch, unchanged by the scope) plus
``lbc_beta * LBC(all records) + lb_coef * LB(all tokens)``; DeepSpeed averages
the rank losses' gradients, so the reference objective is
``mean_r(lm_r + z_coef * z_r) + lbc_beta * LBC_all + lb_coef * LB_all``. The aux
part comes from one forward over the right-padded concatenation of all ranks'
micro-batches (padding never counts in either loss).
"""

from __future__ import annotations

import dataclasses

import _common as C
import pytest
import torch

pytestmark = pytest.mark.distributed

#: Null experts and router supervision (docs/design.md): extra router slots and a
#: per-record loss over the gathered sums, checked on the same references.
NULL_SUP = {"null_experts": 2, "router_supervision_coef": 0.5}
CASES = {
    2: [dict(key="ep1_soft", ep=1, router="soft"), dict(key="ep2_topk", ep=2, router="topk"),
        dict(key="ep2_soft_null_sup", ep=2, router="soft", extra=NULL_SUP)],
    4: [dict(key="ep2_soft", ep=2, router="soft"), dict(key="ep1_topk", ep=1, router="topk"),
        dict(key="ep4_topk", ep=4, router="topk"),
        dict(key="ep4_topk_null_sup", ep=4, router="topk", extra=NULL_SUP),
        dict(key="ep1_soft_null_sup", ep=1, router="soft", extra=NULL_SUP)],
}  # fmt: skip


def concat(batches):
    """Right-pad every rank's micro-batch to one length and stack them."""
    S = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for k, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
        rows = [torch.nn.functional.pad(b[k], (0, S - b[k].shape[1]), value=pad) for b in batches]
        out[k] = torch.cat(rows)
    out["task_type"] = torch.cat([b["task_type"] for b in batches])
    return out


def reference(base, case, world):
    from loramoe_ds.model.inject import inject

    extra = case.get("extra", {})
    cfg = dataclasses.replace(C.adapter_cfg(case["router"], **extra), aux_loss_scope="global_batch")
    model = inject(C.model_factory(), cfg)
    model.base.load_state_dict(base, strict=False)
    adapter = dict(model.adapter_named_parameters())
    init = C.init_state(case["router"], **extra)
    with torch.no_grad():
        for n, p in adapter.items():
            p.copy_(init[n])
    batches = [C.batch(r, 0, 0) for r in range(world)]
    per_rank = [model(**b) for b in batches]
    whole = model(**concat(batches))
    local = [o.lm_loss + cfg.z_loss_coef * o.z_loss for o in per_rank]
    aux = (
        cfg.lbc_beta * whole.lbc_loss
        + cfg.router_supervision_coef * whole.router_supervision_loss
        + cfg.load_balance_coef * whole.load_balance_loss
    )
    total = sum(local) / world + aux
    params = list(adapter.values())
    grads = torch.autograd.grad(total, params)
    return {
        "rank_losses": [float((x + aux).detach()) for x in local],
        "micro_lbc": [float(o.lbc_loss.detach()) for o in per_rank],
        "lbc": float(whole.lbc_loss.detach()),
        "sup": float(whole.router_supervision_loss.detach()),
        "lb": float(whole.load_balance_loss.detach()),
        "grads": dict(zip(adapter, grads)),
    }


@pytest.mark.parametrize("world", [2, 4])
def test_global_batch_aux_equals_one_process(world, tmp_path):
    results = C.launch(world, None, {"cases": CASES[world]}, tmp_path, worker="_aux_worker.py")
    for case in CASES[world]:
        key = case["key"]
        ref = reference(results[0][key]["base"], case, world)
        for r in range(world):
            got = results[r][key]
            assert got["lbc"] == pytest.approx(ref["lbc"], rel=1e-5), (key, r)
            assert got["lb"] == pytest.approx(ref["lb"], rel=1e-5), (key, r)
            assert got["sup"] == pytest.approx(ref["sup"], rel=1e-5), (key, r)
            if "extra" in case:
                assert ref["sup"] > 0, key  # the supervision loss is really on
            assert got["loss"] == pytest.approx(ref["rank_losses"][r], rel=1e-5), (key, r)
        grads = results[0][key]["grads"]
        assert set(grads) == set(ref["grads"])
        for n, g in ref["grads"].items():
            torch.testing.assert_close(grads[n], g, rtol=2e-5, atol=1e-7, msg=f"{key} {n}")
        # the scope matters: every rank's own micro-batch LBC differs from the global one
        assert all(abs(m - ref["lbc"]) > 1e-3 * ref["lbc"] for m in ref["micro_lbc"]), key
