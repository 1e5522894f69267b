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
    with pytest.raises(ValueError, match="int >= 1"):
        validate_ep(0, 4, [4])
    with pytest.raises(ValueError, match=r"placements=\['sharded'\]: 1 entries for 2 decoder"):
        validate_ep(2, 4, [2, 4], ["sharded"])
    with pytest.raises(ValueError, match=r"placements\[1\]='split': must be one of"):
        validate_ep(2, 4, [2, 4], ["sharded", "split"])
    with pytest.raises(ValueError, match=r"placements\[0\]='sharded': layer 0 has 2 experts.*"
                       r"ep_size=4 cannot split evenly; use 'replicated'"):  # fmt: skip
        validate_ep(4, 4, [2, 4], ["sharded", "sharded"])
    with pytest.raises(ValueError, match=r"placements\[0\]='sharded'.*no expert-parallel group"):
        validate_ep(1, 4, [2], ["sharded"])
    doc = (C.REPO / "docs" / "troubleshooting.md").read_text()
    assert "cannot split evenly; use 'replicated'" in doc and "must be one of ['sharded'" in doc


def test_placement_rule():
    """Default: sharded where ep_size divides the count; an explicit list overrides it."""
    S, R = "sharded", "replicated"
    assert validate_ep(4, 4, [2, 4, 6, 8]) == [R, S, R, S]  # MoLA 2468
    assert validate_ep(2, 4, [2, 4, 6, 8]) == [S, S, S, S]
    assert validate_ep(1, 4, [2, 4, 6, 8]) == [R, R, R, R]
    assert validate_ep(4, 8, [1, 3]) == [R, R]  # fewer experts than EP ranks
    assert validate_ep(2, 4, [2, 4, 6, 8], [R, S, R, R]) == [R, S, R, R]


def test_layout_matches_deepspeed():
    """EP = consecutive blocks, EDP = stride ep (DeepSpeed's E + D ordering)."""
    ep, edp = ep_layout(8, 2)
    assert ep == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert edp == [[0, 2, 4, 6], [1, 3, 5, 7]]


@pytest.mark.parametrize(
    "ep_size, num_experts, placements, match",
    [
        (3, 4, None, r"ep_size=3 does not divide the world size 2; valid ep_size values: \[1, 2\]"),
        (2, [4, 3], ["sharded"] * 2, r"placements\[1\]='sharded': layer 1 has 3 experts"),
    ],
)
def test_build_fails_before_process_groups(monkeypatch, ep_size, num_experts, placements, match):
    from loramoe_ds.parallel.engine import MoETrainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = AdapterConfig(router="topk", top_k=2, num_experts=num_experts, lbc_beta=0.0)
    with pytest.raises(ValueError, match=match):
        MoETrainer.build(C.model_factory, cfg, C.ds_config(2, 3), ep_size=ep_size,
                         optim=C.optim(), placements=placements)  # fmt: skip
    assert not dist.is_initialized()
