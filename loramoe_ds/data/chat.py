"""Chat records: OpenAI ``messages`` and ShareGPT ``conversations``, rendered with an exact
assistant-token mask.

Reading. ``{"messages": [{"role", "content"}, ...]}`` takes the roles
``system``, ``user``, ``assistant`` and ``tool`` (and ``developer`` as
``system``); ``{"conversations": [{"from", "value"}, ...]}`` takes the ShareGPT
names in :data:`SHAREGPT_ROLES` (``human``/``gpt`` ...). Either may carry a
``task_type`` beside the turns. A record is refused, naming ``file:line`` and
the turn, for an unknown role, a content that is not a string, an empty
assistant turn, or no assistant turn at all.

Rendering. The conversation is rendered by the tokenizer's chat template
(:data:`FALLBACK_CHAT_TEMPLATE` when it has none) turn by turn: for assistant
turn ``k`` the text before it is the template of ``messages[:k]`` with the
generation prompt, and its labelled text is what ``messages[:k+1]`` adds to
that (the content and the template's end-of-turn text, e.g. ``<|im_end|>\\n``).
Each piece is tokenised on its own, so the prompt tokens before an assistant
turn are exactly what a generation request for that turn would feed the model.
A template whose earlier text changes when later turns follow (no prefix
property) is refused: the mask would not be exact.

Loss. ``loss_on="all_assistant"`` labels every assistant turn,
``"last_assistant"`` only the last one. Labels are given as half-open token
spans ``[start, end)``.

Truncation. A conversation longer than ``max_length`` keeps its first
``max_length`` tokens (later turns are cut, the spans clipped) and is counted as
truncated; if no labelled token is left, the record is bad (``prompt too long``).
"""

from __future__ import annotations

import json
from typing import Any

MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user",
                 "assistant": "assistant", "tool": "tool"}  # fmt: skip
"""Roles of OpenAI ``messages`` and what they are read as."""

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "ipython": "tool",
}
"""ShareGPT ``from`` values and the role each is read as."""

FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Template for chat records when the tokenizer has no chat template (each turn ends in EOS)."""


class ChatRecordError(ValueError):
    """A bad chat record; ``reason`` is the short count key."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def detect_format(raw: Any) -> str:
    """``messages``, ``sharegpt`` or ``alpaca`` for a record (by its keys)."""
    if isinstance(raw, dict):
        if "messages" in raw:
            return "messages"
        if "conversations" in raw:
            return "sharegpt"
    return "alpaca"


def normalise_turns(raw: dict[str, Any], fmt: str, where: str) -> list[dict[str, str]]:
    """The record's turns as ``[{"role", "content"}]`` with canonical roles.

    Args:
        raw: The record (a dict).
        fmt: ``messages`` or ``sharegpt``.
        where: ``path:line`` for messages.

    Raises:
        ChatRecordError: ``where: messages[i]: ...`` for the problems in the module docstring.
    """
    key, role_key, text_key, roles = (
        ("messages", "role", "content", MESSAGE_ROLES)
        if fmt == "messages"
        else ("conversations", "from", "value", SHAREGPT_ROLES)
    )
    turns = raw.get(key)
    if turns is None:
        raise ChatRecordError(f"{where}: missing field '{key}'", f"missing {key}")
    if not isinstance(turns, list) or not turns:
        raise ChatRecordError(
            f"{where}: field '{key}' must be a non-empty list of turns", f"bad {key}"
        )
    out = []
    for i, t in enumerate(turns):
        at = f"{where}: {key}[{i}]"
        if not isinstance(t, dict):
            raise ChatRecordError(f"{at}: must be an object, got {type(t).__name__}", "bad turn")
        name = t.get(role_key)
        if not isinstance(name, str) or name.lower() not in roles:
            raise ChatRecordError(
                f"{at}: unknown role {name!r} in '{role_key}'; valid: {sorted(roles)}",
                "unknown role",
            )
        role = roles[name.lower()]
        content = t.get(text_key)
        if not isinstance(content, str):
            raise ChatRecordError(
                f"{at}: '{text_key}' must be a string, got {type(content).__name__}",
                "non-string content",
            )
        if role == "assistant" and not content.strip():
            raise ChatRecordError(f"{at}: empty assistant turn", "empty assistant turn")
        out.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in out):
        raise ChatRecordError(f"{where}: no assistant turn in '{key}'", "no assistant turn")
    if out[0]["role"] == "assistant":
        raise ChatRecordError(
            f"{where}: {key}[0]: the conversation starts with an assistant turn; "
            "give the user turn it answers",
            "assistant first",
        )
    return out


class ChatEncoder:
    """Renders and tokenises chat turns with their assistant spans (module docstring).

    Args:
        tokenizer: A Hugging Face tokenizer.
        loss_on: ``all_assistant`` or ``last_assistant``.
        system_prompt: Prepended as a system turn to records without one (``None``: nothing).
    """

    def __init__(self, tokenizer: Any, loss_on: str = "all_assistant",
                 system_prompt: str | None = None) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.loss_on = loss_on
        self.system_prompt = system_prompt
        self.template = getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE

    def _render(self, turns: list[dict[str, str]], gen: bool) -> str:
        return self.tokenizer.apply_chat_template(
            turns, add_generation_prompt=gen, tokenize=False, chat_template=self.template
        )

    def segments(self, turns: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """The rendered conversation as ``(text, labelled)`` pieces, in order.

        Raises:
            ChatRecordError: When the template does not render turn by turn.
        """
        if self.system_prompt is not None and turns[0]["role"] != "system":
            turns = [{"role": "system", "content": self.system_prompt}, *turns]
        full = self._render(turns, gen=False)
        asst = [k for k, t in enumerate(turns) if t["role"] == "assistant"]
        labelled = set(asst if self.loss_on == "all_assistant" else asst[-1:])
        segs: list[tuple[str, bool]] = []
        pos = 0
        for k in asst:
            before = self._render(turns[:k], gen=True)
            through = self._render(turns[: k + 1], gen=False)
            if not (through.startswith(before) and full.startswith(through) and len(before) >= pos):
                raise ChatRecordError(
                    f"the chat template does not render turn by turn (the text before "
                    f"assistant turn {k} changes when later turns follow), so the assistant "
                    "mask cannot be exact",
                    "template not incremental",
                )
            segs.append((full[pos : len(before)], False))
            segs.append((through[len(before) :], k in labelled))
            pos = len(through)
        segs.append((full[pos:], False))
        return [s for s in segs if s[0]]

    def encode(self, turns: list[dict[str, str]], max_length: int):
        """``(input_ids, spans, truncated)`` of one conversation (module docstring).

        ``spans`` is a flat ``[s0, e0, s1, e1, ...]`` list of labelled token
        ranges; empty when truncation left no labelled token.
        """
        segs = self.segments(turns)
        texts = [t for t, _ in segs]
        pieces = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        spans: list[int] = []
        for (_, lab), p in zip(segs, pieces):
            if lab and p:
                spans += [len(ids), len(ids) + len(p)]
            ids += p
        truncated = len(ids) > max_length
        if truncated:
            ids = ids[:max_length]
            clipped = []
            for s, e in zip(spans[::2], spans[1::2]):
                if s < max_length:
                    clipped += [s, min(e, max_length)]
            spans = clipped
        return ids, spans, truncated


def dumps_turns(turns: list[dict[str, str]]) -> str:
    """Turns as the JSON string stored in the records' ``messages`` column."""
    return json.dumps(turns, ensure_ascii=False)
