"""Map whatever launched this process onto the ``env://`` variables DeepSpeed reads.

Length: one detection order over three launcher conventions (``env://``, Slurm,
MPI), each reader with its validation and the private helpers they share (host
lists, tasks per node, ports); they stay together in this file.

``deepspeed.init_distributed()`` (and ``torch.distributed`` with ``env://``) reads
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` and
nothing else: it never looks at ``SLURM_*``, and its own MPI discovery puts
``MASTER_ADDR`` on ``hostname -I``. Under ``srun -n2 python train.py`` without a
mapping every task believes it is rank 0 of 1. :func:`resolve_dist_env` reads one
of the launcher conventions below, validates it, and :func:`apply_dist_env` writes
the ``env://`` variables back so the rest of the program sees a single convention.

Detection order (the first match wins):

1. ``deepspeed`` / ``torchrun`` (or any ``env://`` launcher): ``RANK`` and
   ``WORLD_SIZE`` are set. ``LOCAL_RANK`` is required. The DeepSpeed launcher also
   sets ``LOCAL_SIZE``, ``CROSS_RANK`` (node rank) and ``CROSS_SIZE`` (nodes);
   torchrun sets ``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` and ``GROUP_WORLD_SIZE``.
   This comes first so that a launcher started *by* srun or mpirun (one launcher
   per node) wins over the outer per-node task variables.
2. ``slurm``: inside an ``srun`` step (``SLURM_STEP_ID`` or ``SLURM_STEPID`` set)
   with ``SLURM_PROCID``: rank ``SLURM_PROCID``, world ``SLURM_STEP_NUM_TASKS``
   (else ``SLURM_NTASKS``), local rank ``SLURM_LOCALID``, node ``SLURM_NODEID`` of
   ``SLURM_STEP_NUM_NODES`` (else ``SLURM_NNODES``), tasks on this node from
   ``SLURM_STEP_TASKS_PER_NODE`` (else ``SLURM_TASKS_PER_NODE``, e.g. ``2(x3),1``).
   ``MASTER_ADDR`` defaults to the first host of ``SLURM_STEP_NODELIST`` (else
   ``SLURM_JOB_NODELIST``) via ``scontrol show hostnames``, and ``MASTER_PORT`` to
   ``10000 + SLURM_JOB_ID % 50000`` (stable across requeues, distinct across
   jobs sharing a node). The batch script itself (no step) is *not* a rank: a
   plain ``python train.py`` there is a single process, even in a 2-task job.
3. ``mpi``: Open MPI (``OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE``) or a
   PMI launcher such as MPICH/Intel MPI (``PMI_RANK/PMI_SIZE``, ``MPI_LOCALRANKID``
   / ``MPI_LOCALNRANKS``). The node rank is ``rank // local_size`` (by-slot
   placement, the mpirun default). With one node ``MASTER_ADDR`` is
   ``127.0.0.1``; with several, rank 0's host is broadcast with mpi4py unless
   ``MASTER_ADDR`` is exported (``mpirun -x MASTER_ADDR=...``).
4. ``single``: none of the above; rank 0 of 1 on ``127.0.0.1`` and a free port.

Explicit ``MASTER_ADDR`` / ``MASTER_PORT`` in the environment always win.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

LAUNCHERS = ("deepspeed", "torchrun", "slurm", "mpi", "single")
DEFAULT_MASTER_PORT = 29500
LAUNCHER_ENV_VAR = "LORAMOE_DIST_LAUNCHER"
"""Set by :func:`apply_dist_env` so that resolving again reports the original launcher."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. Validated in ``__post_init__``."""

    rank: int
    """Global rank, ``0 <= rank < world_size``."""

    world_size: int
    """Number of processes in the job."""

    local_rank: int
    """Rank among the processes on this node (selects the GPU)."""

    local_world_size: int
    """Processes on this node."""

    node_rank: int
    """Index of this node, ``0 <= node_rank < num_nodes``; node 0 hosts rank 0."""

    num_nodes: int
    """Nodes in the job."""

    master_addr: str
    """Host of rank 0, where the TCP store listens."""

    master_port: int
    """Port of the TCP store on ``master_addr``."""

    launcher: str
    """Which convention was detected: one of :data:`LAUNCHERS`."""

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher={self.launcher!r} is not one of {LAUNCHERS}")
        checks = [
            (self.world_size >= 1, f"world_size={self.world_size} must be >= 1"),
            (
                0 <= self.rank < self.world_size,
                f"rank={self.rank} must be in [0, world_size={self.world_size})",
            ),
            (
                1 <= self.local_world_size <= self.world_size,
                f"local_world_size={self.local_world_size} must be in "
                f"[1, world_size={self.world_size}]",
            ),
            (
                0 <= self.local_rank < self.local_world_size,
                f"local_rank={self.local_rank} must be in "
                f"[0, local_world_size={self.local_world_size})",
            ),
            (
                1 <= self.num_nodes <= self.world_size,
                f"num_nodes={self.num_nodes} must be in [1, world_size={self.world_size}]",
            ),
            (
                0 <= self.node_rank < self.num_nodes,
                f"node_rank={self.node_rank} must be in [0, num_nodes={self.num_nodes})",
            ),
            (
                0 < self.master_port < 65536,
                f"master_port={self.master_port} must be in [1, 65535]",
            ),
            (bool(self.master_addr), "master_addr must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(
                    f"inconsistent distributed environment ({self.launcher}): {message}"
                )

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the only rank that logs and writes files)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def resolve_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Detect the launcher from environment variables and return a validated DistEnv.

    Args:
        environ: Environment to read; ``os.environ`` when ``None``. Not modified.

    Returns:
        The process's place in the job. See the module docstring for the order
        in which launcher conventions are tried.

    Raises:
        ValueError: When a variable is not an integer, a required companion
            variable is missing (e.g. ``RANK`` without ``LOCAL_RANK``), or the
            values are inconsistent (e.g. ``RANK >= WORLD_SIZE``). The message
            names the variables involved.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        return _from_env_launcher(env)
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        return _from_slurm(env)
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        return _from_mpi(env)
    return _build(
        "single",
        {"rank": 0, "world_size": 1, "local_rank": 0, "local_world_size": 1},
        node_rank=0,
        num_nodes=1,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else _free_port(),
        source="single process",
    )


