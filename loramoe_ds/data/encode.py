"""The tokenisation step of :func:`loramoe_ds.data.tokenize.load_tokenized`: one batched
``Dataset.map`` function turning validated records into ``input_ids``, ``prompt_len`` and
``label_spans`` (alpaca records: prompt + response + EOS; chat records:
:class:`~loramoe_ds.data.chat.ChatEncoder`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from loramoe_ds.config import DataConfig
from loramoe_ds.data.chat import ChatEncoder, ChatRecordError
from loramoe_ds.data.prompts import PromptFormatter
from loramoe_ds.data.records import DataError


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one before building the dataset")
    return int(eos)


def _TOKENIZED_FEATURES() -> Any:
    import datasets

    return datasets.Features(
        {
            "task_type": datasets.Value("int8"),
            "source": datasets.Value("int32"),
            "line": datasets.Value("int64"),
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "prompt_len": datasets.Value("int32"),
            "label_spans": datasets.Sequence(datasets.Value("int32")),
            "truncated": datasets.Value("bool"),
            "bad": datasets.Value("string"),
        }
    )


class _Tokenize:
    """The batched ``Dataset.map`` function (a class so it pickles for num_proc>1)."""

    def __init__(self, tokenizer: Any, cfg: DataConfig, paths: Sequence[Any]) -> None:
        self.tokenizer = tokenizer
        self.fmt = PromptFormatter(tokenizer, cfg)
        self.max_length = cfg.max_length
        self.skip_bad = cfg.skip_bad_records
        self.eos = _eos_id(tokenizer)
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix = [int(bos)] if (self.fmt.kind == "plain" and bos is not None) else []
        self.paths = [getattr(p, "name", str(p)) for p in paths]
        self.chat = ChatEncoder(tokenizer, cfg.loss_on, cfg.system_prompt)

    def _chat(self, turns_json: str, where: str, out: dict[str, list]) -> None:
        """Appends one chat record's row (chat rule of :mod:`loramoe_ds.data.chat`)."""
        try:
            ids, spans, truncated = self.chat.encode(json.loads(turns_json), self.max_length)
            bad = ""
            if not spans:
                bad = (
                    f"{where}: field 'messages': no assistant token within "
                    f"max_length={self.max_length} (the conversation before it is longer)"
                )
        except ChatRecordError as e:
            bad = f"{where}: {e}"
            ids, spans, truncated = [self.eos], [], False
        if bad and not self.skip_bad:
            raise DataError(bad)
        out["input_ids"].append(ids)
        out["prompt_len"].append(spans[0] if spans else len(ids))
        out["label_spans"].append(spans)
        out["truncated"].append(truncated and not bad)
        out["bad"].append(bad)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(batch["instruction"])
        chat = batch.get("messages") or [""] * n
        alpaca = [j for j in range(n) if not chat[j]]
        prompts = [self.fmt(batch["instruction"][j], batch["input"][j]) for j in alpaca]
        tok = self.tokenizer
        p_all, r_all = [], []
        if alpaca:
            p_all = tok(prompts, add_special_tokens=False)["input_ids"]
            r_all = tok([batch["output"][j] for j in alpaca], add_special_tokens=False)["input_ids"]
        p_ids: list[Any] = [None] * n
        r_ids: list[Any] = [None] * n
        for j, p, r in zip(alpaca, p_all, r_all):
            p_ids[j], r_ids[j] = p, r
        out: dict[str, list] = {
            "input_ids": [], "prompt_len": [], "label_spans": [], "truncated": [], "bad": []
        }  # fmt: skip
        for j, (p, r) in enumerate(zip(p_ids, r_ids)):
            if chat[j]:
                where = f"{self.paths[batch['source'][j]]}:{batch['line'][j]}"
                self._chat(chat[j], where, out)
                continue
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
            out["label_spans"].append([len(p), min(len(ids), self.max_length)])
            out["truncated"].append(truncated and not bad)
            out["bad"].append(bad)
        return out
