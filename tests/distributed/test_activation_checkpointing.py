"""Activation checkpointing changes memory, not gradients.

``train.activation_checkpointing`` wraps every decoder layer in a non-reentrant
checkpoint. On 1 and 2 gloo ranks (ZeRO-3; expert-parallel on 2), soft and top-k
routing, with LoRA dropout on: one step with it gives the same loss and the same
gradient for every router and expert as one step without it, the adapted layers
really run twice (the recompute), and in EP mode the all-to-alls are recomputed
too. A reentrant setup, which would silently drop the auxiliary losses' gradients,
raises.
"""

from __future__ import annotations

import _common as C
import pytest
import torch

CASES = {
    1: [
        dict(key="ep1_soft_z3", ep=1, router="soft", stage=3),
        dict(key="ep1_topk_z3", ep=1, router="topk", stage=3),
    ],
    2: [
        dict(key="ep2_soft_z3", ep=2, router="soft", stage=3),
        dict(key="ep2_topk_z3", ep=2, router="topk", stage=3),
    ],
}


@pytest.fixture(scope="module", params=[1, 2], ids=lambda w: f"world{w}")
def run(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"ac{world}")
    return world, C.launch(world, "activation_checkpointing", {"cases": CASES[world]}, out)


@pytest.mark.distributed
def test_same_gradients_with_and_without_checkpointing(run):
    world, results = run
    for case in CASES[world]:
        for r in range(world):
            plain, ac = results[r][(case["key"], False)], results[r][(case["key"], True)]
            # the checkpointed layers ran again in backward (the recompute is real)
            assert plain["forwards"] == 1 and ac["forwards"] == 2, (case, plain, ac)
            if case["ep"] > 1:  # the expert all-to-alls were recomputed as well
                assert ac["a2a_calls"] > plain["a2a_calls"], (case, plain, ac)
            assert ac["loss"] == pytest.approx(plain["loss"], rel=1e-6, abs=1e-7)
            assert set(ac["grads"]) == set(plain["grads"])
            for n, g in plain["grads"].items():
                assert g.abs().max() > 0, f"{n}: zero grad (test too weak)"
                C.assert_close(ac["grads"][n], g, 1e-5, f"{case['key']} rank {r} grad {n}")


def test_reentrant_checkpointing_raises():
    """Reentrant checkpointing records the routing under no-grad: the model refuses it."""
    from loramoe_ds.model.inject import inject

    model = inject(C.model_factory(), C.adapter_cfg("soft"))
    model.base.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": True}
    )
    model.train()
    with pytest.raises(RuntimeError, match="reentrant"):
        model(**C.batch(0, 0, 0))
    # the same model with the non-reentrant checkpoint trains the routers through the aux losses
    model.base.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}
    )
    out = model(**C.batch(0, 0, 0))
    aux = out.loss - out.lm_loss
    aux.backward()
    grads = [layer.router.weight.grad for layer in model.moe_layers()]
    assert all(g is not None and g.abs().max() > 0 for g in grads)
    assert torch.isfinite(out.loss)