def apply_dist_env(env: DistEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Export ``env`` as the variables ``deepspeed.init_distributed()`` reads.

    Sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_SIZE``,
    ``LOCAL_WORLD_SIZE``, ``CROSS_RANK``, ``CROSS_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT`` and ``LORAMOE_DIST_LAUNCHER``. Resolving the result again
    gives back an equal :class:`DistEnv`.

    Args:
        env: The resolved environment.
        environ: Mapping to write into; ``os.environ`` when ``None``.
    """
    target = os.environ if environ is None else environ
    target.update(
        {
            "RANK": str(env.rank),
            "WORLD_SIZE": str(env.world_size),
            "LOCAL_RANK": str(env.local_rank),
            "LOCAL_SIZE": str(env.local_world_size),
            "LOCAL_WORLD_SIZE": str(env.local_world_size),
            "CROSS_RANK": str(env.node_rank),
            "CROSS_SIZE": str(env.num_nodes),
            "MASTER_ADDR": env.master_addr,
            "MASTER_PORT": str(env.master_port),
            LAUNCHER_ENV_VAR: env.launcher,
        }
    )


def setup_dist_env(environ: MutableMapping[str, str] | None = None) -> DistEnv:
    """Resolve and export in one call; what ``launcher/train.py`` calls first.

    Args:
        environ: Environment to read and update; ``os.environ`` when ``None``.

    Returns:
        The resolved environment (already exported).
    """
    target = os.environ if environ is None else environ
    env = resolve_dist_env(target)
    apply_dist_env(env, target)
    return env


# ---------------------------------------------------------------------------
# Launcher conventions


def _from_env_launcher(env: Mapping[str, str]) -> DistEnv:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if name not in env:
            raise ValueError(
                f"RANK/WORLD_SIZE/LOCAL_RANK must be set together; {name} is missing "
                f"(RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}, "
                f"LOCAL_RANK={env.get('LOCAL_RANK')!r})"
            )
    ids = {
        "rank": _int(env, "RANK"),
        "world_size": _int(env, "WORLD_SIZE"),
        "local_rank": _int(env, "LOCAL_RANK"),
    }
    if env.get(LAUNCHER_ENV_VAR) in LAUNCHERS:
        launcher = env[LAUNCHER_ENV_VAR]
    elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
        launcher = "deepspeed"
    else:
        launcher = "torchrun"
    local_var = _first_present(env, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"))
    node_var = _first_present(env, ("GROUP_RANK", "CROSS_RANK", "NODE_RANK"))
    nodes_var = _first_present(env, ("GROUP_WORLD_SIZE", "CROSS_SIZE", "NNODES"))
    ids["local_world_size"] = _int(env, local_var) if local_var else ids["world_size"]
    node_rank = _int(env, node_var) if node_var else ids["rank"] // ids["local_world_size"]
    num_nodes = (
        _int(env, nodes_var) if nodes_var else _ceil_div(ids["world_size"], ids["local_world_size"])
    )
    return _build(
        launcher,
        ids,
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=_master_addr(env, num_nodes, f"{launcher} (RANK/WORLD_SIZE)"),
        master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_MASTER_PORT,
        source=f"RANK/WORLD_SIZE/LOCAL_RANK, {local_var or 'WORLD_SIZE'}, "
        f"{node_var or 'RANK // local size'}, {nodes_var or 'WORLD_SIZE / local size'}",
    )


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    world_var = _first_present(env, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"))
    nodes_var = _first_present(env, ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"))
    for name, var in (("SLURM_NTASKS", world_var), ("SLURM_NNODES", nodes_var)):
        if var is None:
            raise ValueError(f"inside a Slurm step (SLURM_PROCID set) but {name} is missing")
    for name in ("SLURM_LOCALID", "SLURM_NODEID"):
        if name not in env:
            raise ValueError(f"inside a Slurm step (SLURM_PROCID set) but {name} is missing")
    node_rank = _int(env, "SLURM_NODEID")
    num_nodes = _int(env, nodes_var)
    world_size = _int(env, world_var)
    per_node_var = _first_present(env, ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"))
    if per_node_var:
        counts = parse_tasks_per_node(env[per_node_var])
        if len(counts) != num_nodes:
            raise ValueError(
                f"{per_node_var}={env[per_node_var]!r} lists {len(counts)} nodes but "
                f"{nodes_var}={num_nodes}"
            )
        if not 0 <= node_rank < num_nodes:
            raise ValueError(f"SLURM_NODEID={node_rank} must be in [0, {nodes_var}={num_nodes})")
        local_world_size = counts[node_rank]
    elif "SLURM_NTASKS_PER_NODE" in env:
        local_world_size = _int(env, "SLURM_NTASKS_PER_NODE")
    else:
        local_world_size = _ceil_div(world_size, num_nodes)
    if "MASTER_PORT" in env:
        port = _int(env, "MASTER_PORT")
    elif "SLURM_JOB_ID" in env:
        port = slurm_default_port(_int(env, "SLURM_JOB_ID"))
    else:
        port = DEFAULT_MASTER_PORT
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    else:
        nodelist_var = _first_present(env, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"))
        if nodelist_var is None:
            raise ValueError(
                "inside a Slurm step but neither MASTER_ADDR nor SLURM_STEP_NODELIST/"
                "SLURM_JOB_NODELIST is set"
            )
        addr = first_slurm_host(env[nodelist_var])
    return _build(
        "slurm",
        {
            "rank": _int(env, "SLURM_PROCID"),
            "world_size": world_size,
            "local_rank": _int(env, "SLURM_LOCALID"),
            "local_world_size": local_world_size,
        },
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=addr,
        master_port=port,
        source=f"SLURM_PROCID/{world_var}/SLURM_LOCALID/SLURM_NODEID/{nodes_var}",
    )


def _from_mpi(env: Mapping[str, str]) -> DistEnv:
    if "OMPI_COMM_WORLD_RANK" in env:
        names = (
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_LOCAL_SIZE",
        )
    else:
        names = ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
    for name in names[:2]:
        if name not in env:
            raise ValueError(f"MPI launch detected ({names[0]} set) but {name} is missing")
    rank, world_size = _int(env, names[0]), _int(env, names[1])
    if names[2] in env and names[3] in env:
        local_rank, local_size = _int(env, names[2]), _int(env, names[3])
    elif names[2] in env or names[3] in env:
        raise ValueError(f"MPI launch: {names[2]} and {names[3]} must be set together")
    else:  # A PMI launcher that does not export local ids: assume one node.
        local_rank, local_size = rank, world_size
    num_nodes = _ceil_div(world_size, local_size)
    ids = {
        "rank": rank,
        "world_size": world_size,
        "local_rank": local_rank,
        "local_world_size": local_size,
    }
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    elif num_nodes == 1:
        addr = "127.0.0.1"
    else:
        addr = _mpi_broadcast_host()
    return _build(
        "mpi",
        ids,
        node_rank=rank // local_size,
        num_nodes=num_nodes,
        master_addr=addr,
        master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_MASTER_PORT,
        source="/".join(names),
    )


# ---------------------------------------------------------------------------
# Helpers (public ones are used by tests and the sbatch script's documentation)


def slurm_default_port(job_id: int) -> int:
    """Port derived from a Slurm job id: ``10000 + job_id % 50000``.

    The same formula is used in ``slurm/train.sbatch``: stable across requeues of a
    job and different for neighbouring jobs that share a node.
    """
    return 10000 + job_id % 50000


def parse_tasks_per_node(spec: str) -> list[int]:
    """Expand Slurm's compressed tasks-per-node list, e.g. ``"2(x3),1"`` -> ``[2, 2, 2, 1]``.

    Raises:
        ValueError: When ``spec`` is not in Slurm's format.
    """
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise ValueError(f"cannot parse Slurm tasks-per-node list {spec!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list (``node[003-005,9],gpu1`` -> ``node003``).

    Uses ``scontrol show hostnames`` when it is on ``PATH`` and answers, as Slurm
    documents; otherwise (or when it fails) expands the first entry in Python.

    Raises:
        ValueError: When the list is empty or malformed.
    """
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return _first_host_python(nodelist)


def _first_host_python(nodelist: str) -> str:
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()

    def first_of(match: re.Match[str]) -> str:
        return re.split(r"[-,]", match.group(1))[0]

    host = re.sub(r"\[([^\]]*)\]", first_of, first)
    if not host or any(c in host for c in "[],"):
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}")
    return host


