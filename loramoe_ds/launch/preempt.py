"""Graceful preemption: turn SIGUSR1/SIGTERM into "checkpoint at the next step, then exit".

Slurm warns a job before its time limit with the signal named in
``#SBATCH --signal=B:USR1@<seconds>`` (``slurm/train.sbatch`` forwards it from the
batch shell to every task) and sends SIGTERM to every task on ``scancel``,
preemption or the time limit itself (then SIGKILL after ``KillWait``, 30 s by
default). The signal handler only sets a flag -- no I/O, no collectives, nothing
that could deadlock if it interrupts NCCL or a checkpoint write. The training loop
polls at step boundaries::

    handler = PreemptionHandler().install()
    for step in range(start, total):
        train_step()
        if handler.poll(step, every=10):         # collective: all ranks call it
            engine.save_checkpoint(ckpt_dir)     # ends with a barrier
            raise SystemExit(REQUEUE_EXIT_CODE)  # the sbatch script requeues

Only some ranks may see the signal (a node's tasks get it at slightly different
times, or only one node is preempted), so the decision must be agreed on:
:meth:`PreemptionHandler.any_rank_should_stop` does an ``all_reduce(MAX)`` of one
int. Cost: a latency-bound collective (tens of microseconds over NVLink/IB, about
0.1-1 ms over TCP/gloo) plus, on GPUs, a device->host sync that stops the CPU
from queueing the next step's kernels ahead of the GPU. At typical step times
(0.1-10 s) every step is < 1 %; with very short steps use ``poll(step, every=N)``
so the check runs every N steps -- the warning lead time must then exceed N steps
plus a checkpoint save.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

import torch

from loramoe_ds.launch.exit_codes import PREEMPTED

REQUEUE_EXIT_CODE = PREEMPTED
"""Exit status meaning "checkpointed after a preemption signal, please requeue"
(``EX_TEMPFAIL`` from sysexits.h). ``slurm/train.sbatch`` requeues the job when the
step ends with it; keep the two in sync (a test checks)."""

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionHandler:
    """Flag-setting handler for preemption signals, with a cross-rank agreement.

    Args:
        signals: Signals to catch; SIGUSR1 (Slurm's warning) and SIGTERM
            (scancel / preemption / time limit) by default.
    """

    def __init__(self, signals: Iterable[signal.Signals] = DEFAULT_SIGNALS) -> None:
        self.signals = tuple(signals)
        self._event = threading.Event()
        self._received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    # -- installation -----------------------------------------------------------------

    def install(self) -> PreemptionHandler:
        """Install the handlers (main thread only). Returns ``self`` for chaining.

        Raises:
            ValueError: When called from a thread other than the main thread
                (Python only delivers signals there).
        """
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("PreemptionHandler.install() must be called from the main thread")
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were in place before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Async-signal context: set the flag and return; the loop does the work.
        self._received = signal.Signals(signum)
        self._event.set()

    # -- queries ----------------------------------------------------------------------

    @property
    def received(self) -> signal.Signals | None:
        """The last signal caught, or ``None``."""
        return self._received

    def should_stop(self) -> bool:
        """This rank's flag: True once a preemption signal arrived here. No communication."""
        return self._event.is_set()

    def request_stop(self) -> None:
        """Set the flag programmatically (tests, or a trainer-side wall-clock budget)."""
        self._event.set()

    def any_rank_should_stop(self, group: Any = None) -> bool:
        """True on every rank if any rank of ``group`` caught a signal.

        A collective (``all_reduce`` with ``MAX`` of a single int32): every rank of
        ``group`` must call it at the same step. Without an initialised process
        group it returns :meth:`should_stop`.

        Args:
            group: Process group; the default (world) group when ``None``.

        Returns:
            The agreed decision, identical on all ranks.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return self.should_stop()
        backend = str(dist.get_backend(group))
        if "nccl" in backend and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        flag = torch.tensor([int(self.should_stop())], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        stop = bool(flag.item())
        if stop:
            self._event.set()  # Keep local state in line with the agreement.
        return stop

    def poll(self, step: int, every: int = 1, group: Any = None) -> bool:
        """Agreed stop decision every ``every`` steps; False on the other steps.

        Args:
            step: The step just completed (same value on all ranks).
            every: Check interval; 1 checks each step.
            group: Process group for the agreement.

        Raises:
            ValueError: When ``every < 1``.
        """
        if every < 1:
            raise ValueError(f"every={every} must be >= 1")
        if step % every:
            return False
        return self.any_rank_should_stop(group)


__all__ = ["DEFAULT_SIGNALS", "REQUEUE_EXIT_CODE", "PreemptionHandler"]
