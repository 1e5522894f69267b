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
exchanged again).
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


@pytest.mark.slow
@pytest.mark.parametrize("routing", [TOPK, SOFT], ids=["topk", "soft"])
def test_counted_bytes_match_the_model_per_collective(tmp_path, routing):
    ds = tmp_path / "ds.json"
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 1_000_000}
    ds.write_text(json.dumps({"zero_optimization": zero}))
    overrides = ["data.max_length=96", "train.micro_batch_size=2", *routing,
                 "adapter.target_modules=[q_proj,v_proj,gate_proj,down_proj]",
                 "train.activation_checkpointing=true"]  # fmt: skip
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
