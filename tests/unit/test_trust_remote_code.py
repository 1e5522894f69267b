"""A model directory's own Python code never runs unless ``model.trust_remote_code`` says so.

The directory's ``config.json`` names a config class in its own ``configuration_evil.py``
(``auto_map``), whose import writes a marker file. With the default the plan
refuses it in one line naming the field and the marker is never written; with
``model.trust_remote_code=true`` transformers runs it (so the test's code is real).
"""

from __future__ import annotations

import json
import sys

import pytest

from loramoe_ds.base_model import hf_config
from loramoe_ds.config import load_run_config


@pytest.fixture
def evil_dir(tmp_path):
    d = tmp_path / "evil-model"
    d.mkdir()
    marker = tmp_path / "ran.txt"
    (d / "configuration_evil.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n"
        "    model_type = 'evil'\n"
    )
    (d / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"},
                "architectures": ["EvilForCausalLM"],
            }
        )
    )
    return d, marker


def test_default_refuses_code_in_the_model_directory(evil_dir, monkeypatch):
    d, marker = evil_dir
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = load_run_config(None, [f"model.name={d}"])
    assert run.model.trust_remote_code is False
    with pytest.raises(ValueError) as e:
        hf_config(run)
    msg = str(e.value)
    assert msg.startswith(f"model.name={str(d)!r}") and "\n" not in msg
    assert "trust_remote_code" in msg
    assert not marker.exists()


def test_trust_remote_code_true_is_passed_through(evil_dir, monkeypatch):
    d, marker = evil_dir
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    run = load_run_config(None, [f"model.name={d}", "model.trust_remote_code=true"])
    cfg, _ = hf_config(run)
    assert type(cfg).__name__ == "EvilConfig" and marker.read_text() == "ran"


def test_trust_remote_code_must_be_a_bool():
    with pytest.raises(ValueError, match="model.trust_remote_code"):
        load_run_config(None, ["model.trust_remote_code=maybe"])
