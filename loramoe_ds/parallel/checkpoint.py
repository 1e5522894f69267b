"""Adapter state in one place: gathering, checkpoint layout, resume at any topology, tags, export.

A checkpoint holds the *full* adapter training state, independent of world size
W and ``ep_size`` P, written once by rank 0 (``io.atomic_dir``)::

    <dir>/latest                       # text: the newest complete tag (io.atomic_write_text)
    <dir>/global_step{N}/              # one tag per saved optimizer step N
        adapter_model.safetensors      # routers + every expert's lora_A/lora_B, fp32, unsharded
        adapter_config.json            #   (the export format: load_adapter reads this pair)
        optimizer.pt                   # Adam state per adapter tensor, unsharded:
                                       #   {"step": {name: int}, "exp_avg": {name: T},
                                       #    "exp_avg_sq": {name: T}}  (None before the 1st step)
        trainer_state.pt               # engine counters, LR schedule + LR, client state
                                       #   (data position), RNG of every rank
        loramoe_meta.json              # format, topology, global batch, allocation,
                                       #   adapter config, base-model identity

Names are those of :meth:`LoRAMoEModel.adapter_named_parameters` of the unsharded
model (``<linear>.router.weight``, ``<linear>.experts.lora_A`` ``E x R x D``,
``.lora_B`` ``E x R x O``). Saving gathers: routers (and, with P = 1, the
banks) from DeepSpeed's partitioned fp32 master weights and Adam moments
(``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``, collectives);
expert shards and their expert-AdamW moments by an all-gather over the EP group
(global expert ``ep_rank * L + i``, ``L = E / P``). Loading slices what this rank
owns under the *new* topology: ZeRO parameters through
:mod:`~loramoe_ds.parallel.zero_state` (the one user of DeepSpeed optimizer
internals; the working low-precision copy is refreshed), EP shards as
global experts ``[ep_rank * L, (ep_rank + 1) * L)``. Both are exact copies, so a
resume at the same topology continues bit for bit, and one at another topology
continues the same optimisation (same data per step when the global batch is
the same; see :mod:`loramoe_ds.data.sampler`).

What may change between save and resume: W, P (dividing W and every layer's
expert count), nodes, micro-batch and gradient accumulation as long as the
global batch ``train_batch_size`` is the same. What may not: the adapter
config, the base model, the global batch. :func:`check_compatible` refuses
those naming both topologies; ``make_plan`` runs it before any heavy work.
Dropout RNG streams are per rank: they are restored at the same world size only.

Atomicity: rank 0 writes everything into a temporary sibling directory and
renames it to ``global_step{N}`` (:func:`loramoe_ds.io.atomic_dir`), then
replaces ``latest``. A crash before the rename leaves ``latest`` and its tag
untouched; the next save removes the stale temporary directory. All ranks must
see one file system (they all read the checkpoint on load).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from loramoe_ds.io import atomic_dir, atomic_write_text
from loramoe_ds.model.inject import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from loramoe_ds.parallel import zero_state
from loramoe_ds.parallel.zero_state import ADAM_KEYS

LATEST = "latest"
META = "loramoe_meta.json"
OPTIMIZER = "optimizer.pt"
TRAINER_STATE = "trainer_state.pt"
TAG_PREFIX = "global_step"
CHECKPOINT_FORMAT = 2
"""Version 2: full, topology-independent state (1 was DeepSpeed's per-rank files)."""
BASE_IDENTITY_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)


# -- tags and pruning ----------------------------------------------------------
def tag_name(step: int) -> str:
    """The tag of the checkpoint after optimizer step ``step``."""
    return f"{TAG_PREFIX}{step}"


def latest_tag(directory: str | Path) -> str | None:
    """The tag named by ``<directory>/latest``, or ``None``."""
    f = Path(directory) / LATEST
    return f.read_text().strip() if f.is_file() else None


def checkpoint_tags(directory: str | Path) -> list[Path]:
    """Tag directories under ``directory``, oldest step first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    tags = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)]
    return sorted(tags, key=lambda p: int("".join(c for c in p.name if c.isdigit()) or 0))


def prune_checkpoints(directory: str | Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` tags (``keep <= 0``: keep all); returns the removed."""
    if keep <= 0:
        return []
    removed = checkpoint_tags(directory)[:-keep]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


# -- gathering -----------------------------------------------------------------
def load_full_state(model, state: dict[str, torch.Tensor]) -> None:
    """Copy a full adapter state into an injected, not yet sharded model."""
    params = dict(model.adapter_named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"init_state: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for n, p in params.items():
            if tuple(p.shape) != tuple(state[n].shape):
                raise ValueError(
                    f"init_state: {n} has shape {tuple(state[n].shape)}, model {p.shape}"
                )
            p.copy_(state[n].to(p.dtype))


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu().clone()


def full_adapter_state(trainer) -> dict[str, torch.Tensor]:
    """All routers and experts, unsharded, fp32 master weights, CPU (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    def full(p):
        v = safe_get_full_fp32_param(p)
        return _cpu(p if v is None else v)

    return trainer.layout.gather(full, lambda p: p.detach().float())


def full_optimizer_state(trainer) -> dict[str, Any] | None:
    """Adam step and moments of every adapter tensor, unsharded, CPU (collective).

    Returns ``None`` before the first optimizer step (no Adam state exists yet).
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = zero_state.inner_optimizer(trainer.engine)
    expert_adamw = trainer.expert_optimizer.adamw if trainer.expert_optimizer else None
    step_e, step_x = zero_state.adam_step(inner), zero_state.adam_step(expert_adamw)
    if step_e is None:
        return None
    out: dict[str, Any] = {}
    for key in ADAM_KEYS:

        def full(p, key=key):
            v = safe_get_full_optimizer_state(p, key)
            return _cpu(inner.state[p][key] if v is None else v)

        def local(p, key=key):
            return expert_adamw.state[p][key].detach().float()

        out[key] = trainer.layout.gather(full, local)
    engine_names = set(trainer.layout.engine_params())
    out["step"] = {n: step_e if n in engine_names else step_x for n in out["exp_avg"]}
    return out


def _load_engine_state(trainer, params, optim) -> None:
    engine = trainer.engine
    named = trainer.layout.engine_params()
    for n, p in named.items():
        zero_state.set_engine_tensor(engine, p, params[n], None)
    if optim is not None:
        steps = {optim["step"][n] for n in named}
        if len(steps) != 1:
            raise ValueError(f"checkpoint: engine tensors have different Adam steps {steps}")
        zero_state.init_adam_state(
            zero_state.inner_optimizer(engine), zero_state.hp_tensors(engine), steps.pop()
        )
        zero_state.link_adam_state(engine)
        for key in ADAM_KEYS:
            for n, p in named.items():
                zero_state.set_engine_tensor(engine, p, optim[key][n], key)
    zero_state.refresh_low_precision(engine)


def _load_expert_state(trainer, params, optim) -> None:
    opt = trainer.expert_optimizer.adamw if trainer.expert_optimizer else None
    with torch.no_grad():
        for n, (p, lo, L) in trainer.layout.local_shards().items():
            p.copy_(params[n][lo : lo + L].to(p.device, p.dtype))
            if optim is not None:
                zero_state.init_adam_state(opt, [p], optim["step"][n])
                for key in ADAM_KEYS:
                    opt.state[p][key].copy_(optim[key][n][lo : lo + L].to(p.device))


# -- compatibility ---------------------------------------------------------------
def base_identity(hf_config) -> dict[str, Any]:
    """What identifies the base model: architecture sizes and the model directory's name."""
    ident = {k: getattr(hf_config, k, None) for k in BASE_IDENTITY_KEYS}
    ident["name"] = Path(str(getattr(hf_config, "_name_or_path", "") or "")).name
    return ident


def _describe(meta: dict) -> str:
    return f"world size {meta['world_size']}, ep_size {meta['ep_size']}"


def check_compatible(meta: dict, now: dict, where: str | Path) -> None:
    """Refuse a resume that cannot continue the saved run; name both topologies.

    Args:
        meta: The checkpoint's ``loramoe_meta.json``.
        now: This run's ``world_size``, ``ep_size``, ``experts_per_layer``,
            ``adapter`` (``AdapterConfig.to_dict()``), ``base``
            (:func:`base_identity`) and ``train_batch_size``.
        where: The checkpoint (for the message).

    Raises:
        ValueError: Unknown format, a different adapter config, allocation, base
            model or global batch, or an ``ep_size`` that does not divide the
            world size or some layer's expert count.
    """
    now = json.loads(json.dumps(now))  # tuples -> lists, as in the saved JSON
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{where}: checkpoint format {meta.get('format')!r}, this version reads "
            f"{CHECKPOINT_FORMAT} (written by another loramoe-ds version)"
        )
    head = f"cannot resume {where} (saved at {_describe(meta)}) on {_describe(now)}: "
    if meta["adapter"] != now["adapter"]:
        diff = sorted(
            k
            for k in set(meta["adapter"]) | set(now["adapter"])
            if meta["adapter"].get(k) != now["adapter"].get(k)
        )
        pairs = ", ".join(
            f"{k} saved {meta['adapter'].get(k)!r} now {now['adapter'].get(k)!r}" for k in diff
        )
        raise ValueError(head + f"the adapter config differs ({pairs})")
    if meta["experts_per_layer"] != now["experts_per_layer"]:
        raise ValueError(
            head + f"experts per layer saved {meta['experts_per_layer']}, now "
            f"{now['experts_per_layer']}"
        )
    if meta["base"] != now["base"]:
        diff = [
            f"{k} saved {meta['base'].get(k)!r} now {now['base'].get(k)!r}"
            for k in sorted(meta["base"])
            if meta["base"].get(k) != now["base"].get(k)
        ]
        raise ValueError(head + f"a different base model ({', '.join(diff)})")
    W, P = now["world_size"], now["ep_size"]
    if W % P:
        raise ValueError(head + f"ep_size {P} does not divide the world size {W}")
    for layer, n in enumerate(now["experts_per_layer"]):
        if n % P:
            raise ValueError(
                head + f"ep_size {P} does not divide layer {layer}'s {n} experts (choose an "
                "ep_size dividing every layer's expert count)"
            )
    if meta["train_batch_size"] != now["train_batch_size"]:
        raise ValueError(
            head + f"global batch (train_batch_size) saved {meta['train_batch_size']}, now "
            f"{now['train_batch_size']}; keep micro-batch x grad_accum x world size equal"
        )


