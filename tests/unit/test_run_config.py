"""Run-config loading, overrides and validation against the DeepSpeed JSON."""

import json
from pathlib import Path

import pytest

from loramoe_ds.config import load_ds_config, load_run_config, resolve_ds_config


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
        ("adapter:\n  router: dense\n", r"run.yaml: adapter\.router='dense'"),
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


# ------------------------------------------------------------------ value types
@pytest.mark.parametrize(
    "override,msg",
    [
        ("train.lr=abc", r"^overrides: train.lr='abc': expected a float"),
        ("train.max_steps=abc", r"^overrides: train.max_steps='abc': expected an int$"),
        ("parallel.ep_size=abc", r"^overrides: parallel.ep_size='abc': must be an int >= 1"),
        ("train.max_steps=2.5", r"train.max_steps=2.5: expected an int$"),
        ("train.seed=true", r"train.seed=True: expected an int$"),
        ("train.lr=inf", r"train.lr=inf: expected a float"),
        ("data.skip_bad_records=maybe", r"data.skip_bad_records='maybe': expected a bool"),
        ("adapter.alpha=[1]", r"adapter.alpha=\[1\]: expected a float"),
        ("train.precision=null", r"train.precision=None: expected a str$"),
    ],
)
def test_wrong_type_names_field_value_and_type(override, msg):
    with pytest.raises(ValueError, match=msg) as e:
        load_run_config(None, [override])
    assert "\n" not in str(e.value)


def test_yaml_strings_coerced_by_field_type(tmp_path):
    """PyYAML reads ``2e-4`` (no dot) as a string; every typed field converts losslessly."""
    text = (
        "train:\n  lr: 2e-4\n  max_steps: 1e3\n  min_lr_ratio: '0.5'\n  global_batch_size: null\n"
        "data:\n  skip_bad_records: 'yes'\n  train_files: one.jsonl\n"
        "adapter:\n  alpha: 16\n  capacity_factor: '1.25'\n  router: topk\n"
        "  target_modules: q_proj\n  num_experts: [2, '4']\n"
        "output:\n  dir: 2024\n"
    )
    raw = __import__("yaml").safe_load(text)
    assert raw["train"]["lr"] == "2e-4"  # the PyYAML behaviour being fixed
    run = load_run_config(_write(tmp_path, text))
    assert run.train.lr == 2e-4 and type(run.train.lr) is float
    assert run.train.max_steps == 1000 and type(run.train.max_steps) is int
    assert run.train.min_lr_ratio == 0.5 and run.train.global_batch_size is None
    assert run.data.skip_bad_records is True and run.data.train_files == ["one.jsonl"]
    assert run.adapter.alpha == 16.0 and type(run.adapter.alpha) is float
    assert run.adapter.capacity_factor == 1.25
    assert run.adapter.target_modules == ("q_proj",)
    assert run.adapter.num_experts == [2, 4]
    assert run.output.dir == "2024"


def test_coercion_is_generic_over_any_dataclass():
    """A section class no test names (e.g. a replaced data section) is coerced the same way."""
    from dataclasses import dataclass, field

    from loramoe_ds.config.coerce import coerce_fields

    @dataclass
    class Other:
        ratio: float = 0.1
        names: dict[str, int] = field(default_factory=dict)
        cap: int | None = None

    got = coerce_fields(Other, {"ratio": "3e-1", "names": {"a": "1"}, "cap": "8"}, "other")
    assert got == {"ratio": 0.3, "names": {"a": 1}, "cap": 8}
    with pytest.raises(ValueError, match=r"^other.cap='x': expected an int or null$"):
        coerce_fields(Other, {"cap": "x"}, "other")


@pytest.mark.parametrize(
    "override,msg",
    [
        ("train.min_lr_ratio=2", "train.min_lr_ratio=2.0: must be in"),
        ("train.warmup_steps=-1", "train.warmup_steps=-1: must be >= 0"),
        ("output.log_every=0", "output.log_every=0: must be >= 1"),
        ("model.tiny_hidden=20", "model.tiny_hidden=20: must be a multiple of 8"),
    ],
)
def test_range_errors_name_the_field(override, msg):
    with pytest.raises(ValueError, match=msg):
        load_run_config(None, [override])


