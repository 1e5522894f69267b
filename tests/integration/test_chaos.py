"""The CI-sized chaos run: faults injected into a whole 2-rank run, nothing lost or repeated.

``bench/chaos.py`` (the longer run and its figures: docs/reliability.md) trains
the tiny model for 25 steps, checkpointing every 5, with 2 faults at seeded
random points -- a SIGSTOPped rank (the other must exit 76 within
``parallel.timeout_s``), and a node loss (both ranks SIGKILLed) followed by a
damaged newest checkpoint -- relaunching the same command after each. The final
adapter, the final Adam moments and step counts, and every row of
``metrics.csv`` (each step exactly once) must equal an uninterrupted run's, bit
for bit. Sized for CI: each launch costs about a minute of start-up on 2 cores;
the kill mid-save, the preemption and the full disk are in the longer run and in
tests/distributed/test_checkpoint.py and tests/unit/test_checkpoint_integrity.py.
"""

from __future__ import annotations

import json

import chaos
import pytest


@pytest.mark.distributed
def test_faults_change_nothing(tmp_path):
    report_file = tmp_path / "report.json"
    args = ["--steps", "25", "--save-every", "5", "--faults", "2", "--seed", "1",
            "--kinds", "stop_rank,corrupt", "--timeout-s", "5",
            "--out", str(tmp_path / "chaos"), "--json", str(report_file)]  # fmt: skip
    code = chaos.main(args)
    report = json.loads(report_file.read_text())
    summary = {k: v for k, v in report.items() if k != "events"}
    assert code == 0, json.dumps(report, indent=1)[-4000:]
    assert report["faults_by_kind"] == {"stop_rank": 1, "corrupt": 1}, summary
    assert report["every_step_once"] and report["metrics_rows"] == 25
    assert report["adapter_max_abs_diff"] == 0.0 and report["adam_moments_max_abs_diff"] == 0.0
    assert report["metrics_max_abs_diff"] == 0.0 and report["adam_steps_equal"]
    events = report["events"]
    assert all(e["as_expected"] for e in events), events
    stop = next(e for e in events if e["kind"] == "stop_rank")
    assert stop["noticed_after_s"] < 5 + 60, stop  # parallel.timeout_s plus slack
    assert "a peer rank died or stopped answering" in stop["message"]
    damaged = [e for e in events if e.get("skipped_damaged")]
    assert len(damaged) == 1 and "skipping damaged checkpoint" in damaged[0]["skipped_damaged"][0]
