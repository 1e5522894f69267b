"""Configuration of the instruction-data pipeline (also the ``data:`` section of a run config)."""

from __future__ import annotations

from dataclasses import dataclass, field

TEMPLATES = ("auto", "chat", "plain")
"""Valid values of :attr:`DataConfig.template`."""

DEFAULT_TASK_TYPE_NAMES: dict[str, int] = {
    "world_knowledge": 1,
    "knowledge": 1,
    "downstream": 0,
}
"""String ``task_type`` names accepted unless a config overrides them."""


@dataclass
class DataConfig:
    """How instruction records are read, validated, tokenised and batched.

    Records are ``{instruction, input, output, task_type}``; ``task_type`` 1 is
    world knowledge and 0 is a downstream task (LoRAMoE's two expert groups).
    The same type is the ``data:`` section of
    :class:`~loramoe_ds.run_config.RunConfig`: every field below is a YAML key.
    """

    train_files: list[str] = field(default_factory=lambda: ["demo"])
    """JSONL/JSON/Parquet files of ``{instruction, input, output, task_type}``
    records for a training run; ``demo`` means the shipped demo mix.
    (:func:`~loramoe_ds.data.build_dataloader` takes its paths as an argument.)"""

    max_length: int = 512
    """Maximum tokens per example (prompt + response + EOS). A prompt that
    leaves no room for one response token is a bad record; a response that does
    not fit is truncated and counted."""

    packing: bool = False
    """Pack several records into each ``max_length`` row: first-fit-decreasing
    within windows of 1024 records of the seeded epoch order
    (:mod:`loramoe_ds.data.packing`), rows split across ranks like samples, the
    sampler position counted in rows. Batches then carry ``position_ids``
    (restarting at 0 per record: attention and positions restart at each
    record boundary), ``seq_ids`` (record index in its row, -1 on padding) and a
    per-token ``task_type``."""

    template: str = "auto"
    """Prompt format: ``"chat"`` uses the tokenizer's chat template, ``"plain"``
    an ``### Instruction/### Response`` template, ``"auto"`` picks chat when the
    tokenizer has a template."""

    system_prompt: str | None = None
    """System message for the chat template; ``None`` keeps the template's
    default (SmolLM2 inserts a ~20-token one)."""

    task_type_names: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_TASK_TYPE_NAMES))
    """Maps string ``task_type`` values in the data to the ints 0/1; merged over
    :data:`DEFAULT_TASK_TYPE_NAMES` (an entry given here wins)."""

    skip_bad_records: bool = False
    """When False (default) the first bad record raises :class:`DataError`;
    when True bad records are dropped, counted in the returned stats and
    logged."""

    pad_to_multiple_of: int | None = None
    """Pad batch length up to a multiple of this (e.g. 8 for tensor cores);
    ``None`` pads to the longest sequence in the batch."""

    cache_dir: str | None = None
    """Root of the tokenised-dataset cache; ``None`` uses ``<output.dir>/cache/data``
    in a training run, else ``$LORAMOE_DS_CACHE/data`` or
    ``~/.cache/loramoe_ds/data``. Must be on a filesystem every rank can read."""

    num_proc: int = 1
    """Processes for ``Dataset.map`` tokenisation (rank 0 only)."""

    seed: int = 0
    """Seed of the per-epoch shuffle of the distributed sampler (the data order;
    independent of ``train.seed``)."""

    shuffle: bool = True
    """Shuffle indices each epoch (seeded by ``seed + epoch``)."""

    num_workers: int = 0
    """DataLoader worker processes per rank."""

    def __post_init__(self) -> None:
        if isinstance(self.train_files, str):
            self.train_files = [self.train_files]
        if not self.train_files or not all(isinstance(f, str) and f for f in self.train_files):
            raise ValueError(
                f"data.train_files={self.train_files!r}: give a list of one or more files "
                "(or 'demo')"
            )
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int):
            raise ValueError(f"data.max_length={self.max_length!r}: must be an int >= 2")
        if self.max_length < 2:
            raise ValueError(f"data.max_length={self.max_length}: must be an int >= 2")
        if not isinstance(self.packing, bool):
            raise ValueError(f"data.packing={self.packing!r}: must be true or false")
        if not isinstance(self.task_type_names, dict):
            raise ValueError(
                f"data.task_type_names={self.task_type_names!r}: must map names to 0 or 1"
            )
        self.task_type_names = {**DEFAULT_TASK_TYPE_NAMES, **self.task_type_names}
        if self.template not in TEMPLATES:
            raise ValueError(f"data.template={self.template!r}: valid values {list(TEMPLATES)}")
        for name, value in self.task_type_names.items():
            if not isinstance(name, str) or value not in (0, 1) or isinstance(value, bool):
                raise ValueError(
                    f"data.task_type_names[{name!r}]={value!r}: must map a name to "
                    "0 (downstream) or 1 (world knowledge)"
                )
        if self.pad_to_multiple_of is not None and (
            not isinstance(self.pad_to_multiple_of, int) or self.pad_to_multiple_of < 1
        ):
            raise ValueError(
                f"data.pad_to_multiple_of={self.pad_to_multiple_of!r}: must be null or an int >= 1"
            )
        if not isinstance(self.num_proc, int) or self.num_proc < 1:
            raise ValueError(f"data.num_proc={self.num_proc!r}: must be an int >= 1")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers!r}: must be an int >= 0")
