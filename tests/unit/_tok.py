"""A tiny SentencePiece-style tokenizer trained in-process (offline, fast) for tests."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

CORPUS = [
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

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import SentencePieceBPETokenizer

    tok = SentencePieceBPETokenizer(unk_token="<unk>")
    tok.train_from_iterator(
        CORPUS * 20,
        vocab_size=200,
        min_frequency=1,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        limit_alphabet=120,
        show_progress=False,
    )
    path = Path(tempfile.mkdtemp(prefix="tiny_tok_")) / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def tiny_tokenizer(chat: bool = False):
    """A ~200-token SentencePiece-style BPE tokenizer (unk 0, bos 1, eos 2, pad 3).

    With ``chat=True`` it also has a small chat template.
    """
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=_tokenizer_json(),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok
