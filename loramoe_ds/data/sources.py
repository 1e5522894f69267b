"""Where a dataset's records come from: a file, a ``save_to_disk`` directory or the Hub.

A :class:`~loramoe_ds.config.DatasetConfig` path is read as

- a JSONL / JSON / Parquet file (:func:`loramoe_ds.data.records.iter_records`);
- a directory written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``
  one, whose ``train`` split is read);
- otherwise a Hugging Face Hub dataset name, loaded with
  ``datasets.load_dataset(name, split="train")``. Offline (or when the name does
  not exist) this is a one-line :class:`~loramoe_ds.data.records.DataError`.

Records of a directory or Hub dataset are numbered from 1 in error messages
(``name:N: ...``), like the records of a Parquet file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramoe_ds.config import DataConfig, DatasetConfig

FILE_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet")
"""File types read as record files."""


def file_fingerprint(path: Path) -> str:
    """Content hash of one file (blake2b, streamed: ~1 s per GB)."""
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Source:
    """One resolved dataset of a run: its spec, kind and location."""

    spec: DatasetConfig
    """The dataset's format, default task type and weight."""

    kind: str
    """``file``, ``disk`` (a ``save_to_disk`` directory) or ``hub``."""

    location: str
    """The resolved file or directory path, or the Hub name."""

    _dataset: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """What error messages and logs call it."""
        return self.location

    def _hf(self) -> Any:
        import datasets

        if self._dataset is None:
            if self.kind == "disk":
                ds = datasets.load_from_disk(self.location)
                if isinstance(ds, datasets.DatasetDict):
                    if "train" not in ds:
                        raise _data_error(
                            f"{self.location}: a DatasetDict without a 'train' split "
                            f"(splits {list(ds)})"
                        )
                    ds = ds["train"]
            else:
                try:
                    ds = datasets.load_dataset(self.location, split="train")
                except Exception as e:  # any failure is one line naming the dataset
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    raise _data_error(
                        f"{self.location}: not a local file or directory, and loading it as a "
                        f"Hugging Face Hub dataset failed ({type(e).__name__}: {first[:200]}); "
                        "offline, download it first or give a local path"
                    ) from None
            self._dataset = ds
        return self._dataset

    def rows(self) -> Iterator[tuple[int, Any]]:
        """``(line_or_record_number, raw_record)`` in order (bad lines as error objects)."""
        if self.kind == "file":
            from loramoe_ds.data.raw import _iter_raw

            yield from _iter_raw(Path(self.location))
            return
        yield from enumerate(self._hf(), start=1)

    def fingerprint(self) -> list[Any]:
        """What identifies this dataset's contents (goes into the cache key)."""
        spec = [self.spec.format, self.spec.task_type]
        if self.kind == "file":
            p = Path(self.location)
            return [p.name, p.stat().st_size, file_fingerprint(p), *spec]
        if self.kind == "disk":
            files = sorted(f for f in Path(self.location).rglob("*") if f.is_file())
            return [[str(f.relative_to(self.location)), file_fingerprint(f)] for f in files] + spec
        return [self.location, self._hf()._fingerprint, *spec]


def _data_error(msg: str) -> Exception:
    from loramoe_ds.data.raw import DataError

    return DataError(msg)


def resolve_sources(
    paths: str | Path | Sequence[str | Path] | Sequence[Source], cfg: DataConfig
) -> list[Source]:
    """The :class:`Source` of every dataset (:meth:`DataConfig.dataset_specs` of ``paths``).

    Raises:
        DataError: For a missing file, a directory that is not a saved dataset,
            or an unsupported file type.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if paths and all(isinstance(p, Source) for p in paths):
        return list(paths)  # type: ignore[arg-type]
    out = []
    for spec in cfg.dataset_specs(paths):  # type: ignore[arg-type]
        p = Path(spec.path).expanduser()
        if p.is_file():
            out.append(Source(spec, "file", str(p.resolve())))
        elif p.is_dir():
            if not any((p / f).is_file() for f in ("state.json", "dataset_dict.json")):
                raise _data_error(
                    f"{p}: a directory but not a saved dataset (no state.json or "
                    "dataset_dict.json from datasets' save_to_disk)"
                )
            out.append(Source(spec, "disk", str(p.resolve())))
        elif p.suffix.lower() in FILE_SUFFIXES or p.is_absolute() or spec.path.startswith("."):
            raise _data_error(f"{p.resolve()}: file not found")
        else:
            out.append(Source(spec, "hub", spec.path))
    return out
