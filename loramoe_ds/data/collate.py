"""Batch collation: right padding, prompt/padding labels masked with -100.

Shapes: B examples (or packed rows) per batch, S padded sequence length.

:class:`Collator` puts one record per sequence; :class:`PackedCollator` puts
several records per row (transformers' packed-batch convention: ``position_ids``
restart at 0 for each record, so attention never crosses a record boundary when
the model is given ``position_ids`` and no 2-D attention mask).
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100
"""Label value ignored by ``torch.nn.functional.cross_entropy``."""


def _padded_batch(B: int, longest: int, multiple: int | None, pad_token_id: int):
    """``S`` (``longest`` rounded up to ``multiple``) and the ``(B, S)`` padding-filled
    ``input_ids`` (pad id), ``attention_mask`` (0) and ``labels`` (-100)."""
    S = (longest + multiple - 1) // multiple * multiple if multiple else longest
    input_ids_BS = torch.full((B, S), pad_token_id, dtype=torch.long)
    attention_mask_BS = torch.zeros((B, S), dtype=torch.long)
    labels_BS = torch.full((B, S), IGNORE_INDEX, dtype=torch.long)
    return S, input_ids_BS, attention_mask_BS, labels_BS


def label_spans(e: dict[str, Any], L: int) -> list[tuple[int, int]]:
    """The labelled ``[start, end)`` token ranges of an example: its ``label_spans``
    (flat ``[s0, e0, s1, e1, ...]``, chat records) when present, else ``[prompt_len, L)``."""
    flat = e.get("label_spans")
    if flat is None:
        return [(int(e["prompt_len"]), L)]
    return [(int(a), int(b)) for a, b in zip(flat[::2], flat[1::2])]


class Collator:
    """Pads tokenised examples into a batch of LongTensors.

    Each example is a mapping with ``input_ids`` (list of ints), ``prompt_len``
    and ``task_type``, as produced by :func:`loramoe_ds.data.load_tokenized`;
    with ``label_spans`` (:func:`label_spans`) only those ranges are labelled.

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
        longest = max(len(e["input_ids"]) for e in examples)
        S, input_ids_BS, attention_mask_BS, labels_BS = _padded_batch(
            B, longest, self.pad_to_multiple_of, self.pad_token_id
        )
        task_type_B = torch.empty(B, dtype=torch.long)
        for b, e in enumerate(examples):
            ids_L = torch.as_tensor(e["input_ids"], dtype=torch.long)
            L = ids_L.numel()
            input_ids_BS[b, :L] = ids_L
            attention_mask_BS[b, :L] = 1
            for P, E in label_spans(e, L):
                labels_BS[b, P:E] = ids_L[P:E]
            task_type_B[b] = int(e["task_type"])
        return {
            "input_ids": input_ids_BS,
            "attention_mask": attention_mask_BS,
            "labels": labels_BS,
            "task_type": task_type_B,
        }


class PackedCollator:
    """Collates packed rows (each a list of tokenised examples) into a batch.

    Row ``b`` holds records ``j = 0, 1, ...`` back to back, then padding up to S
    (the longest row, rounded up to ``pad_to_multiple_of``). Per position t:

    - ``input_ids[b, t]``: the record's token; ``pad_token_id`` on padding.
    - ``labels[b, t]``: the token on the record's response and EOS; -100 on its
      prompt, on padding, and always on a record's first token (the loss at t
      predicts ``labels[t]`` from tokens ``< t``: a record's first token is never
      predicted from the previous record).
    - ``position_ids[b, t]``: ``t - start_j`` (0 at each record's start); the
      padding counts on from 0 as one more block, so it never continues a record.
    - ``seq_ids[b, t]``: ``j``; -1 on padding.
    - ``task_type[b, t]``: the record's task type (1 world knowledge, 0
      downstream); 0 on padding (ignored there).
    - ``attention_mask[b, t]``: 1 on record tokens, 0 on padding (token
      counting only: in packed mode the model attends by ``position_ids``).

    With ``flash_attn_kwargs=True`` the batch also carries transformers'
    ``FlashAttentionKwargs`` for the varlen flash-attention path, over the B*S
    tokens read as one flattened sequence (as ``DataCollatorWithFlattening``
    does): ``cu_seq_lens_q`` = ``cu_seq_lens_k`` (int32, boundaries of every
    record and of every row's padding block) and ``max_length_q`` =
    ``max_length_k`` (int). transformers' flash path infers varlen boundaries
    from ``position_ids`` only for a batch of one row; with these kwargs it
    works for any B. SDPA and eager ignore them.

    Args:
        pad_token_id: Id written into padding positions of ``input_ids``.
        pad_to_multiple_of: Round S up to a multiple of this (None: longest row).
        flash_attn_kwargs: Add the flash-attention varlen kwargs.
    """

    def __init__(
        self,
        pad_token_id: int,
        pad_to_multiple_of: int | None = None,
        flash_attn_kwargs: bool = False,
    ) -> None:
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.flash_attn_kwargs = flash_attn_kwargs

    def __call__(self, rows: list[list[dict[str, Any]]]) -> dict[str, Any]:
        """Collates a list of rows.

        Returns:
            ``torch.long`` tensors ``input_ids``, ``attention_mask``, ``labels``,
            ``position_ids``, ``seq_ids`` and ``task_type``, all ``(B, S)``
            (plus the flash-attention kwargs when asked for).
        """
        B = len(rows)
        longest = max(sum(len(e["input_ids"]) for e in row) for row in rows)
        S, input_ids_BS, attention_mask_BS, labels_BS = _padded_batch(
            B, longest, self.pad_to_multiple_of, self.pad_token_id
        )
        position_ids_BS = torch.empty((B, S), dtype=torch.long)
        seq_ids_BS = torch.full((B, S), -1, dtype=torch.long)
        task_type_BS = torch.zeros((B, S), dtype=torch.long)
        for b, row in enumerate(rows):
            t = 0
            for j, e in enumerate(row):
                ids_L = torch.as_tensor(e["input_ids"], dtype=torch.long)
                L = ids_L.numel()
                input_ids_BS[b, t : t + L] = ids_L
                attention_mask_BS[b, t : t + L] = 1
                for P, E in label_spans(e, L):
                    P = max(P, 1)
                    labels_BS[b, t + P : t + E] = ids_L[P:E]
                position_ids_BS[b, t : t + L] = torch.arange(L)
                seq_ids_BS[b, t : t + L] = j
                task_type_BS[b, t : t + L] = int(e["task_type"])
                t += L
            position_ids_BS[b, t:] = torch.arange(S - t)
        out: dict[str, Any] = {
            "input_ids": input_ids_BS,
            "attention_mask": attention_mask_BS,
            "labels": labels_BS,
            "position_ids": position_ids_BS,
            "seq_ids": seq_ids_BS,
            "task_type": task_type_BS,
        }
        if self.flash_attn_kwargs:
            pos_T = position_ids_BS.reshape(-1)
            starts = torch.nonzero(pos_T == 0).reshape(-1)
            cu = torch.cat([starts, torch.tensor([pos_T.numel()])]).to(torch.int32)
            longest = int((cu[1:] - cu[:-1]).max())
            out.update(
                cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest
            )
        return out


def pad_id_for(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (padding is masked anyway)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad_token nor eos_token")
    return int(pad)
