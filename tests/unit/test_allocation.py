"""MoLA allocations and adapter-config validation."""

import pytest

from loramoe_ds.allocation import NAMED_PATTERNS, experts_per_layer, group_sizes, parse_pattern
from loramoe_ds.config import AdapterConfig


def test_2468_on_32_layers():
    counts = experts_per_layer("2468", 32)
    assert counts == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
    assert sum(counts) == 160


def test_split_rule_on_30_layers_lower_groups_take_extra():
    assert group_sizes(30, 4) == [8, 8, 7, 7]
    counts = experts_per_layer("2468", 30)
    assert counts == [2] * 8 + [4] * 8 + [6] * 7 + [8] * 7


@pytest.mark.parametrize("name,pattern", list(NAMED_PATTERNS.items()))
def test_named_patterns(name, pattern):
    assert experts_per_layer(name, 8) == experts_per_layer(pattern, 8)


def test_named_values():
    assert NAMED_PATTERNS["inverted_triangle"] == "2468"
    assert NAMED_PATTERNS["triangle"] == "8642"
    assert NAMED_PATTERNS["hourglass"] == "8228"
    assert NAMED_PATTERNS["rectangle"] == "5555"


def test_int_list_and_comma_forms():
    assert experts_per_layer(3, 4) == [3, 3, 3, 3]
    assert experts_per_layer([1, 2, 3], 3) == [1, 2, 3]
    assert experts_per_layer("2,16", 4) == [2, 2, 16, 16]
    assert parse_pattern("8642") == [8, 6, 4, 2]


@pytest.mark.parametrize("bad", ["", "24x8", "2408", "diamond", "2,,4", "-2"])
def test_invalid_patterns_raise_clear_error(bad):
    with pytest.raises(ValueError, match="pattern|empty"):
        experts_per_layer(bad, 8)


def test_bad_list_and_too_many_groups():
    with pytest.raises(ValueError, match="3 entries but the model has 4 layers"):
        experts_per_layer([1, 2, 3], 4)
    with pytest.raises(ValueError, match="cannot split 3 layers into 4 groups"):
        experts_per_layer("2468", 3)
    with pytest.raises(ValueError, match=r"num_experts\[1\]"):
        experts_per_layer([1, 0], 2)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(router="dense"), "router='dense'.*soft.*topk"),
        (dict(rank=0), "rank=0"),
        (dict(alpha=0), "alpha=0"),
        (dict(dropout=1.0), "dropout=1.0"),
        (dict(top_k=0, router="topk"), "top_k=0"),
        (dict(num_experts="9x"), "invalid expert pattern"),
        (dict(num_experts=0), "num_experts=0"),
        (dict(num_experts=2.5), "num_experts=2.5"),
        (dict(lbc_delta=1.5), "lbc_delta"),
        (dict(lbc_beta=-1), "lbc_beta"),
        (dict(target_modules=()), "target_modules"),
        (dict(capacity_factor=1.0), "only meaningful with router='topk'"),
    ],
)
def test_config_validation_messages(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        AdapterConfig(**kwargs)


def test_topk_needs_enough_experts_per_layer():
    cfg = AdapterConfig(router="topk", top_k=3, num_experts="2468")
    with pytest.raises(ValueError, match="layer 0 has 2 experts but top_k=3"):
        cfg.layer_experts(8)


def test_from_dict_rejects_unknown_field():
    with pytest.raises(ValueError, match="section 'adapter': unknown field.*'ranks'"):
        AdapterConfig.from_dict({"ranks": 4})
    cfg = AdapterConfig(num_experts=[2, 4])
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------- ints versus patterns
@pytest.mark.parametrize("n", [2468, 8642, 5555, 8228, 24682468])
def test_int_that_reads_as_pattern_is_rejected_with_both_spellings(n):
    with pytest.raises(ValueError) as e:
        AdapterConfig(num_experts=n)
    msg = str(e.value)
    assert f"num_experts={n} is ambiguous" in msg and "\n" not in msg
    assert f'num_experts: "{n}"' in msg  # the YAML pattern spelling
    assert f"adapter.num_experts={','.join(str(n))}" in msg  # the command-line spelling
    assert f"[{n}, {n}, ...]" in msg  # the per-layer spelling
    with pytest.raises(ValueError, match="ambiguous"):
        experts_per_layer(n, 4)


@pytest.mark.parametrize("n", [1, 6, 16, 64, 128, 256, 999, 1024, 2048, 4096])
def test_realistic_int_counts_are_counts(n):
    assert AdapterConfig(num_experts=n).layer_experts(3) == [n, n, n]


def test_suggested_spellings_give_the_pattern():
    """Both spellings the message suggests resolve to the MoLA pattern, from YAML and CLI."""
    from loramoe_ds.config import load_run_config

    want = experts_per_layer("2468", 8)
    assert want == [2, 2, 4, 4, 6, 6, 8, 8]
    cli = load_run_config(None, ["adapter.num_experts=2,4,6,8"]).adapter
    assert experts_per_layer(cli.num_experts, 8) == want
    quoted = load_run_config(None, ['adapter.num_experts="2468"']).adapter
    assert experts_per_layer(quoted.num_experts, 8) == want
    with pytest.raises(ValueError, match="overrides: adapter.num_experts=2468 is ambiguous"):
        load_run_config(None, ["adapter.num_experts=2468"])


def test_unquoted_yaml_pattern_is_rejected_quoted_is_read(tmp_path):
    from loramoe_ds.config import load_run_config

    p = tmp_path / "run.yaml"
    p.write_text("adapter:\n  num_experts: 8642\n")
    with pytest.raises(ValueError, match=r"run.yaml: adapter.num_experts=8642 is ambiguous"):
        load_run_config(p)
    p.write_text("adapter:\n  num_experts: '8642'\n")
    assert load_run_config(p).adapter.layer_experts(4) == [8, 6, 4, 2]
