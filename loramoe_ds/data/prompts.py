"""Prompts of alpaca records: the tokenizer's chat template around the user message, or a
plain ``### Instruction / ### Response`` template."""

from __future__ import annotations

from typing import Any

from loramoe_ds.config import DataConfig

PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PLAIN_PROMPT_WITH_INPUT = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


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
