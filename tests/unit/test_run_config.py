"""Run-config loading, overrides and validation against the DeepSpeed JSON."""

import json

import pytest

from loramoe_ds.run_config import load_ds_config, load_run_config, resolve_ds_config


def _write(tmp_path, text, name="run.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_with_overrides(tmp_path):
    p = _write(tmp_path, "adapter:\n  num_experts: '2468'\ntrain:\n  lr: 1.0e-4\n")
    run = load_run_config(p, ["train.lr=3e-4", "adapter.router=topk", "parallel.ep_size=2"])
    assert run.train.lr == 3e-4
    assert run.adapter.router == "topk" and run.adapter.num_experts == "2468"
    assert run.parallel.ep_size == 2


@pytest.mark.parametrize(
    "text,msg",
    [
        ("trian:\n  lr: 1\n", "unknown section.*'trian'"),
        ("train:\n  learning_rate: 1\n", "section 'train'.*unknown field.*learning_rate"),
        ("adapter:\n  router: dense\n", r"run.yaml: adapter: router='dense'"),
        ("train:\n  precision: fp16\n", "precision='fp16'"),
        ("- a\n- b\n", "top level must be a mapping"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path, text, msg):
    with pytest.raises(ValueError, match=msg):
        load_run_config(_write(tmp_path, text))


def test_bad_override():
    with pytest.raises(ValueError, match="section.field=value"):
        load_run_config(None, ["lr"])


def test_ds_config_filled_and_checked(tmp_path):
    run = load_run_config(None, ["train.micro_batch_size=2", "train.grad_accum=3"])
    ds = resolve_ds_config(run, {"zero_optimization": {"stage": 3}}, world_size=4)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_micro_batch_size_per_gpu"] == 2
    with pytest.raises(ValueError, match="train_batch_size=16 but the run config gives 24"):
        resolve_ds_config(run, {"train_batch_size": 16}, world_size=4)
    with pytest.raises(ValueError, match="global_batch_size=10"):
        resolve_ds_config(load_run_config(None, ["train.global_batch_size=10"]), {}, world_size=2)


@pytest.mark.parametrize(
    "ds,msg",
    [
        ({"bf16": {"enabled": True}}, "bf16.enabled=True but train.precision='fp32'"),
        ({"zero_optimization": {"stage": 2}}, "stage=2 but parallel.zero_stage=3"),
        ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
        ({"fp16": {"enabled": True}}, "fp16 is not supported"),
        ({"gradient_clipping": 0.5}, "gradient_clipping=0.5 but train.grad_clip=1.0"),
    ],
)
def test_ds_config_disagreements(ds, msg):
    with pytest.raises(ValueError, match=msg):
        resolve_ds_config(load_run_config(None), ds, world_size=2)


def test_load_ds_config_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_ds_config(tmp_path / "nope.json")
    p = _write(tmp_path, "{bad", "x.json")
    with pytest.raises(ValueError, match="x.json: not valid JSON"):
        load_ds_config(p)
    p = _write(tmp_path, json.dumps({"train_micro_batch_size_per_gpu": 4}), "ok.json")
    assert load_ds_config(p)["train_micro_batch_size_per_gpu"] == 4
