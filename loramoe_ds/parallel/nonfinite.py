"""Non-finite steps: found on any rank, dropped on every rank together (collective).

A step is *non-finite* when, on any rank, a micro-batch's LM loss, one of its aux
losses, its total loss, or a local adapter gradient (after the synchronisation,
before the clip) is NaN or infinite. Each rank names its first such term in
:data:`TERMS` order; one ``all_reduce(MIN)`` of that index gives every rank the
same verdict and the same name (the earliest term of the order that failed
anywhere), so all ranks drop the step together or none does.

Dropping a step (:func:`drop_update`) is DeepSpeed's own "skipped step" (its
fp16-overflow path): the gradients are discarded, neither optimizer steps (the
Adam moments and step counts are untouched), the LR schedule does **not**
advance, ``engine.skipped_steps`` and ``engine.global_steps`` both count it. So
a run that skipped step k continues exactly as a run that never saw step k's
batch, with its step counter one ahead (tested in
``tests/distributed/test_nonfinite.py``). The run loop
(:mod:`loramoe_ds.run`) counts skipped steps, logs them (the ``skipped_steps``
column) and, with ``train.nonfinite: stop``, ends the run at the
``train.nonfinite_patience``-th non-finite step in a row (:class:`NonFiniteStopError`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

TERMS = (
    ("lm_loss", "lm_loss_sum"),
    ("lbc", "lbc_loss"),
    ("sup", "router_supervision_loss"),
    ("lb", "load_balance_loss"),
    ("z", "z_loss"),
    ("loss", "loss"),
    ("grad", None),
)
"""``(name, LoRAMoEOutput attribute)`` in the order a step computes them; ``grad``:
an adapter gradient."""


class NonFiniteStopError(RuntimeError):
    """``train.nonfinite: stop`` ended the run. One line naming the step and the term."""


def _all_finite(xs, device: torch.device) -> torch.Tensor:
    """0-dim bool tensor on ``device``: every value of ``xs`` is finite (no host sync)."""
    ok = torch.ones((), dtype=torch.bool, device=device)
    for x in xs:
        if x is None:
            continue
        x = x.detach() if torch.is_tensor(x) else torch.tensor(float(x))
        ok = ok & torch.isfinite(x).all().to(device)
    return ok


def _local_grads(trainer) -> list[torch.Tensor]:
    """This rank's adapter gradients: ZeRO's local partitions and the EP shards."""
    from deepspeed.utils import safe_get_local_grad

    grads = []
    for p in trainer.layout.engine_params().values():
        try:
            g = safe_get_local_grad(p)
        except (AttributeError, AssertionError, RuntimeError):
            g = p.grad
        if g is not None:
            grads.append(g)
    grads += [p.grad for p in trainer.expert_params() if p.grad is not None]
    return grads


def first_nonfinite(trainer, outputs) -> str | None:
    """Name of the first non-finite term of the step on *any* rank (collective), or None.

    One all-reduce and one device-to-host read per step, whatever the number of
    terms and tensors.
    """
    device = trainer.device

    def values(attr):
        return _local_grads(trainer) if attr is None else [getattr(o, attr, None) for o in outputs]

    ok = torch.stack([_all_finite(values(attr), device) for _, attr in TERMS])
    order = torch.arange(len(TERMS), device=device)
    bad = torch.where(ok, len(TERMS), order).min().to(torch.int64).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MIN)
    i = int(bad.item())
    return TERMS[i][0] if i < len(TERMS) else None


def drop_update(trainer) -> None:
    """Finish the step without an update (every rank; the engine is at the boundary).

    ``engine.step()`` runs with the optimizer's update replaced by DeepSpeed's
    overflow outcome: gradients cleared, ``skipped_steps`` and ``global_steps``
    counted, LR schedule not stepped. The expert shards' gradients are cleared.
    """
    e = trainer.engine
    opt = e.optimizer
    had_overflow = "overflow" in vars(opt)
    overflow_before = getattr(opt, "overflow", None)

    def skipped_update(*args, **kwargs):
        opt.zero_grad(set_to_none=True)
        if hasattr(opt, "averaged_gradients"):  # ZeRO-3: what its overflow path clears
            opt.averaged_gradients = {}
        opt.overflow = True

    opt.step = skipped_update
    try:
        e.step()
    finally:
        del opt.step
        if had_overflow:
            opt.overflow = overflow_before
        else:
            vars(opt).pop("overflow", None)
    if trainer.expert_optimizer is not None:
        trainer.expert_optimizer.drop()


class NonFiniteStreak:
    """The run loop's count of dropped steps and the ``train.nonfinite`` stop rule.

    Args:
        mode: ``train.nonfinite`` (``stop`` or ``skip``).
        patience: ``train.nonfinite_patience``: the non-finite step in a row that
            ends a ``stop`` run.
        skipped: Dropped steps so far (``engine.skipped_steps`` after a resume).
    """

    def __init__(self, mode: str, patience: int, skipped: int = 0):
        self.mode, self.patience = mode, patience
        self.skipped, self.in_a_row = skipped, 0
        self.first: tuple[int, str] | None = None

    def update(self, step: int, term: str | None) -> int:
        """Record optimizer step ``step`` (``term``: its non-finite term or None); the count."""
        if term is None:
            self.in_a_row, self.first = 0, None
            return self.skipped
        self.skipped += 1
        self.in_a_row += 1
        if self.first is None:
            self.first = (step, term)
        return self.skipped

    def check(self, step: int, ckpt_dir) -> None:
        """Raise :class:`NonFiniteStopError` when a ``stop`` run reached its patience.

        Raises:
            NonFiniteStopError: Naming the first step of the streak, its term and the
                checkpoint a relaunch would resume from.
        """
        if self.mode != "stop" or self.in_a_row < self.patience:
            return
        from loramoe_ds.parallel.checkpoint import latest_tag

        first_step, term = self.first
        kept = latest_tag(ckpt_dir)
        raise NonFiniteStopError(
            f"step {first_step}: {term} went non-finite first ({self.in_a_row} non-finite "
            f"step(s) in a row up to step {step}, train.nonfinite_patience="
            f"{self.patience}); nothing was updated by them; the last good checkpoint is "
            f"{Path(ckpt_dir) / kept if kept else 'none'}"
        )
