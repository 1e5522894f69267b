"""Tokenising instruction records into a cached, memory-mapped Arrow dataset.

Each record becomes ``input_ids = prompt_ids + response_ids + [eos]`` with
``prompt_len`` stored beside it; the collator turns that into labels that are
-100 on the prompt (loss only on the response and EOS, as in Alpaca/LoRAMoE
SFT). The prompt is the tokenizer's chat template (user message =
``instruction + "\\n\\n" + input``) when it has one, else a plain
``### Instruction / ### Response`` template.

Tokenisation runs once, on the main process, through ``datasets.Dataset.map``
into a cache directory keyed by a fingerprint of (file contents, tokenizer,
max_length, template, task-type names). Other ranks wait on a barrier and then
``load_from_disk`` the same Arrow files memory-mapped, so a large file is
neither tokenised nor held in RAM once per rank, and a resumed run does not
re-tokenise.

Columns of the cached dataset (one row per kept record, N rows):
    input_ids  list<int32>  prompt + response (+ EOS unless truncated)
    prompt_len int32        tokens of the prompt (labels -100 there)
    task_type  int8         1 world knowledge, 0 downstream
    line       int64        1-based line / record number in its source file
    source     int32        index of the source file in the ``paths`` list
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from loramoe_ds.config import DataConfig
from loramoe_ds.data.chat import ChatEncoder
from loramoe_ds.data.encode import _TOKENIZED_FEATURES, _Tokenize  # noqa: F401  (tests patch _Tokenize here)
from loramoe_ds.data.prompts import (  # noqa: F401  (re-exported: the prompt formats' old home)
    PLAIN_PROMPT,
    PLAIN_PROMPT_WITH_INPUT,
    PromptFormatter,
    user_message,
)
from loramoe_ds.data.records import DataError, DataStats, iter_records
from loramoe_ds.data.sources import resolve_sources

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Bumped whenever the cached layout or tokenisation changes."""

_ARROW_SCHEMA = pa.schema(
    [
        ("instruction", pa.string()),
        ("input", pa.string()),
        ("output", pa.string()),
        ("messages", pa.string()),
        ("task_type", pa.int8()),
        ("task", pa.string()),
        ("source", pa.int32()),
        ("line", pa.int64()),
    ]
)


def default_cache_root() -> Path:
    """``$LORAMOE_DS_CACHE/data`` or ``~/.cache/loramoe_ds/data``."""
    root = os.environ.get("LORAMOE_DS_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "loramoe_ds") / "data"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's identity: class, vocabulary, special tokens, template."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "chat_template"):
        h.update(repr(getattr(tokenizer, name, None)).encode())
    return h.hexdigest()


def dataset_fingerprint(paths: Sequence[Any], tokenizer: Any, cfg: DataConfig) -> str:
    """Cache key for a tokenised dataset; any input that changes the output is in it."""
    sources = resolve_sources(paths, cfg)
    parts = {
        "version": FORMAT_VERSION,
        "files": [s.fingerprint() for s in sources],
        "loss_on": cfg.loss_on,
        "chat_template": ChatEncoder(tokenizer).template,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": cfg.max_length,
        "template": PromptFormatter(tokenizer, cfg).describe(),
        "task_type_names": sorted(cfg.task_type_names.items()),
        "skip_bad_records": cfg.skip_bad_records,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _write_records_arrow(paths: Sequence[Any], cfg: DataConfig, stats: DataStats, out: Path) -> int:
    """Streams validated records into an Arrow IPC file (what ``datasets`` mmaps)."""
    n = 0
    cols: dict[str, list] = {name: [] for name in _ARROW_SCHEMA.names}
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, _ARROW_SCHEMA) as writer:

        def flush() -> None:
            if cols["line"]:
                writer.write_batch(pa.record_batch(cols, schema=_ARROW_SCHEMA))
                for v in cols.values():
                    v.clear()

        for rec in iter_records(list(paths), cfg, stats):
            for k, v in cols.items():
                v.append(rec[k])
            n += 1
            if len(cols["line"]) >= 10_000:
                flush()
        flush()
    return n


def _noop() -> None:
    return None


def _dist_defaults() -> tuple[bool, Callable[[], None]]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0, dist.barrier
    except ImportError:  # pragma: no cover
        pass
    return True, _noop