def test_yaml_syntax_error_is_one_line_with_position(tmp_path):
    p = _write(tmp_path, "train:\n  lr: 1\n  steps: [1, 2\n")
    with pytest.raises(ValueError) as e:
        load_run_config(p)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{p}:4:1: not valid YAML/JSON: expected ','")
    tab = _write(tmp_path, "train:\n\tlr: 1\n", "tab.yaml")
    with pytest.raises(ValueError, match=r"tab.yaml:2:1: not valid YAML/JSON: found char"):
        load_run_config(tab)


# ------------------------------------------------------------ DeepSpeed JSON "auto"
SHIPPED = sorted((Path(__file__).resolve().parents[2] / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_ds_configs_leave_the_run_configs_keys_auto(path):
    """Every key the run config owns is "auto" in the shipped JSONs; nothing else is."""
    ds = load_ds_config(path)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):  # fmt: skip
        assert ds[key] == "auto", key
    assert ds["bf16"] == {"enabled": "auto"} and "fp16" not in ds
    assert "train_batch_size" not in ds and "optimizer" not in ds and "scheduler" not in ds
    assert ds["zero_optimization"]["stage"] == int(path.stem[4])
    assert "auto" not in json.dumps(ds["zero_optimization"])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["train.micro_batch_size=8", "train.grad_accum=3", "train.grad_clip=0.5"],
        ["train.precision=bf16", "train.micro_batch_size=1", "train.grad_clip=0"],
    ],
)
def test_shipped_ds_config_with_overrides_is_filled_from_the_run_config(path, overrides):
    stage = int(path.stem[4])
    run = load_run_config(None, [*overrides, f"parallel.zero_stage={stage}"])
    ds = resolve_ds_config(run, load_ds_config(path), world_size=2)
    t = run.train
    assert ds["train_micro_batch_size_per_gpu"] == t.micro_batch_size
    assert ds["gradient_accumulation_steps"] == t.grad_accum
    assert ds["train_batch_size"] == t.micro_batch_size * t.grad_accum * 2
    assert ds["bf16"] == {"enabled": t.precision == "bf16"}
    assert "gradient_clipping" not in ds  # the trainer's own joint clip (train.grad_clip)
    assert "auto" not in json.dumps(ds)
    shipped = load_ds_config(path)["zero_optimization"]
    assert ds["zero_optimization"] == shipped  # DeepSpeed's business is kept as written


def test_explicit_ds_values_are_still_checked():
    """A user JSON's explicit values must agree; "auto" only for the run config's keys."""
    run = load_run_config(None, ["train.micro_batch_size=8", "train.precision=bf16"])
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=4 but the run config"):
        resolve_ds_config(run, {"train_micro_batch_size_per_gpu": 4}, world_size=2)
    with pytest.raises(ValueError, match="bf16.enabled=False but train.precision='bf16'"):
        resolve_ds_config(run, {"bf16": {"enabled": False}}, world_size=2)
    with pytest.raises(ValueError, match=r'zero_optimization.reduce_bucket_size="auto": only'):
        resolve_ds_config(run, {"zero_optimization": {"reduce_bucket_size": "auto"}}, 2)
    with pytest.raises(ValueError, match="fp16 is not supported"):
        resolve_ds_config(run, {"fp16": {"enabled": "true"}}, world_size=2)
    ok = {"train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True}, "gradient_clipping": 1,
          "fp16": {"enabled": "auto"}}  # fmt: skip
    ds = resolve_ds_config(run, ok, world_size=2)
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["train_batch_size"] == 16
    # absent precision keys are filled like "auto"
    assert resolve_ds_config(run, {}, world_size=2)["bf16"] == {"enabled": True}
