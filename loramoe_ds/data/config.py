"""Configuration of the instruction-data pipeline."""

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
    """

    max_len: int = 512
    """Maximum tokens per example (prompt + response + EOS). A prompt that
    leaves no room for one response token is a bad record; a response that does
    not fit is truncated and counted."""

    template: str = "auto"
    """Prompt format: ``"chat"`` uses the tokenizer's chat template, ``"plain"``
    an ``### Instruction/### Response`` template, ``"auto"`` picks chat when the
    tokenizer has a template."""

    system_prompt: str | None = None
    """System message for the chat template; ``None`` keeps the template's
    default (SmolLM2 inserts a ~20-token one)."""

    task_type_names: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_TASK_TYPE_NAMES))
    """Maps string ``task_type`` values in the data to the ints 0/1."""

    skip_bad_records: bool = False
    """When False (default) the first bad record raises :class:`DataError`;
    when True bad records are dropped, counted in the returned stats and
    logged."""

    pad_to_multiple_of: int | None = None
    """Pad batch length up to a multiple of this (e.g. 8 for tensor cores);
    ``None`` pads to the longest sequence in the batch."""

    cache_dir: str | None = None
    """Root of the tokenised-dataset cache; ``None`` uses
    ``$LORAMOE_DS_CACHE/data`` or ``~/.cache/loramoe_ds/data``. Must be on a
    filesystem every rank of a node can read."""

    num_proc: int = 1
    """Processes for ``Dataset.map`` tokenisation (rank 0 only)."""

    seed: int = 0
    """Seed of the per-epoch shuffle of the distributed sampler."""

    shuffle: bool = True
    """Shuffle indices each epoch (seeded by ``seed + epoch``)."""

    num_workers: int = 0
    """DataLoader worker processes per rank."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_len, int) or self.max_len < 2:
            raise ValueError(f"DataConfig.max_len must be an int >= 2, got {self.max_len!r}")
        if self.template not in TEMPLATES:
            raise ValueError(
                f"DataConfig.template must be one of {TEMPLATES}, got {self.template!r}"
            )
        for name, value in self.task_type_names.items():
            if not isinstance(name, str) or value not in (0, 1) or isinstance(value, bool):
                raise ValueError(
                    "DataConfig.task_type_names must map str -> 0 (downstream) or "
                    f"1 (world knowledge), got {name!r}: {value!r}"
                )
        if self.pad_to_multiple_of is not None and (
            not isinstance(self.pad_to_multiple_of, int) or self.pad_to_multiple_of < 1
        ):
            raise ValueError(
                "DataConfig.pad_to_multiple_of must be None or an int >= 1, "
                f"got {self.pad_to_multiple_of!r}"
            )
        if not isinstance(self.num_proc, int) or self.num_proc < 1:
            raise ValueError(f"DataConfig.num_proc must be an int >= 1, got {self.num_proc!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(
                f"DataConfig.num_workers must be an int >= 0, got {self.num_workers!r}"
            )
