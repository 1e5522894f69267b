"""bench/specialisation.py: the separation arithmetic and a --quick run of both variants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import specialisation as sp

ROOT = Path(__file__).resolve().parents[2]


def test_separation_is_layer_mean_of_share_differences():
    trace = {
        "knowledge": [[0.5, 0.5, 0.5], [0.6, 0.56, 0.52]],
        "downstream": [[0.5, 0.5, 0.5], [0.4, 0.5, 0.55]],
    }
    assert sp.separation(trace) == pytest.approx([0.0, (0.2 + 0.06 - 0.03) / 3])


def test_quick_run_records_both_variants(tmp_path):
    out = tmp_path / "sp"
    assert sp.main(["--quick", "--out", str(out)]) == 0
    runs = {v: json.loads((out / f"{v}.json").read_text()) for v in sp.VARIANTS}
    for v, r in runs.items():
        tr = r["trace"]
        assert r["variant"] == v and tr["step"] == [0, 3, 6]
        assert len(tr["knowledge"]) == len(tr["downstream"]) == 3
        assert all(0.0 < s < 1.0 for row in tr["knowledge"] + tr["downstream"] for s in row)
        assert r["separation"] == pytest.approx(sp.separation(tr))
    # same seed and init: identical shares before the first update, different after
    a, b = runs["intended"]["trace"], runs["published"]["trace"]
    assert a["knowledge"][0] == b["knowledge"][0]
    assert a["knowledge"][-1] != b["knowledge"][-1]
    assert (out / "specialisation.png").is_file() and (out / "table.md").is_file()
