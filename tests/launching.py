"""Starting the processes of a multi-rank test: free ports, one launcher for all tests.

:func:`free_port` gives a TCP port nobody listens on (the rendezvous of a test
never collides with another test or a benchmark running beside it);
:func:`start_ranks` starts one process per command (rank, or node launcher);
:func:`launch_ranks` also waits for all of them with a timeout, kills any that
are left and returns each exit code with its output.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(
    cmds: Sequence[Sequence[str]],
    envs: Sequence[dict[str, str]],
    cwd: str | Path | None = None,
    logs: Sequence[Path] | None = None,
) -> list[subprocess.Popen]:
    """Start one process per command; stdout+stderr go to ``logs[i]`` (else a pipe)."""
    procs = []
    for i, (cmd, env) in enumerate(zip(cmds, envs, strict=True)):
        out = open(logs[i], "w") if logs is not None else subprocess.PIPE  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                list(cmd), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
            )
        )
        if logs is not None:
            out.close()  # the child holds its own descriptor
    return procs


def launch_ranks(
    cmds: Sequence[Sequence[str]],
    envs: Sequence[dict[str, str]],
    timeout: float,
    cwd: str | Path | None = None,
    logs: Sequence[Path] | None = None,
) -> list[tuple[int, str]]:
    """Run one process per command at once; ``(exit code, output)`` of each.

    Args:
        cmds: The command of each process.
        envs: The environment of each process.
        timeout: Seconds to wait for all of them; the ones still running are
            killed and ``subprocess.TimeoutExpired`` propagates.
        cwd: Working directory.
        logs: Files for each process's stdout+stderr (default: captured in memory).
    """
    procs = start_ranks(cmds, envs, cwd, logs)
    try:
        if logs is None:
            texts = [p.communicate(timeout=timeout)[0] for p in procs]
        else:
            for p in procs:
                p.wait(timeout=timeout)
            texts = [Path(f).read_text() for f in logs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, t) for p, t in zip(procs, texts)]
