"""The LM loss of an optimizer step is the token mean over the whole global batch.

2 and 4 gloo ranks, two GAS micro-batches each, label counts that differ between
ranks and micro-batches: the gradients of every router and expert (expert-parallel
and replicated, ZeRO-3 and ZeRO-2) equal those of ONE process holding the whole
batch, whose LM loss is ``sum of token CE / N`` over all of it (one right-padded
batch), plus the auxiliary losses averaged over the micro-steps. A
``micro_batch_mean`` case is the control: it matches the mean of micro-batch means
and not the token mean.
"""

from __future__ import annotations

import _common as C
import pytest

pytestmark = pytest.mark.distributed

GAS = 2
CASES = {
    2: [
        dict(key="ep2_soft_z3", ep=2, router="soft", stage=3, reduction="token_mean"),
        dict(key="ep1_topk_z3_replicated", ep=1, router="topk", stage=3, reduction="token_mean"),
        dict(key="ep2_topk_z2_micro_mean", ep=2, router="topk", stage=2,
             reduction="micro_batch_mean"),
    ],
    4: [
        dict(key="ep2_topk_z3", ep=2, router="topk", stage=3, reduction="token_mean"),
        dict(key="ep1_soft_z3_replicated", ep=1, router="soft", stage=3, reduction="token_mean"),
    ],
}  # fmt: skip


def reference(base_state, router: str, world: int):
    """One process, the whole batch: grads of both objectives and the token-mean values."""
    micro = [C.uneven_batch(r, m) for r in range(world) for m in range(GAS)]
    out = {}
    for objective in ("token_mean", "micro_batch_mean"):
        model, adapter = C.reference_model(router, base_state)
        aux = 0.0
        micro_mean = 0.0
        for b in micro:
            o = model(**b)
            aux = aux + (o.loss - o.lm_loss) / len(micro)  # weighted aux losses, per micro-step
            micro_mean = micro_mean + o.lm_loss / len(micro)
        whole = model(**C.concat_batches(micro))  # LM mean over every labelled token
        lm = whole.lm_loss if objective == "token_mean" else micro_mean
        (lm + aux).backward()
        n = int(sum((b["labels"][:, 1:] != -100).sum() for b in micro))
        assert n == whole.num_label_tokens
        out[objective] = {
            "grads": {k: p.grad.detach().clone() for k, p in adapter.items()},
            "lm_loss": float(whole.lm_loss.detach()),
            "loss": float((whole.lm_loss + aux).detach()),
            "n": n,
        }
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def run(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"tm{world}")
    cases = [{**c, "gas": GAS} for c in CASES[world]]
    return world, C.launch(world, "token_mean", {"cases": cases}, out, timeout=600)


def test_label_counts_differ_between_ranks_and_micro_batches():
    """The premise of the test: a mean of micro-batch means is not the token mean here."""
    counts = {(r, m): int((C.uneven_batch(r, m)["labels"][:, 1:] != -100).sum())
              for r in range(4) for m in range(GAS)}  # fmt: skip
    c = list(counts.values())
    assert len(set(c)) >= 4 and max(c) >= 2 * min(c), counts


def test_gradients_equal_one_process_with_the_whole_batch(run):
    world, results = run
    for case in CASES[world]:
        _check_case(case, world, [results[r][case["key"]] for r in range(world)])


def _check_case(case, world, res):
    ref = reference(res[0]["base"], case["router"], world)
    mine = case["reduction"]
    want = ref[mine]
    other = ref["micro_batch_mean" if mine == "token_mean" else "token_mean"]
    got = res[0]["grads"]
    assert set(got) == set(want["grads"])
    assert any(n.endswith("router.weight") for n in got)
    assert any(n.endswith("experts.lora_A") for n in got)
    differs = 0.0
    for n, g in want["grads"].items():
        assert g.abs().max() > 0, f"{n}: reference grad is zero (test too weak)"
        C.assert_close(got[n], g, 2e-5, f"{case['key']} grad {n}")
        differs = max(differs, ((got[n] - other["grads"][n]).abs().max() / g.abs().max()).item())
    assert differs > 1e-3, f"token mean and micro-batch mean agree ({differs:.2g}): weak test"
    for r in range(world):
        # every rank logs the same global values: the true token mean of the step
        assert res[r]["n_step"] == ref["token_mean"]["n"]
        row = res[r]["row"]
        assert row["label_tokens"] == ref["token_mean"]["n"]
        assert row["lm_loss"] == pytest.approx(ref["token_mean"]["lm_loss"], rel=2e-5)
        if mine == "token_mean":
            assert row["loss"] == pytest.approx(want["loss"], rel=2e-5)