def _mpi_broadcast_host() -> str:
    try:
        from mpi4py import MPI
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ValueError(
            "multi-node MPI launch without MASTER_ADDR: install mpi4py (pip install "
            "'loramoe-ds[mpi]') or export it, e.g. mpirun -x MASTER_ADDR=<host of rank 0>"
        ) from err
    comm = MPI.COMM_WORLD
    host = socket.gethostbyname(socket.gethostname()) if comm.Get_rank() == 0 else None
    return comm.bcast(host, root=0)


def _build(
    launcher: str,
    ids: dict[str, int],
    *,
    node_rank: int,
    num_nodes: int,
    master_addr: str,
    master_port: int,
    source: str,
) -> DistEnv:
    try:
        return DistEnv(
            **ids,
            node_rank=node_rank,
            num_nodes=num_nodes,
            master_addr=master_addr,
            master_port=master_port,
            launcher=launcher,
        )
    except ValueError as err:
        raise ValueError(f"{err} [read from {source}]") from None


def _master_addr(env: Mapping[str, str], num_nodes: int, what: str) -> str:
    if "MASTER_ADDR" in env:
        return env["MASTER_ADDR"]
    if num_nodes == 1:
        return "127.0.0.1"
    raise ValueError(f"{what}: MASTER_ADDR must be set when the job spans {num_nodes} nodes")


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _first_present(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in env), None)


def _ceil_div(a: int, b: int) -> int:
    if b <= 0:
        raise ValueError(f"local world size must be >= 1, got {b}")
    return -(-a // b)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


__all__ = [
    "DEFAULT_MASTER_PORT",
    "LAUNCHERS",
    "DistEnv",
    "apply_dist_env",
    "first_slurm_host",
    "parse_tasks_per_node",
    "resolve_dist_env",
    "setup_dist_env",
    "slurm_default_port",
]
