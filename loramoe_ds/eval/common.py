"""Shared evaluation primitives: loading, prompt encoding, batched greedy generation and
answer log-likelihoods.

Shape legend: B sequences in a batch, S positions, D hidden, V vocabulary,
N answer (scored) positions in a batch.

Prompts are rendered exactly as in training (:class:`~loramoe_ds.data.PromptFormatter`:
the chat template when the tokenizer has one, else the plain
``### Instruction / ### Response`` template with a BOS prefix), and answers are
tokenised on their own without special tokens, as the training tokeniser does
(``prompt_ids + response_ids``), so the scored tokens are the tokens the model
was trained to produce.

Everything here runs on a single device with plain PyTorch/transformers; a
:class:`~loramoe_ds.model.lm.LoRAMoEModel` is evaluated through its injected
HF model (``model.base``), whose linears carry the experts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loramoe_ds.base_model import resolve_model_dir
from loramoe_ds.config import DataConfig
from loramoe_ds.data.collate import pad_id_for
from loramoe_ds.data.tokenize import PromptFormatter
from loramoe_ds.model.adapter_io import ADAPTER_CONFIG, load_adapter
from loramoe_ds.model.lm import LoRAMoEModel

DEFAULT_BATCH_SIZE = 16
"""Sequences per forward (generation and scoring)."""


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a launched job (side effects on rank 0 only)."""
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def take_limit(records: Sequence[dict], limit: int | None) -> list[dict]:
    """The first ``limit`` records in round-robin order over their ``task`` field.

    Eval files are often grouped by task; taking the first N lines would test one
    task only. Round-robin keeps every task represented (within a task the file
    order is kept) and is deterministic. ``None`` returns all records unchanged.
    """
    if limit is None or limit >= len(records):
        return list(records)
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(str(r.get("task", "")), []).append(r)
    queues = list(by_task.values())
    out: list[dict] = []
    depth = 0
    while len(out) < limit:
        for q in queues:
            if depth < len(q) and len(out) < limit:
                out.append(q[depth])
        depth += 1
    return out


def read_jsonl(path: str | os.PathLike[str], limit: int | None = None) -> list[dict]:
    """Reads evaluation records (one JSON object per line; blank lines skipped).

    Args:
        path: JSONL file.
        limit: Keep ``limit`` records, round-robin over tasks (:func:`take_limit`);
            ``None``: all.

    Raises:
        ValueError: On a line that is not a JSON object (file and line named).
    """
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            for key in ("instruction", "output"):
                if not isinstance(rec.get(key), str):
                    raise ValueError(f"{path}:{lineno}: field {key!r} missing or not a string")
            out.append(rec)
    return take_limit(out, limit)


def hf_model(model: nn.Module) -> nn.Module:
    """The ``transformers`` model to call: ``model.base`` for a LoRAMoE wrapper."""
    return model.base if isinstance(model, LoRAMoEModel) else model


