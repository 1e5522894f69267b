"""The DeepSpeed JSON (``--deepspeed``) read and checked against the run config.

The JSON carries DeepSpeed's business (ZeRO stage, buckets, offload); the run
config owns the batch sizes, the gradient clip and the precision
(:data:`DS_AUTO_KEYS`). Those keys are filled in from the run config where the
JSON leaves them out or writes ``"auto"`` -- as the shipped ``ds_configs/*.json``
do -- and must agree with it where the JSON gives a value. Checked on one
process, before any process group (:func:`loramoe_ds.plan.make_plan`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loramoe_ds.config.run import RunConfig


def load_ds_config(path: str | Path | None) -> dict[str, Any]:
    """Read a DeepSpeed JSON (``{}`` when no path is given)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"DeepSpeed config {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e


DS_AUTO_KEYS = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
    "bf16.enabled",
    "fp16.enabled",
)
"""DeepSpeed JSON keys the run config owns: ``"auto"`` (or absent) is filled in from
it, an explicit value must agree with it (:func:`resolve_ds_config`)."""


def _auto_keys(d: Any, prefix: str = "") -> list[str]:
    """Dotted keys of a (nested) DeepSpeed JSON whose value is ``"auto"``."""
    if not isinstance(d, dict):
        return []
    return [
        k
        for key, v in d.items()
        for k in ([f"{prefix}{key}"] if v == "auto" else _auto_keys(v, f"{prefix}{key}."))
    ]


def resolve_ds_config(
    run: RunConfig, ds: dict[str, Any], world_size: int, where: str = "ds_config"
) -> dict[str, Any]:
    """Check the DeepSpeed JSON against the run config and fill what it leaves out.

    The run config owns :data:`DS_AUTO_KEYS`: each is filled in from it when the
    JSON leaves it out or writes ``"auto"`` (as the shipped ``ds_configs/*.json``
    do, so a command-line override such as ``train.micro_batch_size=8`` never
    conflicts), and must agree with it when the JSON gives a value.
    ``train_batch_size = micro_batch_size x grad_accum x world_size`` (every rank
    is a data-parallel rank for the base and routers; expert parallelism shards
    only the expert banks); ``bf16.enabled`` is ``train.precision == 'bf16'``;
    ``fp16`` is never enabled; ``gradient_clipping`` is ``train.grad_clip`` (and
    removed: the trainer clips routers and experts jointly). ``"auto"`` anywhere
    else is refused.

    Raises:
        ValueError: On any disagreement, naming both values.
    """
    ds = copy.deepcopy(ds)
    t = run.train
    want = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
    }
    if t.global_batch_size is not None and t.global_batch_size != want["train_batch_size"]:
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} but micro_batch_size "
            f"{t.micro_batch_size} x grad_accum {t.grad_accum} x world size {world_size} "
            f"= {want['train_batch_size']}"
        )
    for key, value in want.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ValueError(
                f"{where}: {key}={ds[key]} but the run config gives {value} (micro_batch_size "
                f"{t.micro_batch_size} x grad_accum {t.grad_accum} x world size {world_size}; "
                f'write "auto" to take it from the run config)'
            )
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ValueError(
                f"{where}: remove the {section!r} section: train.* owns the optimizer and LR "
                "schedule (train.lr, train.warmup_steps); the trainer hands its AdamW and "
                "schedule to DeepSpeed so routers and expert-parallel banks follow one schedule"
            )
    for name in ("bf16", "fp16"):
        if not isinstance(ds.get(name, {}), dict):
            raise ValueError(f'{where}: {name}={ds[name]!r}: must be a mapping {{"enabled": ...}}')
    if ds.get("fp16", {}).get("enabled", False) not in (False, "auto"):
        raise ValueError(f"{where}: fp16 is not supported; use bf16 (train.precision=bf16)")
    if "fp16" in ds:
        ds["fp16"]["enabled"] = False
    bf16 = ds.get("bf16", {}).get("enabled", "auto")
    if bf16 != "auto" and bool(bf16) != (t.precision == "bf16"):
        raise ValueError(
            f"{where}: bf16.enabled={bf16} but train.precision={t.precision!r}; make them agree "
            '(or write "auto")'
        )
    ds.setdefault("bf16", {})["enabled"] = t.precision == "bf16"
    want_stage = run.parallel.zero_stage
    zero = ds.setdefault("zero_optimization", {})
    if want_stage == "auto":  # the JSON's stage when given (the plan fills it in otherwise)
        want_stage = zero.get("stage", "auto")
    if want_stage != "auto":
        zero.setdefault("stage", want_stage)
    stage = zero.get("stage", "auto")
    if stage != want_stage:
        raise ValueError(
            f"{where}: zero_optimization.stage={stage} but parallel.zero_stage="
            f"{run.parallel.zero_stage}; make them agree"
        )
    clip = ds.get("gradient_clipping", "auto")
    if clip != "auto" and float(clip or 0.0) != t.grad_clip:
        raise ValueError(
            f"{where}: gradient_clipping={clip} but train.grad_clip={t.grad_clip}; make them "
            "agree (the clip is applied jointly to routers and expert-parallel banks)"
        )
    ds.pop("gradient_clipping", None)  # the trainer's: train.grad_clip, clipped jointly
    left = _auto_keys(ds)
    if left:
        raise ValueError(
            f'{where}: {left[0]}="auto": only the keys the run config owns may be "auto" '
            f"({', '.join(DS_AUTO_KEYS)}); give a value"
        )
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds
