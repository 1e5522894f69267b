"""Adapter state in one place: gathering, checkpoint layout, resume at any topology, tags, export.

Split by purity: :mod:`.format` (layout, tags, compatibility: files and JSON
only), :mod:`.state` (gather and scatter of tensors and Adam state, collective),
:mod:`.store` (save, load, export).

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
                                       #   (data position), RNG of every rank (its own
                                       #   CUDA device only): plain data, weights_only
        loramoe_meta.json              # format, topology, global batch, allocation,
                                       #   adapter config, base-model identity, and
                                       #   "files": size + sha256 of every other file

Names are those of :meth:`LoRAMoEModel.adapter_named_parameters` of the unsharded
model (``<linear>.router.weight``, ``<linear>.experts.lora_A`` ``E x R x D``,
``.lora_B`` ``E x R x O``). Saving gathers: routers and replicated banks
(:mod:`~loramoe_ds.parallel.layout`) from DeepSpeed's partitioned fp32 master
weights and Adam moments (``safe_get_full_fp32_param`` /
``safe_get_full_optimizer_state``, collectives); sharded banks' expert shards
and their expert-AdamW moments by an all-gather over the EP group
(global expert ``ep_rank * L + i``, ``L = E / P``). Loading slices what this rank
owns under the *new* topology: ZeRO parameters through
:mod:`~loramoe_ds.parallel.zero_state` (the one user of DeepSpeed optimizer
internals; the working low-precision copy is refreshed), EP shards as
global experts ``[ep_rank * L, (ep_rank + 1) * L)``. Both are exact copies, so a
resume at the same topology continues bit for bit, and one at another topology
continues the same optimisation (same data per step when the global batch is
the same; see :mod:`loramoe_ds.data.sampler`).

What may change between save and resume: W, P (dividing W; a bank the new P
cannot split is replicated, so a bank's placement may change too), nodes,
micro-batch and gradient accumulation as long as the global batch
``train_batch_size`` is the same. What may not: the adapter config, the base
model, the global batch. :func:`check_compatible` refuses
those naming both topologies; ``make_plan`` runs it before any heavy work.
Dropout RNG streams are per rank: they are restored at the same world size only.

Integrity: rank 0 verifies the manifest before a resume; a damaged newest
checkpoint is skipped (one line naming the file) for the newest intact one
(:func:`intact_tag`). ``.pt`` files load with ``weights_only=True``; one that
would need code is refused (:class:`CheckpointRefusedError`).

Atomicity: rank 0 writes everything into a temporary sibling directory and
renames it to ``global_step{N}`` (:func:`loramoe_ds.io.atomic_dir`), then
replaces ``latest``. A crash before the rename leaves ``latest`` and its tag
untouched; the next save removes the stale temporary directory. All ranks must
see one file system (they all read the checkpoint on load).
"""

from loramoe_ds.parallel.checkpoint.format import (
    BASE_IDENTITY_KEYS,
    CHECKPOINT_FORMAT,
    LATEST,
    MANIFEST,
    META,
    OPTIMIZER,
    TAG_PREFIX,
    TRAINER_STATE,
    CheckpointDamagedError,
    base_identity,
    check_compatible,
    check_resume,
    checkpoint_tags,
    file_manifest,
    intact_tag,
    latest_tag,
    prune_checkpoints,
    read_meta,
    tag_name,
    verify_tag,
)
from loramoe_ds.parallel.checkpoint.state import (
    full_adapter_state,
    full_optimizer_state,
)
from loramoe_ds.parallel.checkpoint.store import (
    CheckpointRefusedError,
    CheckpointSaveError,
    export_adapter,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "BASE_IDENTITY_KEYS",
    "CHECKPOINT_FORMAT",
    "LATEST",
    "MANIFEST",
    "META",
    "OPTIMIZER",
    "TAG_PREFIX",
    "TRAINER_STATE",
    "CheckpointDamagedError",
    "CheckpointRefusedError",
    "CheckpointSaveError",
    "base_identity",
    "check_compatible",
    "check_resume",
    "checkpoint_tags",
    "export_adapter",
    "file_manifest",
    "full_adapter_state",
    "full_optimizer_state",
    "intact_tag",
    "latest_tag",
    "load_checkpoint",
    "prune_checkpoints",
    "read_meta",
    "save_checkpoint",
    "tag_name",
    "verify_tag",
]
