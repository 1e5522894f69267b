"""LoRAMoE / MoLA adapters under lm-evaluation-harness (optional extra ``lm-eval``).

lm-eval's ``peft=`` path knows plain LoRA only, so an adapted model is handed to it
as the in-memory ``transformers`` model: :func:`load_model` injects the experts
into the base, and ``HFLM(pretrained=<that model>)`` scores it (the routers and
experts run inside the model's own linears). Two ways in:

- Python: :func:`run_lm_eval` (``launcher/evaluate.py --lm-eval-tasks``);
- command line: ``python -m loramoe_ds.eval.harness --model loramoe
  --model_args pretrained=smollm2,adapter=OUT/adapter --tasks loramoe`` runs
  lm-eval's own CLI with the ``loramoe`` model type registered and the shipped
  tasks on the include path.

Shipped tasks (:data:`TASKS_DIR`, offline, over the package's demo eval sets):
``loramoe_knowledge_gen`` (greedy generation, tolerant match against the answer
and its aliases), ``loramoe_knowledge_mc`` (log-likelihood multiple choice over
the answer and its distractors), ``loramoe_downstream`` (generation, exact
match); the group ``loramoe`` runs all three. With a chat tokenizer the prompt
is rendered by its chat template, as in training.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
"""Directory of the shipped task YAMLs (lm-eval's ``include_path``)."""

SHIPPED_TASKS = ("loramoe_knowledge_gen", "loramoe_knowledge_mc", "loramoe_downstream")
"""The shipped task names (group ``loramoe``)."""

MODEL_TYPE = "loramoe"
"""The lm-eval model type :func:`register` adds."""


def hflm(model: Any, tokenizer: Any, batch_size: int = 8, max_length: int | None = None) -> Any:
    """An lm-eval ``HFLM`` over an in-memory model (a LoRAMoE wrapper or a plain HF model)."""
    from lm_eval.models.huggingface import HFLM

    from loramoe_ds.eval.common import hf_model

    lm = HFLM(pretrained=hf_model(model), tokenizer=tokenizer, batch_size=batch_size,
              max_length=max_length)  # fmt: skip
    lm._loramoe_model = model  # keeps the wrapper (and its adapter) alive
    return lm


def register() -> None:
    """Registers the ``loramoe`` model type (``pretrained``, ``adapter``, ``tokenizer``
    model args, as :func:`~loramoe_ds.eval.common.load_model`); idempotent."""
    from lm_eval.api.registry import MODEL_REGISTRY, register_model
    from lm_eval.models.huggingface import HFLM

    if MODEL_TYPE in MODEL_REGISTRY:
        return

    @register_model(MODEL_TYPE)
    class LoRAMoELM(HFLM):
        """HFLM over ``load_model(pretrained, adapter, tokenizer)``."""

        def __init__(self, pretrained: str = "smollm2", adapter: str | None = None,
                     tokenizer: str | None = None, dtype: str = "float32",
                     **kw: Any) -> None:  # fmt: skip
            import torch

            from loramoe_ds.eval.common import hf_model, load_model

            kw.pop("device", None)
            net, tok = load_model(pretrained, adapter, tokenizer, "cpu", getattr(torch, dtype))
            super().__init__(pretrained=hf_model(net), tokenizer=tok, **kw)
            self._loramoe_model = net


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    apply_chat_template: bool | None = None,
    system_prompt: str | None = None,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """Runs lm-eval tasks on an in-memory model.

    Args:
        model: A :class:`~loramoe_ds.model.lm.LoRAMoEModel` or HF causal LM.
        tokenizer: Its tokenizer.
        tasks: Task or group names: the shipped ones (:data:`SHIPPED_TASKS`,
            ``loramoe``) or any lm-eval task available offline.
        limit: First N documents of each task (or a fraction).
        batch_size: Evaluation batch size.
        apply_chat_template: Render prompts with the tokenizer's chat template
            (default: when it has one, as in training).
        system_prompt: System message (the training run's ``data.system_prompt``).
        num_fewshot: Few-shot examples (the task's default when ``None``).

    Returns:
        ``{task: {metric: value}}`` (lm-eval's ``results``, stderr entries dropped).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    if apply_chat_template is None:
        apply_chat_template = bool(getattr(tokenizer, "chat_template", None))
    out = lm_eval.simple_evaluate(
        model=hflm(model, tokenizer, batch_size),
        tasks=list(tasks),
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
        limit=limit,
        num_fewshot=num_fewshot,
        apply_chat_template=apply_chat_template,
        system_instruction=system_prompt,
        log_samples=False,
    )
    results: dict[str, dict[str, float]] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        results[task] = {
            k.split(",")[0]: float(v)
            for k, v in metrics.items()
            if "stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with the ``loramoe`` model type and the shipped tasks."""
    from lm_eval.__main__ import cli_evaluate

    register()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in argv:
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