class PromptEncoder:
    """Token ids of prompts and answers, formatted as in training.

    Args:
        tokenizer: The model's Hugging Face tokenizer.
        data_cfg: Supplies ``template`` and ``system_prompt`` (use the training
            run's values); default ``DataConfig()``.
    """

    def __init__(self, tokenizer: Any, data_cfg: DataConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.fmt = PromptFormatter(tokenizer, data_cfg or DataConfig())
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix = [int(bos)] if (self.fmt.kind == "plain" and bos is not None) else []
        self.pad_id = pad_id_for(tokenizer)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos_token; evaluation needs one to stop")
        self.eos_id = int(eos)

    def prompts(self, records: Sequence[dict]) -> list[list[int]]:
        """Prompt ids (everything before the response) of each record."""
        texts = [self.fmt(r["instruction"], r.get("input") or "") for r in records]
        if not texts:
            return []
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [self.prefix + list(x) for x in ids]

    def answers(self, texts: Sequence[str]) -> list[list[int]]:
        """Answer ids (no special tokens, as the training response)."""
        if not texts:
            return []
        return [list(x) for x in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, special tokens dropped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def batches(order: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    for i in range(0, len(order), batch_size):
        yield list(order[i : i + batch_size])


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, left: bool, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads to ``(B, S)`` ids and a 0/1 attention mask (left or right padding)."""
    S = max(len(s) for s in seqs)
    ids_BS = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask_BS = torch.zeros((len(seqs), S), dtype=torch.long)
    for b, s in enumerate(seqs):
        n = len(s)
        sl = slice(S - n, S) if left else slice(0, n)
        ids_BS[b, sl] = torch.tensor(list(s), dtype=torch.long)
        mask_BS[b, sl] = 1
    return ids_BS.to(device), mask_BS.to(device)


def by_length(seqs: Sequence[Sequence[int]]) -> list[int]:
    """Indices sorted by length (longest first) so batches waste little padding."""
    return sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.inference_mode()
def generate_greedy(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    enc: PromptEncoder,
    max_new_tokens: int = 16,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[str]:
    """Greedy continuations of many prompts, batched with left padding.

    Prompts are sorted by length before batching (less padding) and the results
    returned in the input order. Generation stops at EOS (and at any extra EOS
    of the model's generation config) or after ``max_new_tokens``.

    Args:
        model: HF causal LM or :class:`LoRAMoEModel`.
        prompt_ids: Token ids of each prompt.
        enc: The encoder that built the prompts (pad/EOS ids, decoding).
        max_new_tokens: Generation budget per prompt.
        batch_size: Prompts per ``generate`` call.

    Returns:
        The decoded generated text of each prompt (prompt excluded).
    """
    from transformers import GenerationConfig

    lm = hf_model(model)
    lm.eval()
    dev = model_device(lm)
    eos = {enc.eos_id}
    cfg_eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    if cfg_eos is not None:
        eos.update([cfg_eos] if isinstance(cfg_eos, int) else cfg_eos)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=enc.pad_id,
        eos_token_id=sorted(eos),
    )
    out: list[str] = [""] * len(prompt_ids)
    for idx in batches(by_length(prompt_ids), batch_size):
        ids_BS, mask_BS = pad_batch([prompt_ids[i] for i in idx], enc.pad_id, True, dev)
        seq = lm.generate(input_ids=ids_BS, attention_mask=mask_BS, generation_config=gen_cfg)
        new_BN = seq[:, ids_BS.shape[1] :].tolist()
        for i, new in zip(idx, new_BN):
            # Truncate at the first stop token (later positions are padding).
            cut = next((k for k, t in enumerate(new) if t in eos), len(new))
            out[i] = enc.decode(new[:cut])
    return out


def _head_logits(lm: nn.Module, h_ND: torch.Tensor) -> torch.Tensor:
    logits_NV = lm.get_output_embeddings()(h_ND).float()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits_NV = torch.tanh(logits_NV / cap) * cap
    return logits_NV


@torch.inference_mode()
def answer_logliks(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[float]:
    """Summed log-probability of each answer's tokens given its prompt.

    ``loglik_i = sum_j log p(a_ij | prompt_i, a_i<j)``. The sequences
    ``prompt + answer`` are batched with right padding (every sequence starts at
    position 0, so padding cannot shift positions) and the output head is
    applied only at the N positions that predict answer tokens (the V-wide head
    is most of the cost at small models).

    Args:
        model: HF causal LM or :class:`LoRAMoEModel`.
        prompt_ids: Prompt ids of each pair (non-empty).
        answer_ids: Answer ids of each pair (non-empty).
        pad_id: Padding id (masked, never scored).
        batch_size: Sequences per forward.

    Returns:
        One float per (prompt, answer) pair, in the input order.

    Raises:
        ValueError: If the lists differ in length or a prompt/answer is empty.
    """
    if len(prompt_ids) != len(answer_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(answer_ids)} answers")
    for i, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
        if not p or not a:
            raise ValueError(f"pair {i}: empty {'prompt' if not p else 'answer'} token list")
    lm = hf_model(model)
    lm.eval()
    dev = model_device(lm)
    decoder = lm.get_decoder()
    seqs = [list(p) + list(a) for p, a in zip(prompt_ids, answer_ids)]
    out = [0.0] * len(seqs)
    for idx in batches(by_length(seqs), batch_size):
        ids_BS, mask_BS = pad_batch([seqs[i] for i in idx], pad_id, False, dev)
        # score_BS[b, t]: position t predicts token t+1, which is an answer token.
        score_BS = torch.zeros_like(mask_BS, dtype=torch.bool)
        for b, i in enumerate(idx):
            p, n = len(prompt_ids[i]), len(answer_ids[i])
            score_BS[b, p - 1 : p - 1 + n] = True
        h_BSD = decoder(input_ids=ids_BS, attention_mask=mask_BS)[0]
        logp_NV = torch.log_softmax(_head_logits(lm, h_BSD[score_BS]), dim=-1)
        target_N = ids_BS[:, 1:][score_BS[:, :-1]]
        tok_N = logp_NV.gather(1, target_N[:, None]).squeeze(1)
        seq_N = torch.arange(len(idx), device=dev)[:, None].expand_as(score_BS)[score_BS]
        sums_B = torch.zeros(len(idx), dtype=torch.float64, device=dev)
        sums_B.index_add_(0, seq_N, tok_N.double())
        for b, i in enumerate(idx):
            out[i] = float(sums_B[b])
    return out


# -- loading ---------------------------------------------------------------


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def load_model(
    model: str | os.PathLike[str],
    adapter: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, Any]:
    """Loads a model for evaluation, with no DeepSpeed.

    Three cases: a base model (``"smollm2"`` or an HF directory), a base model
    plus a saved adapter directory (:func:`~loramoe_ds.model.adapter_io.load_adapter`),
    and a full-fine-tune checkpoint (a plain HF directory, same as a base).

    Args:
        model: ``"smollm2"`` or a Hugging Face model directory.
        adapter: Directory written by :func:`~loramoe_ds.model.adapter_io.save_adapter` (optional).
        tokenizer: Tokenizer directory (or ``"smollm2"``); default: the model
            directory, else the adapter's recorded base model, else SmolLM2.
        device: Torch device string.
        dtype: Parameter dtype (fp32 on CPU: bf16 is much slower there).

    Returns:
        ``(model, tokenizer)`` in eval mode on ``device``.

    Raises:
        ValueError: If no tokenizer can be found.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir(model)
    if tokenizer is not None:
        tok_dir = resolve_model_dir(tokenizer)
    elif _has_tokenizer(model_dir):
        tok_dir = model_dir
    else:
        tok_dir = None
        if adapter is not None and (Path(adapter) / ADAPTER_CONFIG).is_file():
            base_name = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text()).get("base_model")
            if base_name and Path(base_name).is_dir() and _has_tokenizer(Path(base_name)):
                tok_dir = Path(base_name)
        if tok_dir is None:
            raise ValueError(f"{model_dir} has no tokenizer files; pass --tokenizer DIR|smollm2")
    # A model directory's own Python files never run here (trust_remote_code off).
    tok = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=False)
    lm = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, trust_remote_code=False)
    net: nn.Module = load_adapter(lm, adapter) if adapter is not None else lm
    net.to(device)
    net.eval()
    return net, tok