def load_tokenized(
    paths: str | os.PathLike[str] | Sequence[Any],
    tokenizer: Any,
    cfg: DataConfig | None = None,
    *,
    is_main: bool | None = None,
    barrier: Callable[[], None] | None = None,
) -> tuple[Any, DataStats]:
    """Validates, tokenises (once) and returns the memory-mapped dataset.

    The main process builds the cache if it is missing, then everyone passes
    ``barrier`` and loads it. Without ``torch.distributed`` (or with it not
    initialised) the defaults are ``is_main=True`` and a no-op barrier; with it
    they are ``rank == 0`` and ``dist.barrier``. On multi-node jobs without a
    shared filesystem pass ``is_main=(local_rank == 0)`` and a barrier.

    Args:
        paths: One dataset or a list (files: JSONL, JSON, Parquet; ``save_to_disk``
            directories; Hub names), concatenated; with ``cfg.datasets`` one
            path per dataset (:meth:`DataConfig.dataset_specs`).
        tokenizer: A Hugging Face tokenizer with an EOS token.
        cfg: Pipeline config; defaults to ``DataConfig()``.
        is_main: Whether this process builds the cache and logs.
        barrier: Called once by every process between build and load.

    Returns:
        ``(dataset, stats)``: a ``datasets.Dataset`` with the columns in the
        module docstring (Arrow on disk, memory-mapped) and the
        :class:`DataStats` of the build (``cache_hit`` True when reused).

    Raises:
        DataError: On a bad record (``path:line: field ...``) unless
            ``cfg.skip_bad_records``, or when no record survives.
    """
    import datasets

    cfg = cfg or DataConfig()
    paths = resolve_sources(paths, cfg)
    d_main, d_barrier = _dist_defaults()
    is_main = d_main if is_main is None else is_main
    barrier = barrier or d_barrier

    root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_root()
    key = dataset_fingerprint(paths, tokenizer, cfg)
    final = root / key
    built_here = False
    err: BaseException | None = None
    if is_main and not (final / "stats.json").is_file():
        try:
            _build(paths, tokenizer, cfg, final)
            built_here = True
        except BaseException as e:  # other ranks must not hang on the barrier
            err = e
    barrier()
    if err is not None:
        raise err
    if not (final / "stats.json").is_file():
        raise DataError(
            f"tokenised cache {final} missing after the barrier: the main process failed "
            "to build it (see its log) or cache_dir is not shared between ranks"
        )
    if not is_main:
        datasets.disable_progress_bars()
    ds = datasets.load_from_disk(str(final / "dataset"))
    stats = DataStats.from_dict(json.loads((final / "stats.json").read_text()))
    stats.cache_hit = not built_here
    plan_shares(stats, [p.spec.weight for p in paths])
    if is_main:
        logger.info(
            "data %s: %s%s",
            ", ".join(Path(p.name).name for p in paths),
            stats.summary(),
            " (cached)" if stats.cache_hit else "",
        )
        for msg in stats.bad_examples:
            logger.warning("skipped bad record: %s", msg)
    return ds, stats


def plan_shares(stats: DataStats, weights: Sequence[float | None]) -> None:
    """Sets each dataset's ``weight`` and planned ``share`` in ``stats.per_dataset``."""
    from loramoe_ds.data.mix import quotas

    sizes = [d["records"] for d in stats.per_dataset]
    total = sum(sizes)
    if all(w is not None for w in weights) and total:
        draws = quotas(weights, total)  # type: ignore[arg-type]
    else:
        draws = sizes
    for d, w, c in zip(stats.per_dataset, weights, draws):
        d["weight"], d["share"] = w, c / max(total, 1)


def _build(paths: list[Any], tokenizer: Any, cfg: DataConfig, final: Path) -> None:
    """Builds the cache directory ``final`` atomically (temp dir, then rename)."""
    import datasets
    import pyarrow.compute as pc

    t0 = time.perf_counter()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        stats = DataStats()
        raw_path = tmp / "records.arrow"
        n = _write_records_arrow(paths, cfg, stats, raw_path)
        if n == 0:
            raise DataError(
                f"{', '.join(p.name for p in paths)}: no valid records "
                f"({stats.records_read} read, {stats.bad_records} bad)"
            )
        raw = datasets.Dataset.from_file(str(raw_path))
        tok = raw.map(
            _Tokenize(tokenizer, cfg, paths),
            batched=True,
            batch_size=1000,
            num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
            remove_columns=["instruction", "input", "output", "messages", "task"],
            features=_TOKENIZED_FEATURES(),
            cache_file_name=str(tmp / "tokenized.arrow"),
            new_fingerprint=final.name,
            desc="tokenising",
        )
        bad_col = tok.data.column("bad")
        is_bad = pc.not_equal(bad_col, "")
        n_bad = pc.sum(is_bad).as_py() or 0
        if n_bad:
            for msg in tok.filter(lambda b: b != "", input_columns="bad")["bad"]:
                reason = (
                    "prompt too long"
                    if "max_length" in msg
                    else "template not incremental"
                    if "turn by turn" in msg
                    else "empty output"
                )
                stats.record_bad(DataError(msg), reason)
            tok = tok.filter(lambda b: b == "", input_columns="bad", keep_in_memory=False)
            tok = tok.flatten_indices(cache_file_name=str(tmp / "kept.arrow"))
        stats.truncated = pc.sum(tok.data.column("truncated")).as_py() or 0
        tok = tok.remove_columns(["bad", "truncated"])
        stats.records_kept = len(tok)
        lengths = pc.list_value_length(tok.data.column("input_ids"))
        stats.tokens = pc.sum(lengths).as_py() or 0
        spans = pc.list_flatten(tok.data.column("label_spans")).to_numpy().reshape(-1, 2)
        n_spans = pc.list_value_length(tok.data.column("label_spans")).to_numpy() // 2
        span_rec = np.repeat(np.arange(len(tok)), n_spans)
        src = tok.data.column("source").to_numpy()
        n_lab = np.bincount(span_rec, spans[:, 1] - spans[:, 0], minlength=len(tok))
        stats.label_tokens = int(n_lab.sum())
        len_N = lengths.to_numpy()
        stats.per_dataset = [
            {
                "name": Path(p.name).name if p.kind != "hub" else p.name,
                "records": int((src == i).sum()),
                "tokens": int(len_N[src == i].sum()),
                "label_tokens": int(n_lab[src == i].sum()),
            }
            for i, p in enumerate(paths)
        ]
        tok.save_to_disk(str(tmp / "dataset"))
        del tok, raw
        (tmp / "records.arrow").unlink()
        (tmp / "tokenized.arrow").unlink(missing_ok=True)
        (tmp / "kept.arrow").unlink(missing_ok=True)
        for extra in tmp.glob("cache-*.arrow"):
            extra.unlink()
        (tmp / "stats.json").write_text(json.dumps(stats.to_dict(), indent=1))
        tmp.chmod(0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "stats.json").is_file():
                raise
        logger.info("tokenised %d records in %.1f s -> %s", n, time.perf_counter() - t0, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
