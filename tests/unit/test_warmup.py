"""The learning-rate schedule: closed form, every warm-up step > 0, DeepSpeed protocol, resume."""

from __future__ import annotations

import math

import pytest
import torch

from loramoe_ds.lr_schedule import LRSchedule, WarmupCosineLR, lr_ratio


def _reference(n: int, warmup: int, total: int, m: float) -> float:
    """Written out step by step, independently of lr_ratio's branches."""
    if warmup and n <= warmup:
        return n / warmup
    decay_steps = max(1, total - warmup)
    p = min(1.0, (n - warmup) / decay_steps)
    return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))


@pytest.mark.parametrize("warmup,total,m", [(4, 40, 0.1), (1, 5, 0.0), (0, 6, 0.1), (8, 5, 0.2)])
def test_ratio_matches_closed_form_and_every_step_moves(warmup, total, m):
    ratios = [lr_ratio(n, warmup, total, m) for n in range(1, total + 1)]
    assert ratios == pytest.approx([_reference(n, warmup, total, m) for n in range(1, total + 1)])
    assert all(r > 0 for r in ratios[: max(warmup, 1)])  # warm-up steps (and step 1) move
    if warmup:
        assert ratios[0] == pytest.approx(1 / warmup)
    if 0 < warmup <= total:
        assert ratios[warmup - 1] == pytest.approx(1.0)  # the peak at step W
    if warmup < total:
        assert ratios[-1] == pytest.approx(m)  # the floor at step T


def _lrs_used(sched: WarmupCosineLR, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    """LR each optimizer step uses, stepping the schedule after the update as DeepSpeed does."""
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_scheduler_sets_the_lr_of_each_step_and_resumes():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([w], lr=1e-3)
    sched = WarmupCosineLR(opt, total_num_steps=10, warmup_num_steps=4, cos_min_ratio=0.1)
    used = _lrs_used(sched, opt, 10)
    assert used == pytest.approx([1e-3 * lr_ratio(n, 4, 10, 0.1) for n in range(1, 11)])
    assert used[0] == pytest.approx(2.5e-4) and used[3] == pytest.approx(1e-3)
    # Resume after 6 steps in a fresh scheduler: the remaining steps are identical.
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    first = WarmupCosineLR(opt2, 10, 4, 0.1)
    _lrs_used(first, opt2, 6)
    opt3 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    resumed = WarmupCosineLR(opt3, 10, 4, 0.1)
    resumed.load_state_dict(first.state_dict())
    assert _lrs_used(resumed, opt3, 4) == pytest.approx(used[6:])


def test_deepspeed_builtin_would_not_move_step_one():
    """The regression: DeepSpeed's WarmupCosineLR gives LR 0 to optimizer steps 1 and 2."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR as DSWarmupCosine

    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([w], lr=1e-3)
    ds = DSWarmupCosine(opt, total_num_steps=40, warmup_num_steps=4, warmup_min_ratio=0.0)
    assert _lrs_used(ds, opt, 3)[:2] == [0.0, 0.0]


def test_deepspeed_builds_it_from_the_plan_settings():
    """The typed schedule the trainer hands to ``deepspeed.initialize(lr_scheduler=...)``
    builds this schedule from the optimizer, as DeepSpeed calls it."""
    sched = LRSchedule(total_steps=40, warmup_steps=4, min_lr_ratio=0.1)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=2e-4)
    built = sched(opt)
    assert isinstance(built, WarmupCosineLR)
    assert built.get_last_lr() == [pytest.approx(5e-5)]


def test_make_plan_uses_it():
    from loramoe_ds.config import load_run_config
    from loramoe_ds.plan import make_plan

    run = load_run_config(None, ["model.name=tiny-llama", "train.warmup_steps=4", "train.lr=1e-3"])
    plan = make_plan(run, {}, world_size=1, rank=0)
    assert plan.lr_schedule == LRSchedule(run.train.max_steps, 4, 0.1)
    assert "scheduler" not in plan.ds_config and "optimizer" not in plan.ds_config
    assert "linear warm-up from 0.00025 (step 1) to 0.001 (step 4)" in plan.describe()