def read_meta(ckpt: Path) -> dict:
    f = ckpt / META
    if not f.is_file():
        raise ValueError(f"{ckpt} is not a loramoe-ds checkpoint (no {META})")
    return json.loads(f.read_text())


def check_resume(directory: str | Path, now: dict, tag: str | None = None) -> dict | None:
    """:func:`check_compatible` on ``<directory>/<tag or latest>`` (reads JSON only).

    Returns:
        The checkpoint's meta, or ``None`` when there is nothing to resume.
    """
    root = Path(directory)
    tag = tag or latest_tag(root)
    if tag is None:
        return None
    meta = read_meta(root / tag)
    check_compatible(meta, now, root / tag)
    return meta


def _current(trainer) -> dict:
    g, e = trainer.groups, trainer.engine
    return {
        "world_size": g.world_size,
        "ep_size": g.ep_size,
        "experts_per_layer": trainer.model.experts_per_layer,
        "adapter": trainer.model.cfg.to_dict(),
        "base": base_identity(getattr(trainer.model.base, "config", None)),
        "train_batch_size": int(e.train_batch_size()),
    }


# -- save / load -----------------------------------------------------------------
def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def save_checkpoint(trainer, directory: str | Path, client_state: dict | None) -> Path:
    """Write a topology-independent checkpoint atomically (collective: every rank calls it).

    Args:
        trainer: The :class:`~loramoe_ds.parallel.engine.MoETrainer`.
        directory: Checkpoint root.
        client_state: Picklable state handed back on load (rank 0's is kept, so it
            must be the same on every rank, e.g. the loader's global data position).

    Returns:
        ``<directory>/global_step{N}``.
    """
    from safetensors.torch import save_file

    root, rank, e = Path(directory), trainer.groups.rank, trainer.engine
    tag = tag_name(trainer.global_step)
    params = full_adapter_state(trainer)
    optim = full_optimizer_state(trainer)
    rngs = [None] * _world()
    if dist.is_initialized():
        dist.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    err = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(f".{TAG_PREFIX}*"):  # temp dirs of an interrupted save
                shutil.rmtree(stale, ignore_errors=True)
            sched = getattr(e, "lr_scheduler", None)
            state = {
                "global_step": int(e.global_steps),
                "global_samples": int(e.global_samples),
                "skipped_steps": int(e.skipped_steps),
                "lr": float(e.get_lr()[0]),
                "lr_scheduler": sched.state_dict() if sched is not None else None,
                "client_state": client_state,
                "rng": rngs,
            }
            meta = {
                "format": CHECKPOINT_FORMAT,
                "tag": tag,
                "global_step": trainer.global_step,
                "micro_batch_size": int(e.train_micro_batch_size_per_gpu()),
                "grad_accum": int(e.gradient_accumulation_steps()),
                **_current(trainer),
            }
            with atomic_dir(root / tag) as tmp:
                save_file(params, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
                cfg = trainer.model.adapter_config_dict()
                (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2))
                torch.save(optim, tmp / OPTIMIZER)
                torch.save(state, tmp / TRAINER_STATE)
                (tmp / META).write_text(json.dumps(meta, indent=2))
            atomic_write_text(root / LATEST, tag)
        except Exception as exc:  # the other ranks must hear of it, not hang
            err = f"rank 0 could not write checkpoint {root / tag}: {exc}"
            if not dist.is_initialized():
                raise
    if dist.is_initialized():
        box = [err]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise RuntimeError(box[0])
    return root / tag


