"""A real Slurm cluster for tests on this machine, all state under one scratch directory.

A minimal slurmctld + slurmd + munge setup (no systemd, no cgroups), with a
private ``munged`` (own key, socket and pid file under the scratch
dir, wired into Slurm with ``AuthInfo=socket=...``) and free TCP ports instead of
6817/6818, so that it cannot collide with anything else on the machine; and
``cred_expire=10`` so a requeued job may start again after 10 s (default 120 s). Needs root
and the Debian packages::

    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge libpmix-dev

``nodes=2`` starts two ``slurmd`` on this machine, nodes ``n1`` and ``n2``
(``NodeHostname=localhost``, each its own ``Port``, spool directory, pid and log
file via ``%n``), so a job really spans two Slurm nodes: two allocations, one
task launch per node, node-level drain/resume. Their processes share the
loopback interface, so clients pass ``LORAMOE_MASTER_ADDR=127.0.0.1`` to the
batch script (the node names do not resolve).

Every daemon is stopped through its pid file in :meth:`LocalSlurm.stop`, which
also runs when :meth:`LocalSlurm.start` fails half way. Use the ``slurm_cluster``
pytest fixture (module scope) or ``with LocalSlurm(tmpdir) as cluster: ...``.
Clients must run with ``cluster.env`` (it carries ``SLURM_CONF``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REQUIRED_BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "munged")
INSTALL_HINT = (
    "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge libpmix-dev"
)
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
    }
)

SLURM_CONF = """\
ClusterName=loramoetest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
MailProg=/bin/true
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
{node_lines}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
NODE_LINE = (
    "NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
    "RealMemory=4000 State=UNKNOWN"
)


def slurm_missing_reason() -> str | None:
    """Why a local Slurm cannot be started here, or ``None`` when it can."""
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None and not _sbin(b)]
    if missing:
        return f"Slurm not installed (missing {', '.join(missing)}); install with: {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd runs jobs as the submitting user)"
    return None


