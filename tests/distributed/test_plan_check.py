"""The bytes model (loramoe_ds/cost_model/) against collectives counted in a real run.

Two gloo ranks train the tiny model through the real path (``make_plan`` ->
``prepare_data`` -> ``train``) with every ``torch.distributed`` call counted
(bench/plan_check.py); each collective's bytes must equal the prediction for the
token counts the ranks saw within 5%. The top-k case mixes placements (MoLA-like
``[2, 3, 4, 8]`` top-2 at ``ep_size`` 2: layer 1 replicated, the others sharded),
packs rows, checkpoints every decoder layer and runs ZeRO-3 with no persistent
parameters, so every term is exercised: per-module all-gathers in forward, in
the recompute and in backward (DeepSpeed's release of a layer's recomputed
weights after its last module's backward), gradient reduce-scatter, the clip's
gathers, counts and rows all-to-alls, the small all-reduces. The soft case
checks the recompute's early stop (the layer-ending linear's return rows are not
exchanged again); its twin without checkpointing the backward hooks of a first
adapted layer whose input needs no gradient. The same runs log ZeRO-3's module hooks
(``PLAN_CHECK_HOOKS=1``): the model's trace (``loramoe_ds/cost_model/zero3.py``)
must be DeepSpeed's, hook by hook.
"""

from __future__ import annotations

import json

import plan_check
import pytest

TOPK = ["adapter.router=topk", "adapter.top_k=2", "adapter.num_experts=[2,3,4,8]"]
# soft, every layer sharded: down_proj ends its layer, so the recompute skips its return rows
SOFT = ["adapter.router=soft", "adapter.num_experts=4"]
EXACT = ("zero3_param_allgather", "ep_rows_a2a", "ep_counts_a2a", "clip_grad_allgather",
         "token_mean_allreduce", "metrics_allreduce", "nonfinite_allreduce")  # fmt: skip


def _model_hooks(config, overrides, ds, world):
    """:func:`loramoe_ds.cost_model.zero3_trace` for the case, as bench/plan_check.py logs
    DeepSpeed's hooks: ``[kind, phase, module key, sorted parameter sizes]``."""
    from loramoe_ds import cost_model as cm
    from loramoe_ds.config import load_ds_config, load_run_config
    from loramoe_ds.plan import make_plan
    from loramoe_ds.plan_cost import workload

    plan = make_plan(load_run_config(config, overrides), load_ds_config(ds), world, 0)
    p = plan.run.parallel
    w = workload(plan.run, plan.ds_config, world, p.ep_size, p.zero_stage, plan.layer_placements,
                 cpu=True)  # fmt: skip
    sizes = {pid: n for m in plan.cost.shapes.modules for pid, n in m.params}
    out = []
    for e in cm.zero3_trace(plan.cost.shapes, w):
        if isinstance(e, cm.coordinator.Fetch):
            phase = "recompute" if e.recompute else ("fwd" if e.forward else "bwd")
            out.append(["F", phase, e.module, sorted(sizes.get(q, n) for q, n in e.params)])
        else:
            out.append(["R", "fwd" if e.forward else "bwd", e.module, []])
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "routing",
    [TOPK, SOFT, [*SOFT, "train.activation_checkpointing=false"]],
    ids=["topk", "soft", "soft-no-ckpt"],
)
def test_counted_bytes_match_the_model_per_collective(tmp_path, routing, monkeypatch):
    monkeypatch.setenv("PLAN_CHECK_HOOKS", "1")  # rank records log ZeRO-3's module hooks
    ds = tmp_path / "ds.json"
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 1_000_000}
    ds.write_text(json.dumps({"zero_optimization": zero}))
    overrides = ["data.max_length=96", "train.micro_batch_size=2",
                 "adapter.target_modules=[q_proj,v_proj,gate_proj,down_proj]",
                 "train.activation_checkpointing=true", *routing]  # fmt: skip
    res = plan_check.measure("tiny", "configs/tiny.yaml", overrides, 2, True, str(ds), 1,
                             tmp_path / "run")  # fmt: skip
    print("\n".join(plan_check.table_rows(res)))
    pred, meas = res["pred"], res["meas"]
    modelled = set(meas) - set(plan_check.UNMODELLED)
    want = {"zero3_param_allgather", "engine_grad_reduce", "ep_rows_a2a", "ep_counts_a2a",
            "clip_grad_allgather", "token_mean_allreduce", "metrics_allreduce",
            "nonfinite_allreduce"}  # fmt: skip
    assert want <= modelled
    assert set(pred) == modelled, (sorted(pred), sorted(modelled))
    for k in modelled:
        assert pred[k] == pytest.approx(meas[k], rel=0.05), (k, pred[k], meas[k])
    for k in EXACT:  # the terms the model derives call by call: no slack at all
        assert pred[k] == meas[k], (k, pred[k], meas[k])
    other = sum(meas.get(k, 0) for k in plan_check.UNMODELLED)
    assert other < 0.01 * sum(meas.values())
    # the model's ZeRO-3 trace is DeepSpeed's, hook by hook (one micro-batch of rank 0)
    hooks = json.loads((tmp_path / "run" / "rank0.json").read_text())["hooks"]
    root = hooks[0]
    mb = hooks[: next((i for i, h in enumerate(hooks) if i and h == root), len(hooks))]
    ov = [*overrides, "data.packing=true"]
    model = _model_hooks(plan_check.REPO / "configs" / "tiny.yaml", ov, str(ds), 2)
    assert [h[:2] + h[3:] for h in mb] == [h[:2] + h[3:] for h in model]
    ids: dict[int, int] = {}
    for h, m in zip(mb, model):  # the same module where the model says so
        assert ids.setdefault(m[2], h[2]) == h[2], (h, m)
