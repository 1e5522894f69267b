"""docs/troubleshooting.md lists the errors the code actually raises (guards against drift).

Each case triggers a real error and checks that its characteristic phrase is
both in the message and in the document.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loramoe_ds.config import load_run_config, resolve_ds_config
from loramoe_ds.data import DataConfig, DataError
from loramoe_ds.data.records import DataStats, iter_records

DOC = (Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md").read_text()

CONFIG_CASES = [
    (["trian.lr=1"], "unknown section(s)"),
    (["train.learning_rate=1"], "unknown field(s)"),
    (["lr"], "expected section.field=value"),
    (["train.lr=abc"], "expected a float (a number such as 2e-4)"),
    (["train.max_steps=2.5"], "expected an int"),
    (["data.skip_bad_records=maybe"], "expected a bool (true or false)"),
    (["train.lr=0"], "must be > 0"),
    (["train.min_lr_ratio=2"], "must be in [0, 1]"),
    (["adapter.num_experts=2468"], "is ambiguous: an int means 2468 experts on every layer"),
    (["adapter.num_experts=2x"], "invalid expert pattern '2x'"),
    (["adapter.router=dense"], "valid values ['soft', 'topk']"),
    (["adapter.capacity_factor=1.0"], "only meaningful with router='topk'"),
    (["model.name=tiny-gpt"], "tiny models are tiny-llama, tiny-qwen2, tiny-mistral"),
    (["model.attn_implementation=flash"], "model.attn_implementation='flash': valid values"),
    (["train.global_batch_size=10"], "train.global_batch_size=10 but micro_batch_size"),
    (["output.report_to=comet"], "valid values ['csv', 'tensorboard', 'wandb', 'mlflow']"),
]


@pytest.mark.parametrize("overrides,phrase", CONFIG_CASES)
def test_config_errors_are_documented(overrides, phrase):
    with pytest.raises(ValueError) as e:
        run = load_run_config(None, overrides)
        resolve_ds_config(run, {}, world_size=2)
    assert phrase in str(e.value)
    assert phrase in DOC, f"docs/troubleshooting.md does not list: {phrase}"


@pytest.mark.parametrize(
    "ds,phrase",
    [
        ({"train_batch_size": 16}, "but the run config gives"),
        ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
        ({"fp16": {"enabled": True}}, "fp16 is not supported"),
        ({"bf16": {"enabled": True}}, "bf16.enabled=True but train.precision='fp32'"),
        ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage=2 but parallel.zero_stage"),
        ({"gradient_clipping": 0.5}, "gradient_clipping=0.5 but train.grad_clip=1.0"),
        (
            {"zero_optimization": {"reduce_bucket_size": "auto"}},
            'zero_optimization.reduce_bucket_size="auto": only the keys the run config owns',
        ),
    ],
)
def test_deepspeed_json_errors_are_documented(ds, phrase):
    with pytest.raises(ValueError) as e:
        resolve_ds_config(load_run_config(None), ds, world_size=2)
    assert phrase in str(e.value) and phrase in DOC


@pytest.mark.parametrize(
    "line,phrase",
    [
        (b'{"instruction": "a"', "malformed JSON"),
        (
            b'{"instruction": "caf\xe9", "output": "b", "task_type": 1}',
            "not valid UTF-8 (byte 0xe9",
        ),
        (b'{"instruction": "a", "task_type": 1}', "missing field 'output'"),
        (b'{"instruction": "a", "output": "", "task_type": 1}', "field 'output' is empty"),
        (b'{"instruction": "a", "output": "b", "task_type": "math"}', "has unknown name 'math'"),
        (b'{"instruction": "a", "output": "b", "task_type": 2}', "must be 1 (world knowledge)"),
        (b"[1]", "record must be a JSON object, got list"),
    ],
)
def test_data_errors_are_documented(tmp_path, line, phrase):
    p = tmp_path / "d.jsonl"
    p.write_bytes(line + b"\n")
    with pytest.raises(DataError) as e:
        list(iter_records([p], DataConfig(), DataStats()))
    assert str(e.value).startswith(f"{p}:1: ") and phrase in str(e.value)
    assert phrase in DOC


def test_documented_record_fields_are_the_required_ones():
    from loramoe_ds.data.records import REQUIRED_FIELDS

    for name in REQUIRED_FIELDS:
        assert f'"{name}"' in DOC
