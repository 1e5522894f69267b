"""What ``launcher/train.py``'s exit status tells a requeue script, and the errors behind it.

============  ======================================================  =========
exit status   meaning                                                 requeue?
============  ======================================================  =========
0             finished: the adapter is exported                       no
2             bad input: config, data record, damaged or refused      no
              checkpoint, model directory, a tracker of
              ``output.report_to`` that cannot start (one line,
              before work)
65            training diverged: ``train.nonfinite`` stopped the run  no
              (the last good checkpoint is kept)
74            a checkpoint could not be written (disk full,           no
              permission); the previous checkpoint is intact
75            preempted: checkpointed after SIGUSR1/SIGTERM           yes
76            a peer rank died or stopped answering inside a          yes
              collective (``parallel.timeout_s``); the phase is named
1             anything else (a bug: a traceback is printed)           no
============  ======================================================  =========

``slurm/train.sbatch`` requeues on 75 and 76 (a test keeps the two in sync).
Values follow sysexits.h where one fits (``EX_DATAERR`` 65, ``EX_IOERR`` 74,
``EX_TEMPFAIL`` 75, ``EX_PROTOCOL`` 76).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

OK = 0
BAD_INPUT = 2
NONFINITE = 65
SAVE_FAILED = 74
PREEMPTED = 75
PEER_LOST = 76
REQUEUE = (PREEMPTED, PEER_LOST)
"""Exit statuses after which relaunching the same command continues the run."""


class PeerLostError(RuntimeError):
    """A collective failed because another rank died or stopped answering. One line."""


_PEER_SIGNS = (
    "timed out",
    "timeout",
    "connection closed",
    "connection reset",
    "broken pipe",
    "connection refused",
)


def is_peer_failure(exc: BaseException) -> bool:
    """True for the errors a collective raises when a peer is dead or silent."""
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in _PEER_SIGNS)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


@contextlib.contextmanager
def collective_phase(what: str) -> Iterator[None]:
    """Turn a collective's failure inside ``what`` into one :class:`PeerLostError` line.

    The message names the phase (``"optimizer step 17"``, ``"checkpoint save at
    step 20"``) and the backend's own first line, which names the peer when the
    backend knows it (gloo: its address; a timeout: the operation waited on).
    """
    try:
        yield
    except PeerLostError:
        raise
    except Exception as e:
        if not is_peer_failure(e):
            raise
        raise PeerLostError(
            f"{what}: a peer rank died or stopped answering ({_first_line(e)})"
        ) from None
