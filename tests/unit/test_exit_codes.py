"""Exit codes: one table in ``loramoe_ds/launch/exit_codes.py``, the same in the sbatch
script, the README and docs; a dead peer's error becomes one line naming the phase."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch.distributed as dist

from loramoe_ds.launch import exit_codes as X
from loramoe_ds.launch.preempt import REQUEUE_EXIT_CODE

ROOT = Path(__file__).resolve().parents[2]


def test_sbatch_requeues_exactly_on_preempted_and_peer_lost():
    text = (ROOT / "slurm" / "train.sbatch").read_text()
    assert REQUEUE_EXIT_CODE == X.PREEMPTED
    assert f"REQUEUE_EXIT_CODE={X.PREEMPTED}\n" in text
    assert f"PEER_LOST_EXIT_CODE={X.PEER_LOST}\n" in text
    cond = next(ln for ln in text.splitlines() if ln.startswith("if ((rc == REQUEUE_EXIT_CODE"))
    assert set(re.findall(r"rc == (\w+)", cond)) == {"REQUEUE_EXIT_CODE", "PEER_LOST_EXIT_CODE"}
    assert X.REQUEUE == (X.PREEMPTED, X.PEER_LOST)


@pytest.mark.parametrize("doc", ["README.md", "docs/reliability.md"])
def test_docs_list_every_exit_code(doc):
    text = (ROOT / doc).read_text()
    for code in (X.BAD_INPUT, X.NONFINITE, X.SAVE_FAILED, X.PREEMPTED, X.PEER_LOST):
        assert f"| {code} " in text, (doc, code)


def test_peer_failures_become_one_line_naming_the_phase():
    msg = (
        "[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1234: Connection reset "
        "by peer.\nmore detail"
    )
    with pytest.raises(X.PeerLostError) as e, X.collective_phase("optimizer step 17"):
        raise RuntimeError(msg)
    text = str(e.value)
    assert text.startswith("optimizer step 17: a peer rank died or stopped answering (")
    assert "127.0.0.1]:1234" in text and "\n" not in text
    with pytest.raises(X.PeerLostError, match="checkpoint save at step 4: .*Timed out"):
        with X.collective_phase("checkpoint save at step 4"):
            raise RuntimeError("[gloo] Timed out waiting 15000ms for recv operation to complete")
    with pytest.raises(X.PeerLostError), X.collective_phase("x"):
        raise dist.DistBackendError("NCCL watchdog")
    with pytest.raises(KeyError), X.collective_phase("x"):  # a bug stays a bug
        raise KeyError("global_step")
    with pytest.raises(RuntimeError, match="shape mismatch"), X.collective_phase("x"):
        raise RuntimeError("shape mismatch")