def load_checkpoint(trainer, directory: str | Path, tag: str | None = None):
    """Restore adapter, both optimizers, LR schedule, counters (and RNG at the same W).

    Collective. Works across world sizes and ``ep_size`` (module docstring).

    Returns:
        The client state saved by rank 0, or ``None`` (nothing changed) when
        ``directory`` has no ``latest`` and no ``tag`` is given.

    Raises:
        ValueError: Not a checkpoint of this format, or one this run cannot
            continue (:func:`check_compatible`).
    """
    from safetensors.torch import load_file

    root = Path(directory)
    tag = tag or latest_tag(root)
    if tag is None:
        return None
    ckpt = root / tag
    meta = read_meta(ckpt)
    check_compatible(meta, _current(trainer), ckpt)
    params = load_file(str(ckpt / ADAPTER_WEIGHTS))
    optim = torch.load(ckpt / OPTIMIZER, map_location="cpu", weights_only=True, mmap=True)
    state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=False)
    _load_engine_state(trainer, params, optim)
    _load_expert_state(trainer, params, optim)
    e = trainer.engine
    e.global_steps = state["global_step"]
    e.global_samples = state["global_samples"]
    e.skipped_steps = state["skipped_steps"]
    e.micro_steps = state["global_step"] * int(e.gradient_accumulation_steps())
    if state["lr_scheduler"] is not None and getattr(e, "lr_scheduler", None) is not None:
        e.lr_scheduler.load_state_dict(state["lr_scheduler"])
    opts = [zero_state.inner_optimizer(e)] + (
        [trainer.expert_optimizer.adamw] if trainer.expert_optimizer else []
    )
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = state["lr"]
    if len(state["rng"]) == trainer.groups.world_size:
        _set_rng_state(state["rng"][trainer.groups.rank])
    _barrier()
    return state["client_state"]


def export_adapter(trainer, path: str | Path) -> Path:
    """Write the full adapter (safetensors + JSON) from rank 0 (collective)."""
    state = full_adapter_state(trainer)
    if trainer.groups.rank == 0:
        trainer.model.save_adapter(path, state=state)
    _barrier()
    return Path(path)
