"""Launch plumbing: launcher-agnostic rank/world mapping and graceful preemption.

``launcher/train.py`` calls :func:`setup_dist_env` before
``deepspeed.init_distributed()`` so that the deepspeed launcher, torchrun, Slurm
``srun`` (one task per GPU) and ``mpirun`` all look the same to DeepSpeed.
"""

from loramoe_ds.launch.dist_env import (
    LAUNCHERS,
    DistEnv,
    apply_dist_env,
    resolve_dist_env,
    setup_dist_env,
)
from loramoe_ds.launch.preempt import REQUEUE_EXIT_CODE, PreemptionHandler

__all__ = [
    "LAUNCHERS",
    "REQUEUE_EXIT_CODE",
    "DistEnv",
    "PreemptionHandler",
    "apply_dist_env",
    "resolve_dist_env",
    "setup_dist_env",
]