def _sbin(name: str) -> str | None:
    for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def _which(name: str) -> str:
    path = shutil.which(name) or _sbin(name)
    if path is None:
        raise RuntimeError(f"{name} not found; {INSTALL_HINT}")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalSlurm:
    """Controller + nodes (partition ``debug``) under ``root``.

    Args:
        root: Scratch directory for config, state, spool, logs and pid files.
        cpus: CPUs each node advertises (tasks per node the tests may ask for).
        nodes: 1: one node named ``localhost``; N > 1: nodes ``n1`` .. ``nN``,
            one ``slurmd`` each.
    """

    def __init__(self, root: Path, cpus: int = 2, nodes: int = 1) -> None:
        self.root = Path(root)
        self.cpus = cpus
        self.node_names = ["localhost"] if nodes == 1 else [f"n{i + 1}" for i in range(nodes)]
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for var in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
            if var != "SLURM_CONF":
                del self.env[var]  # never inherit an outer job's settings
        self._pid_files = {
            **{f"slurmd-{n}": self.root / f"slurmd-{n}.pid" for n in self.node_names},
            "slurmctld": self.root / "slurmctld.pid",
            "munged": self.root / "munge" / "munged.pid",
        }

    # -- lifecycle --------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> LocalSlurm:
        """Write the config, start munged, slurmctld and slurmd; wait for an idle node.

        Raises:
            RuntimeError: When a daemon does not come up; everything started is
                stopped first and the log tails are in the message.
        """
        try:
            self._start(timeout)
        except BaseException as err:
            logs = self.log_tails()
            self.stop()
            raise RuntimeError(f"local Slurm failed to start: {err}\n{logs}") from err
        return self

    def _start(self, timeout: float) -> None:
        munge_dir = self.root / "munge"
        spools = [self.root / "spool" / n for n in self.node_names]
        for d in (munge_dir, self.root / "state", *spools):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(munge_dir, 0o755)
        key = munge_dir / "munge.key"
        if shutil.which("mungekey") or _sbin("mungekey"):
            subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True)
        else:
            shutil.copy("/etc/munge/munge.key", key)
        os.chmod(key, 0o600)
        self.conf.write_text(
            SLURM_CONF.format(
                host=socket.gethostname().split(".")[0],
                root=self.root,
                ctld_port=_free_port(),
                slurmd_port=_free_port(),
                node_lines="\n".join(
                    NODE_LINE.format(name=n, port=_free_port(), cpus=self.cpus)
                    for n in self.node_names
                ),
                node_list=",".join(self.node_names),
            )
        )
        subprocess.run(
            [
                _which("munged"),
                "--force",
                f"--socket={munge_dir / 'munge.socket'}",
                f"--key-file={key}",
                f"--pid-file={self._pid_files['munged']}",
                f"--seed-file={munge_dir / 'munged.seed'}",
                f"--log-file={munge_dir / 'munged.log'}",
            ],
            check=True,
            env=self.env,
        )
        subprocess.run([_which("slurmctld")], check=True, env=self.env)
        self._wait(lambda: self._scontrol_ok(["ping"]), timeout, "slurmctld to answer ping")
        for n in self.node_names:
            subprocess.run([_which("slurmd"), "-N", n], check=True, env=self.env)
        for n in self.node_names:
            self._wait(lambda n=n: self._node_idle(n), timeout, f"node {n} to become IDLE")

    def stop(self) -> None:
        """Cancel all jobs, then stop slurmd, slurmctld and munged by pid file."""
        if self.conf.exists() and self._alive("slurmctld"):
            subprocess.run(
                [_which("scancel"), "--full", "--partition=debug"],
                env=self.env,
                capture_output=True,
                timeout=30,
            )
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self._jobs_running():
                time.sleep(0.5)
        for name in [*(f"slurmd-{n}" for n in self.node_names), "slurmctld", "munged"]:
            self._kill(name)

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients ----------------------------------------------------------------------

    def sbatch(self, args: list[str], env: dict[str, str] | None = None, cwd=None) -> int:
        """Submit with ``sbatch --parsable``; returns the job id."""
        out = subprocess.run(
            [_which("sbatch"), "--parsable", *args],
            env={**self.env, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {args} failed: {out.stderr}")
        return int(out.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (``JobState``, ``Restarts``, ``ExitCode``...)."""
        out = subprocess.run(
            [_which("scontrol"), "show", "job", "-o", str(job_id)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id}: {out.stderr}")
        return dict(re.findall(r"(\S+?)=(\S*)", out.stdout))

    def wait_for(self, job_id: int, predicate, timeout: float, what: str) -> dict[str, str]:
        """Poll ``job_info`` every 0.5 s until ``predicate(info)``; returns the info."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if predicate(info):
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id}: timed out after {timeout}s waiting for {what}: {info}")

    def wait_done(self, job_id: int, timeout: float = 300.0) -> dict[str, str]:
        """Wait for a terminal state (``COMPLETED``, ``FAILED``, ...); returns the info."""
        return self.wait_for(
            job_id, lambda i: i.get("JobState") in TERMINAL_STATES, timeout, "a terminal state"
        )

    def wait_requeued_done(self, job_id: int, timeout: float) -> dict[str, str]:
        """Wait until the job has been requeued at least once and then ended; returns the info."""
        return self.wait_for(
            job_id,
            lambda i: (
                i["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
                and int(i.get("Restarts", 0)) >= 1
            ),
            timeout=timeout,
            what="requeue and completion",
        )

    def scontrol(self, *args: str) -> str:
        """Run ``scontrol ARGS`` (e.g. ``update NodeName=n2 State=DRAIN Reason=x``); stdout."""
        res = subprocess.run(
            [_which("scontrol"), *args], env=self.env, capture_output=True, text=True, timeout=30
        )
        if res.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)}: {res.stderr}")
        return res.stdout

    def log_tails(self, lines: int = 15) -> str:
        """Last lines of the daemon logs, for failure messages."""
        parts = []
        slurmd_logs = [f"slurmd-{n}.log" for n in self.node_names]
        for name in ("slurmctld.log", *slurmd_logs, "munge/munged.log"):
            path = self.root / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(parts)

    # -- internals --------------------------------------------------------------------

    def _scontrol_ok(self, args: list[str]) -> bool:
        res = subprocess.run(
            [_which("scontrol"), *args], env=self.env, capture_output=True, text=True, timeout=30
        )
        return res.returncode == 0 and "DOWN" not in res.stdout

    def _node_idle(self, node: str = "localhost") -> bool:
        res = subprocess.run(
            [_which("scontrol"), "show", "node", "-o", node],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return res.returncode == 0 and re.search(r"State=IDLE\b", res.stdout) is not None

    def _jobs_running(self) -> bool:
        res = subprocess.run(
            [_which("scontrol"), "show", "job", "-o"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return bool(re.search(r"JobState=(RUNNING|COMPLETING|CONFIGURING)", res.stdout))

    def _wait(self, check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}")

    def _pid(self, name: str) -> int | None:
        try:
            return int(self._pid_files[name].read_text().strip())
        except (OSError, ValueError):
            return None

    def _alive(self, name: str) -> bool:
        pid = self._pid(name)
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _kill(self, name: str, grace: float = 10.0) -> None:
        pid = self._pid(name)
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def require_slurm() -> None:
    """Skip (or fail, with ``LORAMOE_REQUIRE_SLURM`` set) when Slurm cannot run here."""
    reason = slurm_missing_reason()
    if reason is None:
        return
    if os.environ.get("LORAMOE_REQUIRE_SLURM"):
        pytest.fail(f"LORAMOE_REQUIRE_SLURM is set but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    """A running local Slurm with nodes ``n1`` and ``n2``; stopped afterwards, even on failure."""
    require_slurm()
    root = Path(tmp_path_factory.mktemp("slurm2", numbered=True))
    cluster = LocalSlurm(root, cpus=max(2, os.cpu_count() or 2), nodes=2).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    """A running local Slurm for the module's tests; stopped afterwards, even on failure."""
    require_slurm()
    # A short root: slurmd puts unix sockets under SlurmdSpoolDir (108-byte limit).
    root = Path(tmp_path_factory.mktemp("slurm", numbered=True))
    cluster = LocalSlurm(root, cpus=max(2, os.cpu_count() or 2)).start()
    try:
        yield cluster
    finally:
        cluster.stop()
