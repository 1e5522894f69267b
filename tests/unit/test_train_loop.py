"""The training loop's parts: step grouping, checkpoint policy, metric reduction, CSV sink."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch

from loramoe_ds.train_loop.logger import MetricsLogger
from loramoe_ds.train_loop.policy import CheckpointPolicy
from loramoe_ds.train_loop.step_batches import step_batches
from loramoe_ds.train_loop.step_metrics import STEP_METRICS, Metric, csv_fields, reduce_step


class _Epochs:
    """A loader whose each iteration is one epoch of ``n`` batches, resumable at ``pos``."""

    def __init__(self, n: int, pos: int = 0):
        self.n, self.pos, self.epoch = n, pos, 0

    def __iter__(self):
        while self.pos < self.n:
            self.pos += 1
            yield (self.epoch, self.pos - 1)
        self.epoch, self.pos = self.epoch + 1, 0


def test_steps_group_gas_batches_across_epochs():
    steps = step_batches(_Epochs(3), gas=2)
    got = [next(steps) for _ in range(4)]
    assert got == [[(0, 0), (0, 1)], [(0, 2), (1, 0)], [(1, 1), (1, 2)], [(2, 0), (2, 1)]]


def test_steps_resume_at_the_end_of_an_epoch_and_refuse_empty_data():
    steps = step_batches(_Epochs(2, pos=2), gas=1)  # resumed exactly at an epoch end
    assert [next(steps) for _ in range(2)] == [[(1, 0)], [(1, 1)]]
    with pytest.raises(ValueError, match="no batch"):
        next(step_batches(_Epochs(0), gas=1))


def test_policy_saves_periodically_at_the_end_and_on_preemption():
    p = CheckpointPolicy(max_steps=6, save_every=4, keep=2, stop_after=None)
    rows = [p.decide(s, s, False) for s in range(1, 7)]
    assert [s for s, d in enumerate(rows, 1) if d.save] == [4, 6]
    assert [s for s, d in enumerate(rows, 1) if d.stop] == [6]
    assert not rows[-1].preempted  # the run is finished: export, exit 0
    d = p.decide(2, 2, True)
    assert (d.save, d.stop, d.preempted) == (True, True, True)
    q = CheckpointPolicy(max_steps=6, save_every=0, stop_after=2)
    assert q.decide(3, 1, False) == q.decide(1, 1, False) and not q.decide(3, 1, False).save
    d = q.decide(5, 2, False)  # resumed at 3: the second step of this invocation
    assert (d.save, d.stop, d.preempted) == (True, True, True)
    with pytest.raises(ValueError, match="save_every"):
        CheckpointPolicy(max_steps=1, save_every=-1)


def test_policy_prunes_to_the_newest_k_by_step_number(tmp_path):
    for s in (2, 9, 10, 100):
        (tmp_path / f"global_step{s}").mkdir()
    (tmp_path / "latest").write_text("global_step100")
    removed = CheckpointPolicy(max_steps=100, keep=2).prune(tmp_path)
    assert sorted(p.name for p in removed) == ["global_step2", "global_step9"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "global_step10", "global_step100", "latest"]  # fmt: skip
    assert CheckpointPolicy(max_steps=100, keep=0).prune(tmp_path) == []


def _out(lm_sum, n, loss, lbc, lb, z, sup=0.0):
    t = torch.tensor
    return SimpleNamespace(lm_loss_sum=t(lm_sum), num_label_tokens=n, loss=t(loss),
                           lbc_loss=t(lbc), load_balance_loss=t(lb), z_loss=t(z),
                           router_supervision_loss=t(sup))  # fmt: skip


def _batch(mask_rows):
    mask = torch.tensor(mask_rows)
    return {"input_ids": torch.zeros_like(mask), "attention_mask": mask}


def test_reduce_step_token_mean_and_micro_means_in_one_process():
    outs = [_out(6.0, 2, 3.5, 0.2, 1.0, 10.0, 0.6), _out(30.0, 10, 3.1, 0.4, 3.0, 20.0, 0.2)]
    batches = [_batch([[1, 1, 1], [1, 0, 0]]), _batch([[1, 1, 1, 1], [1, 1, 1, 1]])]
    row = reduce_step(outs, batches)
    assert row["lm_loss"] == pytest.approx(36.0 / 12)  # token mean, not (3 + 3) / 2
    assert row["loss"] == pytest.approx(3.3)
    assert (row["lbc"], row["lb"], row["z"]) == pytest.approx((0.3, 2.0, 15.0))
    assert row["sup"] == pytest.approx(0.4)
    assert row["tokens"] == 12 and row["label_tokens"] == 12
    assert row["pad_frac"] == pytest.approx(2 / 14)


def test_packed_batches_count_real_tokens_by_record_id():
    seq = torch.tensor([[0, 0, 1, 1, -1], [0, 0, 0, -1, -1]])
    b = {"input_ids": torch.zeros_like(seq), "attention_mask": torch.ones_like(seq), "seq_ids": seq}
    row = reduce_step([_out(1.0, 1, 1.0, 0.0, 0.0, 0.0)], [b])
    assert row["tokens"] == 7 and row["pad_frac"] == pytest.approx(3 / 10)


def test_one_metric_is_one_line(tmp_path):
    """A new metric reaches the reduction, the CSV header and the bar from its entry alone."""
    extra = Metric("records", lambda o, b: b["input_ids"].shape[0], "sum", bar="rec", fmt=".0f")
    schema = (*STEP_METRICS, extra)
    row = reduce_step([_out(1.0, 1, 1.0, 0.0, 0.0, 0.0)], [_batch([[1, 1], [1, 1]])], schema)
    assert row["records"] == 2
    fields = csv_fields(schema)
    assert fields[0] == "step" and "records" in fields and "lm_loss" in fields
    log = MetricsLogger(tmp_path, fields=fields)
    log.log(1, {**row, "lr": 0.1})
    log.close()
    with open(tmp_path / "metrics.csv") as f:
        (r,) = list(csv.DictReader(f))
    assert float(r["records"]) == 2 and float(r["lr"]) == 0.1


def test_resumed_csv_keeps_its_header(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,loss\n1,2.0\n")
    log = MetricsLogger(tmp_path)
    log.log(2, {"loss": 1.5, "lm_loss": 1.0})
    log.close()
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["step,loss", "1,2.0", "2,1.5"]
