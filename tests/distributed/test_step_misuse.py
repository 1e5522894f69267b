"""The step API cannot be misused: every wrong order raises a clear error (2 ranks, gloo).

``MoETrainer.train_step`` is the one public step. Its parts check their order:
reading gradients outside the step's ``grad_hook`` (before the synchronisation
or after the update), a second synchronisation (which would halve the expert
gradients), an optimizer step off the accumulation boundary or before the
synchronisation, a step inside a step, and a wrong number of micro-batches all
raise; the joint clip works in replicated mode too.
"""

from __future__ import annotations

import math

import _common as C
import pytest

pytestmark = pytest.mark.distributed

CASES = [
    dict(key="ep2_soft_gas2", ep=2, router="soft", gas=2),
    dict(key="ep1_topk_gas2_replicated", ep=1, router="topk", gas=2),
    dict(key="ep2_topk_gas1", ep=2, router="topk", gas=1),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("misuse")
    return C.launch(2, "misuse", {"cases": CASES}, out, timeout=300)


def _raised(got, kind: str, *fragments: str) -> None:
    assert got is not None, "no error was raised"
    name, msg = got
    assert name == kind, (name, msg)
    for f in fragments:
        assert f in msg, (f, msg)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["key"])
def test_every_misuse_raises(results, case):
    for rank in range(2):
        got = results[rank][case["key"]]
        _raised(got["grads_before_step"], "RuntimeError", "reading the gradients", "grad_hook")
        _raised(got["grads_after_step"], "RuntimeError", "reading the gradients")
        if case["gas"] > 1:
            _raised(got["step_off_boundary"], "RuntimeError", "gradient-accumulation boundary")
        else:
            _raised(got["step_off_boundary"], "RuntimeError", "an optimizer step needs")
        _raised(got["sync_before_backward"], "RuntimeError", "synchronising the gradients")
        _raised(got["wrong_micro_batches"], "ValueError", "gradient_accumulation_steps")
        _raised(got["second_sync"], "RuntimeError", "already synchronised")
        _raised(got["nested_step"], "RuntimeError", "while a train_step is running")
        if case["ep"] > 1:
            _raised(got["expert_step_before_sync"], "RuntimeError", "before the expert gradients")
            _raised(got["second_expert_sync"], "RuntimeError", "already synchronised")
        # the joint clip works in both modes, and the step itself went through
        assert math.isfinite(got["clip_norm"]) and got["clip_norm"] > 0
        assert any(n.endswith("experts.lora_A") for n in got["grads_in_hook"])
        assert got["grad_norm"] is not None and math.isfinite(got["grad_norm"])
        assert got["global_step"] == 1
