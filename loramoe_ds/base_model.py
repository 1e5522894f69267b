"""The frozen base model: which one, built how, its tokenizer, its decoder layers.

Shared by the training run (:mod:`loramoe_ds.plan`, :mod:`loramoe_ds.run`), the
trainer (:class:`~loramoe_ds.parallel.engine.MoETrainer`) and evaluation
(:mod:`loramoe_ds.eval.common`):

* :func:`hf_config` -- the transformers config and weight directory of
  ``model.name`` (``smollm2``, ``tiny-*``, a local Hugging Face directory);
  :func:`resolve_model_dir` -- the directory of a model name for evaluation.
* :func:`from_config` -- the architecture, with or without random init;
  :func:`model_factory` -- the callable the trainer runs under ``zero.Init``
  (pretrained weights loaded into ZeRO-3 partitioned parameters).
* :func:`load_tokenizer` -- the base model's tokenizer (a BPE trained on the demo
  data for tiny models).
* :func:`factory_num_layers` -- the decoder-layer count of a model factory (the
  model's config read by :func:`~loramoe_ds.model.inject.num_decoder_layers`, the
  one way the layer count is found).
* :func:`enable_activation_checkpointing` -- non-reentrant checkpointing of every
  decoder layer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loramoe_ds.model.inject import num_decoder_layers

TINY_VOCAB = 512
"""Vocabulary of the ``tiny-*`` models and of their demo-data BPE tokenizer."""


def from_config(hf_config, init_weights: bool = True, attn_implementation: str | None = None):
    """Build the architecture; skip random init when pretrained weights follow.

    Skipping also avoids transformers' init touching ZeRO-3 partitioned (empty)
    tensors, e.g. the embedding's padding row. ``attn_implementation``
    (``model.attn_implementation``) picks transformers' attention kernel;
    ``None`` or ``"default"``: transformers' own choice.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    kw = {}
    if attn_implementation not in (None, "default"):
        kw["attn_implementation"] = attn_implementation
    ctx = contextlib.nullcontext() if init_weights else no_init_weights()
    with ctx:
        return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, **kw)


def hf_config(run) -> tuple[Any, str | None]:
    """The transformers config of ``run.model`` and its weight directory (None: random)."""
    from loramoe_ds.tiny import tiny_config

    name = run.model.name
    if name.startswith("tiny-"):
        cfg = tiny_config(
            name[5:],
            vocab_size=TINY_VOCAB,
            layers=run.model.tiny_layers,
            hidden=run.model.tiny_hidden,
        )
        return cfg, None
    if name == "smollm2":
        from loramoe_ds.smollm2 import ensure_smollm2

        try:
            model_dir = str(ensure_smollm2())
        except (FileNotFoundError, ImportError) as e:  # package missing: one line, exit 2
            raise ValueError(f"model.name='smollm2': {e}") from e
    else:
        model_dir = name
        if not Path(model_dir, "config.json").is_file():
            raise ValueError(
                f"model.name={name!r}: not 'smollm2', a tiny-* model, or a local Hugging Face "
                "model directory with config.json"
            )
    from transformers import AutoConfig

    try:
        trust = run.model.trust_remote_code  # never the library's default: the user's choice
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust), model_dir
    except (OSError, ValueError, KeyError) as e:  # unreadable, unknown model_type, needs code
        if "trust_remote_code" in str(e):
            raise ValueError(
                f"model.name={name!r}: {model_dir} needs its own Python code (auto_map in "
                "config.json), which is not run by default; set model.trust_remote_code=true "
                "only for code you trust"
            ) from e
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"model.name={name!r}: transformers cannot read {model_dir}/config.json: {first}"
        ) from e


def resolve_model_dir(name: str | os.PathLike[str]) -> Path:
    """``"smollm2"`` -> the cached converted SmolLM2 directory; else the path itself.

    Raises:
        ValueError: If a path is given that is not a directory.
    """
    if str(name) == "smollm2":
        from loramoe_ds.smollm2 import ensure_smollm2

        return ensure_smollm2()
    path = Path(name)
    if not path.is_dir():
        raise ValueError(f"--model {name!r} is neither 'smollm2' nor a model directory")
    return path


def model_factory(plan):
    """A callable building the base model of a :class:`~loramoe_ds.plan.Plan`.

    The trainer calls it under ``zero.Init``. Pretrained weights are loaded
    *into* the (possibly ZeRO-3 partitioned) parameters
    (:func:`~loramoe_ds.parallel.zero_load.load_pretrained_into`): partitioned,
    rank 0 writes each tensor via ``GatheredParameters(modifier_rank=0)``, so no
    rank ever holds two full copies; unpartitioned, every rank copies from the
    memory-mapped files. The model uses ``model.attn_implementation``.
    """

    def build():
        # Same seed on every rank: a random (tiny) base is identical everywhere and
        # across launchers, so runs are comparable.
        torch.manual_seed(plan.run.train.seed)
        model = from_config(
            plan.hf_config,
            init_weights=plan.model_dir is None,
            attn_implementation=plan.run.model.attn_implementation,
        )
        if plan.model_dir is not None:
            from loramoe_ds.parallel.zero_load import load_pretrained_into

            load_pretrained_into(model, plan.model_dir)
        return model

    return build


def load_tokenizer(plan, is_main: bool, barrier):
    """The tokenizer of the base model, or a BPE trained on the demo data for tiny models.

    For tiny models the main process trains and caches the BPE, then everyone
    passes ``barrier`` and loads it.
    """
    run = plan.run
    if plan.model_dir is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            plan.model_dir, trust_remote_code=run.model.trust_remote_code
        )
    from loramoe_ds.data import demo_path
    from loramoe_ds.tiny import tiny_tokenizer

    out = Path(run.output.dir) / "cache" / "tiny_tokenizer"
    files = [demo_path("train.jsonl")]
    if is_main:
        tiny_tokenizer(files, out, vocab_size=TINY_VOCAB)
    barrier()
    return tiny_tokenizer(files, out, vocab_size=TINY_VOCAB)


def factory_num_layers(model_factory: Callable[[], nn.Module], num_layers: int | None) -> int:
    """Decoder layers of the model a factory builds, without building it.

    ``num_layers`` when given, else the factory's ``num_layers`` attribute, else
    the config of the model the factory builds on the ``meta`` device.

    Raises:
        ValueError: The factory cannot run on ``meta`` and no count was given.
    """
    if num_layers is not None:
        return num_layers
    n = getattr(model_factory, "num_layers", None)
    if isinstance(n, int):
        return n
    try:
        with torch.device("meta"):
            probe = model_factory()
        return num_decoder_layers(probe)
    except Exception as exc:  # noqa: BLE001 - any factory failure means "tell us"
        raise ValueError(
            "cannot determine the model's number of decoder layers before initialising "
            f"distributed training ({exc}); pass num_layers= to MoETrainer.build"
        ) from exc


def enable_activation_checkpointing(base: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer of a transformers model.

    Raises:
        ValueError: If the architecture has no checkpointable decoder layers.
    """
    kwargs = {"use_reentrant": False}
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"train.activation_checkpointing: {type(base).__name__} does not support "
            "activation checkpointing in transformers"
        )
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.23
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.train()
