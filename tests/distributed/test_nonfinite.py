"""A non-finite step is dropped on every rank together and leaves no trace (2 ranks, gloo).

Rank 1 alone sees step ``k`` go non-finite (an infinite loss through a forward
hook, or an infinite expert gradient). Both ranks must agree to drop the step
and name the same term; afterwards the run must equal, bit for bit, a run that
never saw batch ``k``: the same adapter, the same Adam moments and step counts,
the same LR (the schedule did not advance), with the step counter one ahead and
``skipped_steps`` 1 (DeepSpeed's own skipped-step semantics,
``loramoe_ds/parallel/nonfinite.py``).
"""

from __future__ import annotations

import _common as C
import pytest
import torch

from loramoe_ds.parallel.nonfinite import NonFiniteStopError, NonFiniteStreak

CASES = [
    dict(key="ep2_grad", ep=2, router="soft", gas=2, steps=4, k=1, poison="grad"),
    dict(key="replicated_loss", ep=1, router="topk", gas=1, steps=4, k=2, poison="loss"),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("nonfinite")
    return C.launch(2, None, {"cases": CASES}, out, timeout=400, worker="_nonfinite_worker.py")


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["key"])
def test_dropped_step_equals_never_seeing_its_batch(results, case):
    term = "lm_loss" if case["poison"] == "loss" else "grad"
    for rank in range(2):
        p, r = results[rank][case["key"]]["P"], results[rank][case["key"]]["R"]
        want = [term if s == case["k"] else None for s in range(case["steps"])]
        assert p["verdicts"] == want, (rank, p["verdicts"])  # agreed on both ranks
        assert r["verdicts"] == [None] * (case["steps"] - 1)
        assert p["norms"][case["k"]] is None
        assert p["global_step"] == r["global_step"] + 1 == case["steps"]
        assert p["skipped_steps"] == 1 and r["skipped_steps"] == 0
        assert p["lr"] == r["lr"]
        for n, t in r["final"].items():
            assert torch.equal(p["final"][n], t), n
        for key in ("exp_avg", "exp_avg_sq"):
            for n, t in r["optim"][key].items():
                assert torch.equal(p["optim"][key][n], t), (key, n)
        assert p["optim"]["step"] == r["optim"]["step"]
        assert all(torch.isfinite(t).all() for t in p["final"].values())


def test_stop_after_patience_names_the_first_step_and_term(tmp_path):
    streak = NonFiniteStreak("stop", patience=2)
    assert streak.update(5, None) == 0
    streak.check(5, tmp_path)
    assert streak.update(6, "z") == 1
    streak.check(6, tmp_path)  # 1 in a row: dropped, not stopped
    assert streak.update(7, None) == 1  # a good step resets the streak
    streak.update(8, "lb")
    streak.check(8, tmp_path)
    streak.update(9, "lm_loss")
    (tmp_path / "latest").write_text("global_step5")
    with pytest.raises(NonFiniteStopError) as e:
        streak.check(9, tmp_path)
    msg = str(e.value)
    assert msg.startswith("step 8: lb went non-finite first") and "global_step5" in msg
    assert "\n" not in msg
    skip = NonFiniteStreak("skip", patience=1)
    for s in range(1, 10):
        skip.update(s, "loss")
        skip.check(s, tmp_path)  # never stops
    assert skip.skipped == 9
