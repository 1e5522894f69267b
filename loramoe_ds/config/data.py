"""The ``data:`` section: how instruction records are read, validated, tokenised and batched."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from loramoe_ds.config.fields import check_choice

TEMPLATES = ("auto", "chat", "plain")
"""Valid values of :attr:`DataConfig.template`."""

FORMATS = ("auto", "alpaca", "messages", "sharegpt")
"""Valid record formats: ``alpaca`` ``{instruction, input, output}``, ``messages``
(OpenAI ``{"messages": [{"role", "content"}]}``), ``sharegpt``
(``{"conversations": [{"from", "value"}]}``); ``auto`` detects per file from its
first record."""

LOSS_ON = ("all_assistant", "last_assistant")
"""Valid values of :attr:`DataConfig.loss_on`."""

DEFAULT_TASK_TYPE_NAMES: dict[str, int] = {
    "world_knowledge": 1,
    "knowledge": 1,
    "downstream": 0,
}
"""String ``task_type`` names accepted unless a config overrides them."""


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class DatasetConfig:
    """One dataset of a training mix (an entry of ``data.datasets``)."""

    path: str
    """A JSONL/JSON/Parquet file, a ``datasets`` ``save_to_disk`` directory, a
    Hugging Face Hub dataset name (read with ``datasets.load_dataset``, split
    ``train``) or ``demo``."""

    format: str = "auto"
    """Record format (:data:`FORMATS`); ``auto`` detects it from the first record."""

    task_type: int | str | None = None
    """Task type of every record of this dataset that has none (0, 1 or a name of
    ``data.task_type_names``); ``None``: every record must carry its own."""

    weight: float | None = None
    """Sampling share of this dataset, relative to the other datasets' weights;
    ``None`` on every dataset keeps each dataset's natural share (its size)."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"data.datasets.path={self.path!r}: must be a non-empty string")
        check_choice("data.datasets.format", self.format, FORMATS)
        tt = self.task_type
        if (
            tt is not None
            and not isinstance(tt, str)
            and (isinstance(tt, bool) or tt not in (0, 1))
        ):
            raise ValueError(
                f"data.datasets.task_type={tt!r}: must be 0, 1, a task-type name or null"
            )
        if self.weight is not None and (not _is_number(self.weight) or not self.weight > 0):
            raise ValueError(f"data.datasets.weight={self.weight!r}: must be a number > 0 or null")


@dataclass
class DataConfig:
    """How instruction records are read, validated, tokenised and batched.

    Records are ``{instruction, input, output, task_type}`` (alpaca), OpenAI
    ``messages`` or ShareGPT ``conversations`` (:mod:`loramoe_ds.data.chat`);
    ``task_type`` 1 is world knowledge and 0 is a downstream task (LoRAMoE's two
    expert groups), per record or per dataset.
    The same type is the ``data:`` section of
    :class:`~loramoe_ds.config.RunConfig`: every field below is a YAML key.
    """

    train_files: list[str] = field(default_factory=lambda: ["demo"])
    """JSONL/JSON/Parquet files (or ``save_to_disk`` directories, Hub names) of
    records for a training run; ``demo`` means the shipped demo mix.
    (:func:`~loramoe_ds.data.build_dataloader` takes its paths as an argument.)"""

    datasets: list[DatasetConfig] = field(default_factory=list)
    """A training mix: ``[{path, format, task_type, weight}, ...]``
    (:class:`DatasetConfig`). When given, ``train_files`` is set to the datasets'
    paths (giving both with different paths is an error); when empty,
    ``train_files`` is the mix, each file with ``format`` and no weight."""

    format: str = "auto"
    """Record format of the ``train_files`` (:data:`FORMATS`; ``auto`` detects
    it per file)."""

    loss_on: str = "all_assistant"
    """Chat records: ``all_assistant`` puts the loss on every assistant turn
    (its content and the template's end-of-turn text), ``last_assistant`` on the
    last one only."""

    max_length: int = 512
    """Maximum tokens per example (prompt + response + EOS). A prompt that
    leaves no room for one response token is a bad record; a response that does
    not fit is truncated and counted. A chat record keeps its first
    ``max_length`` tokens (later turns are cut) and is counted as truncated; one
    with no labelled token left is a bad record."""

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
        if not isinstance(self.datasets, list):
            raise ValueError(f"data.datasets={self.datasets!r}: must be a list of datasets")
        specs = []
        for i, d in enumerate(self.datasets):
            try:
                specs.append(d if isinstance(d, DatasetConfig) else DatasetConfig(**dict(d)))
            except (TypeError, ValueError) as e:
                msg = str(e).replace("data.datasets.", f"data.datasets[{i}].")
                if not msg.startswith("data."):
                    msg = f"data.datasets[{i}]={d!r}: {msg}"
                raise ValueError(msg) from None
        self.datasets = specs
        weighted = [d.weight is not None for d in specs]
        if any(weighted) and not all(weighted):
            raise ValueError(
                f"data.datasets={[d.path for d in specs]}: give a weight to every dataset or none"
            )
        if specs:
            paths = [d.path for d in specs]
            if self.train_files not in (["demo"], paths):
                raise ValueError(
                    f"data.train_files={self.train_files!r}: give either train_files or "
                    "datasets, not both"
                )
            self.train_files = paths
        check_choice("data.format", self.format, FORMATS)
        check_choice("data.loss_on", self.loss_on, LOSS_ON)
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
        check_choice("data.template", self.template, TEMPLATES)
        for name, value in self.task_type_names.items():
            if not isinstance(name, str) or value not in (0, 1) or isinstance(value, bool):
                raise ValueError(
                    f"data.task_type_names[{name!r}]={value!r}: must map a name to "
                    "0 (downstream) or 1 (world knowledge)"
                )
        for i, d in enumerate(self.datasets):
            if isinstance(d.task_type, str) and d.task_type not in self.task_type_names:
                raise ValueError(
                    f"data.datasets[{i}].task_type={d.task_type!r}: unknown name; known: "
                    f"{sorted(self.task_type_names)}"
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

    def dataset_specs(self, paths: Sequence[str | os.PathLike[str]]) -> list[DatasetConfig]:
        """The datasets to read for ``paths`` (the caller's resolved ``train_files``).

        With ``datasets`` set and one path per dataset, dataset ``i`` is read
        from ``paths[i]`` (``demo`` may have been resolved by the caller) with
        its own format, task type and weight; otherwise each path is a dataset
        with :attr:`format`, no default task type and no weight.
        """
        paths = [str(p) for p in paths]
        if self.datasets and len(self.datasets) == len(paths):
            return [dataclasses.replace(d, path=p) for d, p in zip(self.datasets, paths)]
        return [DatasetConfig(path=p, format=self.format) for p in paths]
