"""bf16 as docs/design.md ("Precision") states it, under ZeRO-3 with expert parallelism.

With bf16 every tensor the DeepSpeed engine trains (routers; banks when
``ep_size == 1``) is a bf16 compute copy of an fp32 master weight, in every ZeRO
stage: :func:`~loramoe_ds.model.inject.inject` gives routers and banks the
frozen base's dtype (DeepSpeed does not cast parameters made after
``zero.Init``). Expert-parallel banks stay fp32 (their own AdamW) and compute
in the activation dtype; router logits and softmax are fp32.

The bf16 run is compared with the fp32 run of the same weights (loaded from
files, as real runs do) and batches. Bounds, about 3x what the 2-rank CPU run
showed (measured: first-step loss 0.05%, later steps up to 6.6% where a top-k
choice flips; gradient relative error median 6.5%, max 17% on this 32-wide
model, which a single process in bf16 shows too):

* the first step's loss within ``LOSS0_REL``; later steps within ``LOSS_REL``;
* the first step's gradients (relative Frobenius error per tensor): median
  within ``GRAD_MEDIAN_REL``, every tensor within ``GRAD_MAX_REL``.

The weights after the steps are not compared: Adam's first updates are close to
``lr * sign(g)``, so an entry whose small gradient changes sign in bf16 moves the
other way and no tight bound holds. On CPUs bf16 is slow and for tests only.
"""

from __future__ import annotations

import _common as C
import pytest
import torch

pytestmark = pytest.mark.distributed

LOSS0_REL = 0.01
LOSS_REL = 0.2
GRAD_MEDIAN_REL = 0.2
GRAD_MAX_REL = 0.5
CASES = [
    dict(key="ep2_topk_z3", ep=2, router="topk", stage=3, steps=3),
    dict(key="ep1_soft_z3", ep=1, router="soft", stage=3, steps=2),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("precision")
    return C.launch(2, None, {"cases": CASES}, out, timeout=600, worker="_precision_worker.py")


@pytest.mark.parametrize("case", CASES, ids=[c["key"] for c in CASES])
def test_bf16_dtypes_as_designed(results, case):
    for res in results:
        assert res[(case["key"], "fp32")]["loaded"] and res[(case["key"], "bf16")]["loaded"]
        d32, d16 = res[(case["key"], "fp32")]["dtypes"], res[(case["key"], "bf16")]["dtypes"]
        assert d32["base"] == d32["router"] == {"torch.float32"}
        assert d16["base"] == {"torch.bfloat16"}
        assert d16["router"] == {"torch.bfloat16"}, d16
        if case["ep"] > 1:
            assert d16["ep_banks"] == {"torch.float32"} and not d16["engine_banks"], d16
        else:
            assert d16["engine_banks"] == {"torch.bfloat16"} and not d16["ep_banks"], d16


@pytest.mark.parametrize("case", CASES, ids=[c["key"] for c in CASES])
def test_bf16_training_tracks_fp32(results, case):
    for r, res in enumerate(results):
        a, b = res[(case["key"], "fp32")], res[(case["key"], "bf16")]
        for step, (l32, l16) in enumerate(zip(a["losses"], b["losses"], strict=True)):
            bound = LOSS0_REL if step == 0 else LOSS_REL
            assert abs(l16 - l32) <= bound * abs(l32), (r, step, l32, l16)
        errs = {
            n: float((b["grads"][n].float() - g).norm() / g.norm().clamp_min(1e-12))
            for n, g in a["grads"].items()
        }
        assert set(errs) == set(b["grads"]) and errs
        worst = max(errs, key=errs.get)
        assert errs[worst] <= GRAD_MAX_REL, (r, worst, errs[worst])
        assert sorted(errs.values())[len(errs) // 2] <= GRAD_MEDIAN_REL, (r, errs)
        assert all(p.dtype == torch.float32 for p in b["final"].values())  # master weights
