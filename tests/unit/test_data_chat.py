"""Chat records: OpenAI messages and ShareGPT, the exact assistant mask on five template
styles (checked against rendering turn by turn and against each template's literal
end-of-turn text), truncation, bad records, packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loramoe_ds.data import (
    IGNORE_INDEX,
    Collator,
    DataConfig,
    DataError,
    PackedCollator,
    build_dataloader,
    load_tokenized,
)

# Jinja chat templates in the style of each model family's tokenizer_config.json.
CHATML_QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SMOLLM2 = CHATML_QWEN2.replace(
    "You are a helpful assistant.",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + "
    "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
# template -> (literal text each assistant turn is labelled with, given its content;
#              whether the template takes a system turn)
STYLES = {
    "chatml_qwen2": (CHATML_QWEN2, "{c}<|im_end|>\n", True),
    "smollm2": (SMOLLM2, "{c}<|im_end|>\n", True),
    "llama3": (LLAMA3, "{c}<|eot_id|>", True),
    "mistral_inst": (MISTRAL, "{c}</s>", False),
    "gemma": (GEMMA, "{c}<end_of_turn>\n", False),
}
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "[INST]", "[/INST]", "<start_of_turn>", "<end_of_turn>"]  # fmt: skip

TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "Who wrote Hamlet?"},
    {"role": "assistant", "content": "William Shakespeare wrote Hamlet."},
    {"role": "user", "content": "And Macbeth?"},
    {"role": "assistant", "content": "Shakespeare too."},
]
SYSTEM = {"role": "system", "content": "Answer briefly."}


@pytest.fixture(scope="module")
def base_tok(tmp_path_factory):
    from loramoe_ds.data import demo_path
    from loramoe_ds.tiny import tiny_tokenizer

    return tiny_tokenizer([demo_path("train.jsonl")], tmp_path_factory.mktemp("tok"))


def _tok(base_tok, template: str | None):
    import copy

    tok = copy.deepcopy(base_tok)
    tok.add_tokens(SPECIAL, special_tokens=True)
    tok.chat_template = template
    return tok


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _render(tok, msgs, gen):
    return tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)


def _turn_by_turn(tok, msgs, last_only: bool) -> tuple[list[int], list[bool]]:
    """Reference: render the conversation one assistant turn at a time; each piece
    (text up to the turn's generation prompt, then the turn's own text) tokenised on
    its own; the mask is True on the assistant pieces."""
    ids: list[int] = []
    mask: list[bool] = []
    done = ""
    asst = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    for k in asst:
        prompt = _render(tok, msgs[:k], gen=True)
        turn = _render(tok, msgs[: k + 1], gen=False)
        for text, lab in ((prompt[len(done) :], False), (turn[len(prompt) :], True)):
            piece = tok(text, add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [lab and (not last_only or k == asst[-1])] * len(piece)
        done = turn
    rest = tok(_render(tok, msgs, gen=False)[len(done) :], add_special_tokens=False)
    ids += rest["input_ids"]
    mask += [False] * len(rest["input_ids"])
    return ids, mask


def _labelled_runs(ids, labels) -> list[list[int]]:
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("loss_on", ["all_assistant", "last_assistant"])
def test_assistant_mask_is_exact_on_template_styles(tmp_path, base_tok, style, loss_on):
    template, eot, has_system = STYLES[style]
    tok = _tok(base_tok, template)
    msgs = ([SYSTEM] if has_system else []) + TURNS
    path = _write(tmp_path / "chat.jsonl", [{"messages": msgs, "task_type": 1}])
    cfg = DataConfig(max_length=512, cache_dir=str(tmp_path / "c"), loss_on=loss_on)
    ds, stats = load_tokenized(path, tok, cfg)
    batch = Collator(tok.pad_token_id)([ds[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    ref_ids, ref_mask = _turn_by_turn(tok, msgs, loss_on == "last_assistant")
    assert ids == ref_ids
    assert [lab != IGNORE_INDEX for lab in labels] == ref_mask
    # Independent of the reference: the decoded sequence is the template's rendering,
    # and each labelled run is exactly one assistant content plus the template's
    # end-of-turn text.
    assert tok.decode(ids) == _render(tok, msgs, gen=False)
    contents = [m["content"] for m in TURNS if m["role"] == "assistant"]
    if loss_on == "last_assistant":
        contents = contents[-1:]
    runs = [tok.decode(r) for r in _labelled_runs(ids, labels)]
    assert runs == [eot.format(c=c) for c in contents]
    assert stats.label_tokens == sum(ref_mask) and stats.truncated == 0


def test_sharegpt_alpaca_and_messages_read_alike(tmp_path, base_tok):
    tok = _tok(base_tok, CHATML_QWEN2)
    alias = {"user": "human", "assistant": "gpt", "system": "system"}
    sharegpt = {"conversations": [{"from": alias[m["role"]], "value": m["content"]} for m in TURNS]}
    messages = {"messages": TURNS}
    one = [{"role": "user", "content": "Who wrote Hamlet?"},
           {"role": "assistant", "content": "William Shakespeare"}]  # fmt: skip
    alpaca = {"instruction": "Who wrote Hamlet?", "output": "William Shakespeare"}
    cfg = DataConfig(max_length=512, cache_dir=str(tmp_path / "c"))
    cfg.datasets = []
    ds_m, _ = load_tokenized(_write(tmp_path / "m.jsonl", [{**messages, "task_type": 1}]), tok, cfg)
    ds_s, _ = load_tokenized(_write(tmp_path / "s.jsonl", [{**sharegpt, "task_type": 1}]), tok, cfg)
    assert ds_m[0]["input_ids"] == ds_s[0]["input_ids"]
    assert ds_m[0]["label_spans"] == ds_s[0]["label_spans"]
    # A one-turn chat record and the same alpaca record have the same prompt and
    # response tokens; the alpaca record ends in EOS, the chat one in the template's
    # end of turn. Both files in one list, the format detected per file.
    ds, _ = load_tokenized(
        [_write(tmp_path / "a.jsonl", [{**alpaca, "task_type": 0}]),
         _write(tmp_path / "o.jsonl", [{"messages": one, "task_type": 0}])], tok, cfg,
    )  # fmt: skip
    b = Collator(tok.pad_token_id)([ds[0], ds[1]])
    P = ds[0]["prompt_len"]
    assert P == ds[1]["prompt_len"] == ds[1]["label_spans"][0]
    assert torch.equal(b["input_ids"][0, :P], b["input_ids"][1, :P])
    n = len(tok("William Shakespeare", add_special_tokens=False)["input_ids"])
    assert torch.equal(b["labels"][0, P : P + n], b["labels"][1, P : P + n])
    assert tok.decode(b["labels"][0, P + n : P + n + 1]) == tok.eos_token
    assert tok.decode(b["labels"][1, P + n : P + n + 2]) == "<|im_end|>\n"


def test_tool_turns_are_not_labelled(tmp_path, base_tok):
    tok = _tok(base_tok, CHATML_QWEN2)
    msgs = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "calc(2+2)"},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "It is 4."},
    ]
    path = _write(tmp_path / "t.jsonl", [{"messages": msgs, "task_type": 0}])
    ds, _ = load_tokenized(path, tok, DataConfig(max_length=512, cache_dir=str(tmp_path / "c")))
    b = Collator(tok.pad_token_id)([ds[0]])
    runs = _labelled_runs(b["input_ids"][0].tolist(), b["labels"][0].tolist())
    assert [tok.decode(r) for r in runs] == ["calc(2+2)<|im_end|>\n", "It is 4.<|im_end|>\n"]
    assert "<|im_start|>tool\n4<|im_end|>" in tok.decode(b["input_ids"][0])


def test_truncation_keeps_the_first_tokens_and_counts(tmp_path, base_tok):
    tok = _tok(base_tok, CHATML_QWEN2)
    full_ids, full_mask = _turn_by_turn(tok, TURNS, last_only=False)
    first_asst_end = len(full_mask) - full_mask[::-1].index(True)  # end of the last labelled run
    cut = first_asst_end - 3  # inside the last assistant turn
    path = _write(tmp_path / "c.jsonl", [{"messages": TURNS, "task_type": 1}] * 2)
    ds, stats = load_tokenized(path, tok, DataConfig(max_length=cut, cache_dir=str(tmp_path / "c")))
    assert stats.truncated == 2 and stats.records_kept == 2
    b = Collator(tok.pad_token_id)([ds[0]])
    assert b["input_ids"][0].tolist() == full_ids[:cut]
    assert [x != IGNORE_INDEX for x in b["labels"][0].tolist()] == full_mask[:cut]
    # No assistant token left within max_length: a bad record (error, or skipped).
    first_label = full_mask.index(True)
    cfg = DataConfig(max_length=first_label, cache_dir=str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"c\.jsonl:1: field 'messages': no assistant token"):
        load_tokenized(path, tok, cfg)


@pytest.mark.parametrize(
    "record,phrase",
    [
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0]: unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
         "messages[1]: empty assistant turn"),
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
        ({"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]},
         "messages[0]: 'content' must be a string, got list"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
         "conversations[1]: unknown role 'robot'"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}]},
         "conversations[1]: 'value' must be a string, got int"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
         "missing field 'task_type'"),
    ],
)  # fmt: skip
def test_bad_chat_records_name_file_line_and_problem(tmp_path, base_tok, record, phrase):
    tok = _tok(base_tok, CHATML_QWEN2)
    good = {"messages": TURNS[:2], "task_type": 1}
    if "conversations" in record:  # the format is detected from the file's first record
        good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                "task_type": 1}  # fmt: skip
    path = _write(tmp_path / "bad.jsonl", [good, {"task_type": 1, **record}
                                           if "task_type" not in phrase else record])  # fmt: skip
    cfg = DataConfig(max_length=256, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError) as e:
        load_tokenized(path, tok, cfg)
    msg = str(e.value)
    assert msg.startswith(f"{path}:2: ") and phrase in msg and "\n" not in msg
    cfg = DataConfig(max_length=256, cache_dir=str(tmp_path / "d"), skip_bad_records=True)
    ds, stats = load_tokenized(path, tok, cfg)
    assert len(ds) == 1 and stats.bad_records == 1


def test_chat_records_pack_with_their_spans(tmp_path, base_tok):
    tok = _tok(base_tok, SMOLLM2)
    rows = [
        {"messages": [{"role": "user", "content": f"Record {i}."}, *TURNS[1 : 2 * (1 + i % 3)]],
         "task_type": i % 2}
        for i in range(12)
    ]  # fmt: skip
    path = _write(tmp_path / "p.jsonl", rows)
    cfg = DataConfig(max_length=256, cache_dir=str(tmp_path / "c"), packing=True)
    loader = build_dataloader(path, tok, cfg, batch_size=2)
    ds, _ = load_tokenized(path, tok, cfg)
    seen = 0
    for batch in loader:
        for b in range(batch["input_ids"].shape[0]):
            for j in range(int(batch["seq_ids"][b].max()) + 1):
                pos = (batch["seq_ids"][b] == j).nonzero().squeeze(1)
                ids = batch["input_ids"][b, pos].tolist()
                rec = next(r for r in ds if r["input_ids"] == ids)
                ref = Collator(tok.pad_token_id)([rec])
                assert batch["labels"][b, pos].tolist() == ref["labels"][0].tolist()
                assert set(batch["task_type"][b, pos].tolist()) == {rec["task_type"]}
                seen += 1
    assert seen > 0
    assert PackedCollator  # packed batches come from the loader's PackedCollator
