"""Every optimizer step of the warm-up moves routers and experts, through the real launcher path.

Built from ``configs/tiny.yaml`` by ``make_plan`` + ``MoETrainer``, as
``launcher/train.py`` builds them, on CPU (gloo, ZeRO-3): two ranks with expert
parallelism 2 (experts in the expert optimizer, routers in DeepSpeed's), and one
rank with replicated experts (both in DeepSpeed's optimizer). Reference:
the closed-form schedule, and Adam's first update, whose largest element is the
step's learning rate (``m/sqrt(v) = g/|g|``).
"""

from __future__ import annotations

import json

import pytest
from _common import launch

WARMUP, STEPS, LR = 3, 3, 1e-2


@pytest.mark.distributed
@pytest.mark.parametrize("world,ep", [(2, 2), (1, 1)])
def test_every_warmup_step_moves_routers_and_experts(tmp_path, world, ep):
    overrides = [
        f"train.warmup_steps={WARMUP}", f"train.max_steps={STEPS}", f"train.lr={LR}",
        "train.micro_batch_size=2", "model.tiny_layers=2", "model.tiny_hidden=32",
        f"parallel.ep_size={ep}", "train.grad_clip=0", f"output.dir={tmp_path}",
    ]  # fmt: skip
    args = {"overrides": overrides}
    procs = launch(world, None, args, tmp_path, wait=False, worker="_warmup_worker.py")
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0] * world, (tmp_path / "log_rank0.txt").read_text()[-3000:]
    res = json.loads((tmp_path / "steps.json").read_text())
    assert res["ep"] == (ep > 1)  # EP: the expert optimizer; else DeepSpeed's steps the experts
    steps = res["steps"]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    # The closed form: linear warm-up from LR/W at step 1 to LR at step W.
    for s in steps:
        assert s["lr"] == pytest.approx(LR * s["step"] / WARMUP, rel=1e-9), s["step"]
        assert s["lr"] > 0
    for s in steps[:WARMUP]:
        routers = {n: d for n, d in s["delta"].items() if n.endswith("router.weight")}
        experts_b = {n: d for n, d in s["delta"].items() if "lora_B" in n}
        assert routers and experts_b
        for group in (routers, experts_b):
            for name, d in group.items():
                assert d > 0, (s["step"], name)  # every tensor moved
    # Adam's first update is +-lr on every element with a non-zero gradient.
    first = steps[0]
    for name, d in first["delta"].items():
        if name.endswith("router.weight") or "lora_B" in name:
            assert d == pytest.approx(first["lr"], rel=1e-3), name
    # lora_A starts moving at step 2 (its gradient is zero while B == 0).
    assert all(d > 0 for n, d in steps[1]["delta"].items() if "lora_A" in n)
