"""Batch collation: right padding, prompt/padding labels masked with -100.

Shapes: B examples per batch, S padded sequence length.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100
"""Label value ignored by ``torch.nn.functional.cross_entropy``."""


class Collator:
    """Pads tokenised examples into a batch of LongTensors.

    Each example is a mapping with ``input_ids`` (list of ints), ``prompt_len``
    and ``task_type``, as produced by :func:`loramoe_ds.data.load_tokenized`.

    Args:
        pad_token_id: Id written into padding positions of ``input_ids``.
        pad_to_multiple_of: Round S up to a multiple of this (None: longest).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collates a list of examples.

        Returns:
            ``input_ids_BS``, ``attention_mask_BS`` (1 on tokens, 0 on padding),
            ``labels_BS`` (token ids on the response and EOS, -100 on prompt and
            padding) and ``task_type_B``, all ``torch.long``, under the keys
            ``input_ids``, ``attention_mask``, ``labels``, ``task_type``.
        """
        B = len(examples)
        S = max(len(e["input_ids"]) for e in examples)
        m = self.pad_to_multiple_of
        if m:
            S = (S + m - 1) // m * m
        input_ids_BS = torch.full((B, S), self.pad_token_id, dtype=torch.long)
        attention_mask_BS = torch.zeros((B, S), dtype=torch.long)
        labels_BS = torch.full((B, S), IGNORE_INDEX, dtype=torch.long)
        task_type_B = torch.empty(B, dtype=torch.long)
        for b, e in enumerate(examples):
            ids_L = torch.as_tensor(e["input_ids"], dtype=torch.long)
            L, P = ids_L.numel(), int(e["prompt_len"])
            input_ids_BS[b, :L] = ids_L
            attention_mask_BS[b, :L] = 1
            labels_BS[b, P:L] = ids_L[P:]
            task_type_B[b] = int(e["task_type"])
        return {
            "input_ids": input_ids_BS,
            "attention_mask": attention_mask_BS,
            "labels": labels_BS,
            "task_type": task_type_B,
        }


def pad_id_for(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (padding is masked anyway)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad_token nor eos_token")
    return int(pad)
