"""A real SFT mix end to end: chat, ShareGPT and alpaca datasets with their own task types and
weights, trained on 2 ranks by ``deepspeed launcher/train.py`` with a shipped DeepSpeed JSON
and a batch override, reported to csv, TensorBoard, mlflow and wandb (offline) on rank 0.

The fixture data is written here (a tiny random Llama; nothing is downloaded):

* ``chat.jsonl``: 6 OpenAI ``messages`` records, a system turn and two user/assistant
  exchanges each, dataset ``task_type: knowledge``, weight 2;
* ``sharegpt.json``: 10 ShareGPT ``conversations`` (a JSON array), ``task_type: 0``, weight 1;
* ``alpaca.jsonl``: 8 alpaca records, half carrying ``task_type: 0``, the rest none, dataset
  ``task_type: 1``, weight 1.5.

24 records per epoch, quotas by largest remainder (docs: README, ``loramoe_ds/data/mix.py``):
``24 * (2, 1, 1.5) / 4.5 = (10.67, 5.33, 8)`` -> ``(11, 5, 8)``; the global batch of 4
(micro 2 x 2 ranks) divides 24, so the epoch is used whole and the realised shares are
exactly ``11/24, 5/24, 8/24``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import yaml
from launching import free_port
from test_trackers import mlflow_runs

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 4

CHAT = [
    {"messages": [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": f"What is the capital of country number {i}?"},
        {"role": "assistant", "content": f"The capital of country {i} is City {i}."},
        {"role": "user", "content": "And its river?"},
        {"role": "assistant", "content": f"River {i} runs through it."},
    ]}
    for i in range(6)
]  # fmt: skip
SHAREGPT = [
    {"conversations": [
        {"from": "human", "value": f"Add {i} and {i + 1}."},
        {"from": "gpt", "value": f"The sum is {2 * i + 1}."},
    ]}
    for i in range(10)
]  # fmt: skip
ALPACA = [
    {"instruction": "Reverse the word.", "input": w, "output": w[::-1],
     **({"task_type": 0} if i % 2 == 0 else {})}
    for i, w in enumerate(["apple", "river", "stone", "cloud", "green", "table", "light", "sound"])
]  # fmt: skip
WEIGHTS = (2.0, 1.0, 1.5)


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE",
              "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID"):  # fmt: skip
        env.pop(k, None)
    env.update(
        DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT),
        TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline", WANDB_SILENT="true",
        MLFLOW_TRACKING_URI=f"file:{tmp_path / 'mlruns'}", MLFLOW_ALLOW_FILE_STORE="true",
        MLFLOW_EXPERIMENT_NAME="issue18",
    )  # fmt: skip
    return env


def _largest_remainder(weights, total: int) -> list[int]:
    """The quota rule, in exact fractions (independent of loramoe_ds.data.mix)."""
    exact = [Fraction(total) * Fraction(w) / sum(Fraction(x) for x in weights) for w in weights]
    base = [int(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda d: (-(exact[d] - base[d]), d))
    for d in order[: total - sum(base)]:
        base[d] += 1
    return base


@pytest.fixture(scope="module")
def mix_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mix")
    (tmp / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    (tmp / "sharegpt.json").write_text(json.dumps(SHAREGPT))
    (tmp / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["data"] = {
        "max_length": 160,
        "datasets": [
            {"path": str(tmp / "chat.jsonl"), "task_type": "knowledge", "weight": WEIGHTS[0]},
            {"path": str(tmp / "sharegpt.json"), "format": "sharegpt", "task_type": 0,
             "weight": WEIGHTS[1]},
            {"path": str(tmp / "alpaca.jsonl"), "task_type": 1, "weight": WEIGHTS[2]},
        ],
    }  # fmt: skip
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp / "out"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "launcher" / "train.py"), "--config", str(tmp / "run.yaml"),
           "--deepspeed", str(ROOT / "ds_configs" / "zero3_cpu.json"),
           "train.micro_batch_size=2", f"train.max_steps={STEPS}", "output.save_every=0",
           f"output.dir={out}", "output.report_to=[csv,tensorboard,mlflow,wandb]"]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=400)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    return tmp, out, log


@pytest.mark.distributed
def test_mix_trains_and_logs_every_step(mix_run, monkeypatch):
    tmp, out, log = mix_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the store back
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert torch.isfinite(torch.tensor(float(r["loss"])))
        assert float(r["label_tokens"]) > 0
    # only rank 0 reported: one mlflow run holding the CSV's values, one wandb run
    (run,) = mlflow_runs(f"file:{tmp / 'mlruns'}").values()
    assert sorted(run) == list(range(1, STEPS + 1))
    for r in rows:
        assert run[int(r["step"])]["train/loss"] == pytest.approx(float(r["loss"]), rel=1e-6)
    assert len(list(out.glob("wandb/offline-run-*/run-*.wandb"))) == 1
    assert list((out / "tb").iterdir())


@pytest.mark.distributed
def test_run_log_gives_each_datasets_records_tokens_and_share(mix_run):
    import datasets

    tmp, out, log = mix_run
    (cache,) = (out / "cache" / "data").glob("*/dataset")
    ds = datasets.load_from_disk(str(cache))
    src = ds["source"]
    (line,) = [x for x in log.splitlines() if x.startswith("[data]")]  # rank 0 only
    files = ("chat.jsonl", "sharegpt.json", "alpaca.jsonl")
    quotas = _largest_remainder(WEIGHTS, len(ds))
    assert len(ds) == 24 and quotas == [11, 5, 8]
    for d, (name, n, q) in enumerate(zip(files, (6, 10, 8), quotas)):
        tokens = sum(len(ids) for ids, s in zip(ds["input_ids"], src) if s == d)
        want = f"{name}: {n} records, {tokens} tokens, share {100 * q / 24:.1f}%"
        assert want in line, (want, line)
    assert "read 24 records, kept 24, skipped 0 bad, truncated 0" in line, line


@pytest.mark.distributed
def test_dataset_task_types_and_every_assistant_turn_are_labelled(mix_run):
    import datasets

    _, out, _ = mix_run
    (cache,) = (out / "cache" / "data").glob("*/dataset")
    ds = datasets.load_from_disk(str(cache))
    by_source: dict[int, list] = {0: [], 1: [], 2: []}
    for s, tt, spans in zip(ds["source"], ds["task_type"], ds["label_spans"]):
        by_source[s].append((tt, len(spans) // 2))
    assert by_source[0] == [(1, 2)] * 6  # knowledge; both assistant turns carry the loss
    assert by_source[1] == [(0, 1)] * 10
    # a record's own task_type wins over the dataset's
    assert [tt for tt, _ in by_source[2]] == [0 if i % 2 == 0 else 1 for i in range(8)]


@pytest.mark.distributed
def test_mix_adapter_is_exported_and_loads_without_deepspeed(mix_run):
    from loramoe_ds import load_adapter
    from loramoe_ds.base_model import from_config, hf_config
    from loramoe_ds.config import load_run_config

    tmp, out, _ = mix_run
    run = load_run_config(tmp / "run.yaml")
    cfg, _ = hf_config(run)
    model = load_adapter(from_config(cfg), out / "adapter")
    assert model.total_experts() == 4 * 3 * 4  # tiny.yaml: 4 layers x 3 targets x 4 experts
    trained = sum(p.abs().sum().item() for n, p in model.adapter_named_parameters()
                  if "lora_B" in n)  # fmt: skip
    assert trained > 0
