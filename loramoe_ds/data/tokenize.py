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

import pyarrow as pa

from loramoe_ds.data.config import DataConfig
from loramoe_ds.data.records import DataError, DataStats, iter_records

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped whenever the cached layout or tokenisation changes."""

PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PLAIN_PROMPT_WITH_INPUT = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

_ARROW_SCHEMA = pa.schema(
    [
        ("instruction", pa.string()),
        ("input", pa.string()),
        ("output", pa.string()),
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


def user_message(instruction: str, inp: str) -> str:
    """The user turn: the instruction, then a blank line and the input if any."""
    return f"{instruction}\n\n{inp}" if inp else instruction


class PromptFormatter:
    """Renders prompts (everything before the response) for one tokenizer.

    With a chat template the template is rendered once around a sentinel and
    split into a prefix and suffix, so formatting a million prompts is string
    concatenation rather than a million Jinja renders; templates that depend on
    the content fall back to rendering per record.

    Args:
        tokenizer: A Hugging Face tokenizer.
        cfg: Supplies ``template`` and ``system_prompt``.
    """

    _SENTINELS = ("\x00LORAMOE_A\x00", "\x00LORAMOE_BB\x00")

    def __init__(self, tokenizer: Any, cfg: DataConfig) -> None:
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if cfg.template == "chat" and not has_chat:
            raise ValueError("DataConfig.template='chat' but the tokenizer has no chat_template")
        use_chat = cfg.template == "chat" or (cfg.template == "auto" and has_chat)
        self.kind = "chat" if use_chat else "plain"
        self.tokenizer = tokenizer
        self.system_prompt = cfg.system_prompt
        self._split: tuple[str, str] | None = None
        if self.kind == "chat":
            a, b = (self._render(s) for s in self._SENTINELS)
            pa_, sa = a.split(self._SENTINELS[0]) if a.count(self._SENTINELS[0]) == 1 else ("", "")
            if pa_ + self._SENTINELS[1] + sa == b:
                self._split = (pa_, sa)

    def _render(self, content: str) -> str:
        messages = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": content})
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )

    def __call__(self, instruction: str, inp: str) -> str:
        """Returns the prompt text for one record."""
        if self.kind == "plain":
            if inp:
                return PLAIN_PROMPT_WITH_INPUT.format(instruction=instruction, input=inp)
            return PLAIN_PROMPT.format(instruction=instruction)
        content = user_message(instruction, inp)
        if self._split is not None:
            return self._split[0] + content + self._split[1]
        return self._render(content)

    def describe(self) -> str:
        """A string identifying the rendered format (goes into the fingerprint)."""
        if self.kind == "plain":
            return "plain:" + PLAIN_PROMPT_WITH_INPUT
        return "chat:" + self._render("{content}")


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one before building the dataset")
    return int(eos)


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


def file_fingerprint(path: Path) -> str:
    """Content hash of one file (blake2b, streamed: ~1 s per GB)."""
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def dataset_fingerprint(paths: Sequence[Path], tokenizer: Any, cfg: DataConfig) -> str:
    """Cache key for a tokenised dataset; any input that changes the output is in it."""
    parts = {
        "version": FORMAT_VERSION,
        "files": [[p.name, p.stat().st_size, file_fingerprint(p)] for p in paths],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": cfg.max_length,
        "template": PromptFormatter(tokenizer, cfg).describe(),
        "task_type_names": sorted(cfg.task_type_names.items()),
        "skip_bad_records": cfg.skip_bad_records,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _write_records_arrow(
    paths: Sequence[Path], cfg: DataConfig, stats: DataStats, out: Path
) -> int:
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


def _TOKENIZED_FEATURES() -> Any:
    import datasets

    return datasets.Features(
        {
            "task_type": datasets.Value("int8"),
            "source": datasets.Value("int32"),
            "line": datasets.Value("int64"),
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "prompt_len": datasets.Value("int32"),
            "truncated": datasets.Value("bool"),
            "bad": datasets.Value("string"),
        }
    )


class _Tokenize:
    """The batched ``Dataset.map`` function (a class so it pickles for num_proc>1)."""

    def __init__(self, tokenizer: Any, cfg: DataConfig, paths: Sequence[Path]) -> None:
        self.tokenizer = tokenizer
        self.fmt = PromptFormatter(tokenizer, cfg)
        self.max_length = cfg.max_length
        self.skip_bad = cfg.skip_bad_records
        self.eos = _eos_id(tokenizer)
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix = [int(bos)] if (self.fmt.kind == "plain" and bos is not None) else []
        self.paths = [str(p) for p in paths]

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        prompts = [self.fmt(i, x) for i, x in zip(batch["instruction"], batch["input"])]
        tok = self.tokenizer
        p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        r_ids = tok(batch["output"], add_special_tokens=False)["input_ids"]
        out: dict[str, list] = {"input_ids": [], "prompt_len": [], "truncated": [], "bad": []}
        for j, (p, r) in enumerate(zip(p_ids, r_ids)):
            p = self.prefix + p
            bad = ""
            if len(p) >= self.max_length:
                where = f"{self.paths[batch['source'][j]]}:{batch['line'][j]}"
                msg = (
                    f"{where}: field 'instruction'/'input': prompt is {len(p)} tokens, "
                    f"max_length={self.max_length} leaves no room for the response"
                )
                if not self.skip_bad:
                    raise DataError(msg)
                bad = msg
            ids = p + r + [self.eos]
            truncated = len(ids) > self.max_length
            if not r:
                where = f"{self.paths[batch['source'][j]]}:{batch['line'][j]}"
                bad = bad or f"{where}: field 'output' is empty after tokenisation"
                if not self.skip_bad:
                    raise DataError(bad)
            out["input_ids"].append(ids[: self.max_length])
            out["prompt_len"].append(len(p))
            out["truncated"].append(truncated and not bad)
            out["bad"].append(bad)
        return out


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
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
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
        paths: One file or a list of files (JSONL, JSON, Parquet), concatenated.
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
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p).resolve() for p in paths]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: file not found")
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
    if is_main:
        logger.info(
            "data %s: %s%s",
            ", ".join(p.name for p in paths),
            stats.summary(),
            " (cached)" if stats.cache_hit else "",
        )
        for msg in stats.bad_examples:
            logger.warning("skipped bad record: %s", msg)
    return ds, stats


def _build(paths: list[Path], tokenizer: Any, cfg: DataConfig, final: Path) -> None:
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
                f"{', '.join(map(str, paths))}: no valid records "
                f"({stats.records_read} read, {stats.bad_records} bad)"
            )
        raw = datasets.Dataset.from_file(str(raw_path))
        tok = raw.map(
            _Tokenize(tokenizer, cfg, paths),
            batched=True,
            batch_size=1000,
            num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
            remove_columns=["instruction", "input", "output", "task"],
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
                reason = "prompt too long" if "max_length" in msg else "empty output"
                stats.record_bad(DataError(msg), reason)
            tok = tok.filter(lambda b: b == "", input_columns="bad", keep_in_memory=False)
        stats.truncated = pc.sum(tok.data.column("truncated")).as_py() or 0
        tok = tok.remove_columns(["bad", "truncated"])
        stats.records_kept = len(tok)
        lengths = pc.list_value_length(tok.data.column("input_ids"))
        stats.tokens = pc.sum(lengths).as_py() or 0
        stats.label_tokens = stats.tokens - (pc.sum(tok.data.column("prompt_len")).as_py() or 0)
        tok.save_to_disk(str(tmp / "dataset"))
        del tok, raw
        (tmp / "records.arrow").unlink()
        (tmp / "tokenized.arrow").unlink(missing_ok=True)
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
