"""Bad ``ep_size`` / expert counts fail with a clear ValueError before any process group."""

from __future__ import annotations

import _common as C
import pytest
import torch.distributed as dist

from loramoe_ds.config import AdapterConfig
from loramoe_ds.parallel.groups import ep_layout, validate_ep

pytestmark = pytest.mark.distributed


def test_validate_ep_messages():
    with pytest.raises(ValueError, match=r"does not divide the world size 4.*\[1, 2, 4\]"):
        validate_ep(3, 4, [6, 6])
    with pytest.raises(ValueError, match=r"layer 2 has 6 experts.*ep_size=4.*\[1, 2\]"):
        validate_ep(4, 4, [4, 4, 6, 8])
    with pytest.raises(ValueError, match="int >= 1"):
        validate_ep(0, 4, [4])
    validate_ep(2, 4, [2, 4, 6, 8])


def test_layout_matches_deepspeed():
    """EP = consecutive blocks, EDP = stride ep (DeepSpeed's E + D ordering)."""
    ep, edp = ep_layout(8, 2)
    assert ep == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert edp == [[0, 2, 4, 6], [1, 3, 5, 7]]


@pytest.mark.parametrize(
    "ep_size, num_experts, match",
    [
        (3, 4, r"ep_size=3 does not divide the world size 2; valid ep_size values: \[1, 2\]"),
        (2, [4, 3], r"layer 1 has 3 experts, not divisible by ep_size=2"),
    ],
)
def test_build_fails_before_process_groups(monkeypatch, ep_size, num_experts, match):
    from loramoe_ds.parallel.engine import MoETrainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = AdapterConfig(router="topk", top_k=2, num_experts=num_experts, lbc_beta=0.0)
    with pytest.raises(ValueError, match=match):
        MoETrainer.build(C.model_factory, cfg, C.ds_config(2, 3), ep_size=ep_size, optim=C.optim())
    assert not dist.is_initialized()
