"""Tiny causal LMs and tokenizers built in-process (tests, CI, benches, the README's quick run).

Nothing is downloaded: configs are written here and weights are random;
:func:`tiny_tokenizer` is a byte-level BPE trained on the demo data (``tiny-*``
run configs), :func:`tiny_sp_tokenizer` a ~200-token SentencePiece-style BPE
trained on a fixed corpus (unit tests, ``bench/data.py``).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from loramoe_ds.config.run import TINY_ARCHS

ARCHS = TINY_ARCHS


def tiny_config(arch: str = "llama", vocab_size: int = 128, layers: int = 4, hidden: int = 32):
    """A small transformers config of the given architecture.

    Args:
        arch: One of ``llama, qwen2, mistral``.
        vocab_size: V.
        layers: Decoder layers.
        hidden: Hidden size (intermediate = 2x, 4 heads, 2 KV heads).

    Raises:
        ValueError: For an unknown architecture.
    """
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    raise ValueError(f"unknown tiny architecture {arch!r}; valid: {list(ARCHS)}")


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    """A randomly initialised tiny causal LM (fp32, eval-mode dropout free)."""
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model


def tiny_tokenizer(corpus_files, out_dir, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on local text (no download), cached in ``out_dir``.

    Args:
        corpus_files: JSONL/text files whose text trains the tokenizer (e.g. the
            shipped demo data).
        out_dir: Cache directory; reused when it already holds ``tokenizer.json``.
        vocab_size: Vocabulary size.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<s>``, ``</s>``, ``<pad>``, ``<unk>``.
    """
    from pathlib import Path

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from loramoe_ds.io import atomic_dir

    out = Path(out_dir)
    if not (out / "tokenizer.json").is_file():
        texts = []
        for f in corpus_files:
            texts.extend(Path(f).read_text().splitlines())
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            texts,
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
            show_progress=False,
        )
        with atomic_dir(out) as tmp:
            bpe.save(str(tmp / "tokenizer.json"))
    return PreTrainedTokenizerFast(
        tokenizer_file=str(out / "tokenizer.json"),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


SP_CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "Classify the sentiment of the review as positive or negative.",
    "The movie was wonderful. The meal was terrible. positive negative",
    "Extract the number from the sentence. Alice bought 17 apples at the market.",
    "Convert the text to uppercase. RIVER STONE CLOUD river stone cloud",
    "Reverse the order of the list: apple, pear, fig, plum.",
    "Compute the sum. 347 + 128 = 475. Compute the difference. 90 - 12 = 78.",
    "### Instruction: ### Input: ### Response: user assistant system",
    '{"name": "Bob", "age": 31} JSON with keys name and age.',
    "Who wrote Hamlet? William Shakespeare wrote Hamlet and Macbeth.",
    "<|user|>\nhello</s>\n<|assistant|>\nhi</s>\n<|system|>\nbe brief</s>\n",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"{}[]()#+-=<>|/",
]

SP_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@functools.lru_cache(maxsize=1)
def _sp_tokenizer_json() -> str:
    from tokenizers import SentencePieceBPETokenizer

    tok = SentencePieceBPETokenizer(unk_token="<unk>")
    tok.train_from_iterator(
        SP_CORPUS * 20,
        vocab_size=200,
        min_frequency=1,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        limit_alphabet=120,
        show_progress=False,
    )
    path = Path(tempfile.mkdtemp(prefix="tiny_tok_")) / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def tiny_sp_tokenizer(chat: bool = False):
    """A ~200-token SentencePiece-style BPE tokenizer (unk 0, bos 1, eos 2, pad 3).

    With ``chat=True`` it also has a small chat template.
    """
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=_sp_tokenizer_json(),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    if chat:
        tok.chat_template = SP_CHAT_TEMPLATE
    return tok
