"""One training run: resolve the plan, build model + data + trainer, loop, checkpoint, export.

``launcher/train.py`` is a thin wrapper around :func:`train`. Everything that
can be checked without processes talking to each other (configs, DeepSpeed JSON,
expert-parallel divisibility) is checked in :func:`make_plan` before any
process group starts; the training data is validated and tokenised by
:func:`prepare_data` before any model is loaded or engine built. :func:`train`
is the loop, built from :mod:`loramoe_ds.train_loop`'s parts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loramoe_ds.lr_schedule import LRSchedule, lr_ratio
from loramoe_ds.parallel.settings import OptimizerSettings
from loramoe_ds.run_config import RunConfig, resolve_ds_config

TINY_VOCAB = 512


@dataclass
class Plan:
    """Everything resolved before process groups start."""

    run: RunConfig
    ds_config: dict[str, Any]
    world_size: int
    rank: int
    num_layers: int
    experts_per_layer: list[int]
    model_dir: str | None
    hf_config: Any
    gpus_per_node: int | None = None
    """Ranks per node of the planned topology (``--gpus-per-node``), when known."""
    param_counts: tuple[int, int, int, int] | None = None
    """:func:`count_parameters` of this plan (filled by :func:`make_plan`)."""

    @property
    def optim(self) -> OptimizerSettings:
        """AdamW settings and joint clip of routers and experts (``train.*``)."""
        t = self.run.train
        return OptimizerSettings(
            lr=t.lr,
            weight_decay=t.weight_decay,
            grad_clip=t.grad_clip,
            router_lr_scale=t.router_lr_scale,
        )

    @property
    def lr_schedule(self) -> LRSchedule:
        """Linear warm-up from lr/W at step 1, cosine decay: every step moves (``train.*``)."""
        t = self.run.train
        return LRSchedule(t.max_steps, t.warmup_steps, t.min_lr_ratio)

    def describe(self) -> str:
        """The human-readable plan printed by ``--dry-run``."""
        run, W, ep = self.run, self.world_size, self.run.parallel.ep_size
        ep_groups = [list(range(i * ep, (i + 1) * ep)) for i in range(W // ep)]
        edp_groups = [list(range(j, W, ep)) for j in range(ep)]
        n_base, n_router, n_expert, per_linear = self.param_counts or count_parameters(self)
        bytes_pp = 2 if run.train.precision == "bf16" else 4
        stage = run.parallel.zero_stage
        base_rank = n_base * bytes_pp / (W if stage == 3 else 1)
        # expert params: local shard; fp32 master + 2 Adam moments + grad = 16 B/param
        expert_rank = n_expert / ep * 16
        router_rank = n_router * 16 / (W if stage >= 1 else 1)
        t = run.train
        lines = [f"world size {W}: {W // ep} expert-parallel group(s) of {ep}"]
        if self.gpus_per_node:
            G = self.gpus_per_node
            lines.append(
                f"  {W // G} node(s) x {G} GPUs; "
                + (
                    "every EP group within one node"
                    if G % ep == 0
                    else "EP groups span nodes (expert all-to-all crosses the network; "
                    "an ep_size dividing the GPUs per node keeps it inside a node)"
                )
            )
        lines += [
            f"  EP groups  {ep_groups}",
            f"  EDP groups {edp_groups}",
            f"model {run.model.name}: {self.num_layers} layers; adapter router={run.adapter.router}"
            + (f" top_k={run.adapter.top_k}" if run.adapter.router == "topk" else "")
            + f" rank={run.adapter.rank} targets={list(run.adapter.target_modules)}",
            f"aux losses ({run.adapter.aux_loss_scope}): LBC {run.adapter.lbc_variant} "
            f"beta={run.adapter.lbc_beta} delta={run.adapter.lbc_delta}; load balance "
            f"{run.adapter.load_balance_coef}; z-loss {run.adapter.z_loss_coef}",
            f"experts per layer {self.experts_per_layer} "
            f"(total {sum(self.experts_per_layer) * per_linear} over {per_linear} linears/layer;"
            f" {[e // ep for e in self.experts_per_layer][:8]}... local per EP rank)",
            f"parameters: frozen base {n_base:,}; trainable routers {n_router:,} + experts "
            f"{n_expert:,} ({100 * (n_router + n_expert) / max(n_base, 1):.2f}% of base)",
            f"batch: micro {run.train.micro_batch_size} x grad_accum {run.train.grad_accum} x "
            f"DP {W} = global {self.ds_config['train_batch_size']}; ZeRO stage {stage}; "
            f"{run.train.precision}",
            f"estimated memory per rank: base {base_rank / 2**20:.1f} MiB (ZeRO-{stage}), "
            f"experts+optimizer {expert_rank / 2**20:.1f} MiB, routers+optimizer "
            f"{router_rank / 2**20:.2f} MiB (activations extra)",
            f"steps {t.max_steps}, lr {t.lr}: "
            + (
                f"linear warm-up from {t.lr * lr_ratio(1, t.warmup_steps, t.max_steps, 0):.3g} "
                f"(step 1) to {t.lr:.3g} (step {t.warmup_steps}), "
                if t.warmup_steps
                else ""
            )
            + f"cosine to {t.lr * t.min_lr_ratio:.3g} (step {t.max_steps}); "
            f"output {run.output.dir}",
        ]
        return "\n".join(lines)


def count_parameters(plan: Plan) -> tuple[int, int, int, int]:
    """(frozen base, router, expert, adapted linears per layer) parameter counts.

    Computed on the ``meta`` device: no memory, no weights loaded.
    """
    from loramoe_ds.model.inject import inject

    with torch.device("meta"):
        base = _from_config(plan.hf_config, init_weights=False)
        n_base = sum(p.numel() for p in base.parameters())
        model = inject(base, plan.run.adapter)
    n_router = sum(m.router.weight.numel() for m in model.moe_layers())
    n_expert = sum(sum(p.numel() for p in m.experts.parameters()) for m in model.moe_layers())
    per_linear = max(1, len(model.moe_layers()) // max(plan.num_layers, 1))
    return n_base, n_router, n_expert, per_linear


def _from_config(hf_config, init_weights: bool = True):
    """Build the architecture; skip random init when pretrained weights follow.

    Skipping also avoids transformers' init touching ZeRO-3 partitioned (empty)
    tensors, e.g. the embedding's padding row.
    """
    import contextlib

    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    ctx = contextlib.nullcontext() if init_weights else no_init_weights()
    with ctx:
        return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)


def _hf_config(run: RunConfig) -> tuple[Any, str | None]:
    """The transformers config of the base model and its weight directory (None: random)."""
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
        return AutoConfig.from_pretrained(model_dir), model_dir
    except (OSError, ValueError, KeyError) as e:  # unreadable or unknown model_type
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"model.name={name!r}: transformers cannot read {model_dir}/config.json: {first}"
        ) from e


def make_plan(
    run: RunConfig,
    ds_user: dict[str, Any],
    world_size: int,
    rank: int,
    gpus_per_node: int | None = None,
    resume: str | None = None,
) -> Plan:
    """Validate everything that needs no process group.

    Also counts the parameters (on the ``meta`` device) and, on rank 0, prints
    one warning line when the adapter has more parameters than the base model
    (usually a ``num_experts`` or ``rank`` typo).

    Args:
        run: The validated run config.
        ds_user: The user's DeepSpeed JSON (``{}`` when none).
        world_size: Ranks of the job (or of the planned job, for a dry run).
        rank: This process's rank.
        gpus_per_node: Ranks per node of a planned topology (dry run), if known.
        resume: The launcher's ``--resume`` (``auto``, ``none`` or a checkpoint
            directory): a checkpoint this topology and config cannot continue is
            refused here, naming both topologies (:func:`check_resume_plan`).

    Raises:
        ValueError: Config / DeepSpeed JSON disagreement, an ``ep_size`` that
            does not divide the world size or some layer's expert count, or a
            checkpoint to resume that this run cannot continue.
    """
    import sys

    from loramoe_ds.parallel.groups import validate_ep

    ds = resolve_ds_config(run, ds_user, world_size)
    if run.train.precision == "bf16":
        ds.setdefault("bf16", {})["enabled"] = True
    hf_config, model_dir = _hf_config(run)
    n_layers = hf_config.num_hidden_layers
    counts = run.adapter.layer_experts(n_layers)
    if resume not in (None, "none"):
        check_resume_plan(run, ds, world_size, counts, hf_config, resume)
    validate_ep(run.parallel.ep_size, world_size, counts)
    plan = Plan(run, ds, world_size, rank, n_layers, counts, model_dir, hf_config, gpus_per_node)
    plan.param_counts = count_parameters(plan)
    n_base, n_router, n_expert, _ = plan.param_counts
    if rank == 0 and n_router + n_expert > n_base:
        print(
            f"warning: the adapter has {n_router + n_expert:,} trainable parameters, "
            f"{(n_router + n_expert) / max(n_base, 1):.1f}x the base model's {n_base:,} "
            f"(experts per layer {sorted(set(counts))}, rank {run.adapter.rank}, "
            f"{len(run.adapter.target_modules)} target modules); check adapter.num_experts "
            "and adapter.rank",
            file=sys.stderr,
            flush=True,
        )
    return plan


def checkpoint_source(run: RunConfig, resume: str) -> Path:
    """Where ``--resume`` looks: ``output.dir/checkpoints`` for ``auto``, else the directory."""
    return Path(run.output.dir) / "checkpoints" if resume == "auto" else Path(resume)


def check_resume_plan(run, ds, world_size, counts, hf_config, resume: str) -> None:
    """Refuse, before any heavy work, a checkpoint this run cannot continue.

    Reads only the checkpoint's JSON (:func:`loramoe_ds.parallel.checkpoint.check_resume`);
    nothing to resume (``auto`` without ``latest``) passes.
    """
    from loramoe_ds.parallel.checkpoint import base_identity, check_resume

    now = {
        "world_size": world_size,
        "ep_size": run.parallel.ep_size,
        "experts_per_layer": counts,
        "adapter": run.adapter.to_dict(),
        "base": base_identity(hf_config),
        "train_batch_size": int(ds["train_batch_size"]),
    }
    src = checkpoint_source(run, resume)
    if resume != "auto" and not src.is_dir():
        raise ValueError(f"--resume {resume}: no such checkpoint directory")
    check_resume(src, now)


def model_factory(plan: Plan):
    """A callable building the base model (the trainer calls it under ``zero.Init``).

    Pretrained weights are loaded *into* the (possibly ZeRO-3 partitioned)
    parameters: rank 0 reads the safetensors and each tensor is scattered via
    ``GatheredParameters(modifier_rank=0)``, so no rank ever holds two full copies.
    """

    def build():
        # Same seed on every rank: a random (tiny) base is identical everywhere and
        # across launchers, so runs are comparable.
        torch.manual_seed(plan.run.train.seed)
        model = _from_config(plan.hf_config, init_weights=plan.model_dir is None)
        if plan.model_dir is not None:
            from loramoe_ds.parallel.zero_load import load_pretrained_into

            load_pretrained_into(model, plan.model_dir)
        return model

    return build


def load_tokenizer(plan: Plan, is_main: bool, barrier):
    """The tokenizer of the base model, or a BPE trained on the demo data for tiny models.

    For tiny models the main process trains and caches the BPE, then everyone
    passes ``barrier`` and loads it.
    """
    run = plan.run
    if plan.model_dir is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(plan.model_dir)
    from loramoe_ds.data import demo_path
    from loramoe_ds.tiny import tiny_tokenizer

    out = Path(run.output.dir) / "cache" / "tiny_tokenizer"
    files = [demo_path("train.jsonl")]
    if is_main:
        tiny_tokenizer(files, out, vocab_size=TINY_VOCAB)
    barrier()
    return tiny_tokenizer(files, out, vocab_size=TINY_VOCAB)


def _train_files(run: RunConfig) -> list[str]:
    from loramoe_ds.data import demo_path

    return [demo_path("train.jsonl") if f == "demo" else f for f in run.data.train_files]


def _noop() -> None:
    return None


@dataclass
class PreparedData:
    """The training data, validated and tokenised into the cache (see :func:`prepare_data`).

    Attributes:
        tokenizer: The base model's tokenizer.
        config: The ``data:`` section with the cache directory resolved.
        files: The training files (``demo`` resolved).
        stats: What rank 0's validation read, kept and skipped (``None`` elsewhere).
    """

    tokenizer: Any
    config: Any
    files: list[str]
    stats: Any = None


def prepare_data(plan: Plan) -> PreparedData:
    """Validate and tokenise the training data before any model is loaded or engine built.

    Rank 0 loads the tokenizer (cheap), validates every record and writes the
    tokenised cache; with several ranks the others wait on a plain process group
    (no DeepSpeed engine, no model) and receive rank 0's verdict, so a bad record
    costs seconds on every rank instead of surfacing after the model loads. With
    one process no process group is created at all.

    Raises:
        DataError: A bad record (``file:line: field ...``) or no usable record; a
            ``ValueError``, so the launcher reports it in one line with exit code 2.
    """
    from loramoe_ds.data import DataError, load_tokenized

    run = plan.run
    cfg = dataclasses.replace(
        run.data, cache_dir=run.data.cache_dir or str(Path(run.output.dir) / "cache" / "data")
    )
    files = _train_files(run)
    world, is_main = plan.world_size, plan.rank == 0
    if world > 1:
        import deepspeed

        deepspeed.init_distributed()  # the process group only; MoETrainer.build reuses it
    tok, stats, err, exc = None, None, None, None
    if is_main:
        try:
            tok = load_tokenizer(plan, True, _noop)
            _, stats = load_tokenized(files, tok, cfg, is_main=True, barrier=_noop)
        except BaseException as e:  # the other ranks must hear of it, not hang
            exc = e
            err = (isinstance(e, ValueError), str(e) or type(e).__name__)
    if world > 1:
        import torch.distributed as dist

        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if exc is not None:
        raise exc
    if err is not None:
        is_value_error, msg = err
        if is_value_error:
            raise DataError(msg)
        raise RuntimeError(f"rank 0 failed while preparing the training data: {msg}")
    if not is_main:
        tok = load_tokenizer(plan, False, _noop)
    return PreparedData(tok, cfg, files, stats)


def train(
    plan: Plan,
    resume: str = "auto",
    stop_after: int | None = None,
    handler=None,
    data: PreparedData | None = None,
) -> dict[str, Any]:
    """Run the training loop (collective: every rank calls it).

    The loop is small on purpose: :class:`~loramoe_ds.parallel.engine.MoETrainer`
    trains one optimizer step from the step's GAS micro-batches
    (:func:`~loramoe_ds.train_loop.steps.optimizer_steps`),
    :class:`~loramoe_ds.train_loop.metrics.MetricsAccumulator` turns it into one
    row, :class:`~loramoe_ds.train_loop.policy.CheckpointPolicy` decides to save,
    prune and stop.

    Args:
        plan: From :func:`make_plan`.
        resume: ``auto`` (latest checkpoint in ``output.dir/checkpoints`` if any),
            ``none``, or a checkpoint directory.
        stop_after: Testing aid: exit (as if preempted, with a checkpoint) after
            this many optimizer steps of this invocation.
        handler: An installed ``PreemptionHandler`` (the launcher installs one
            before the heavy imports so an early signal is not lost); one is
            installed here otherwise.
        data: From :func:`prepare_data` (called here when ``None``).

    Returns:
        Summary (final step, last losses, preempted flag, paths).
    """
    import torch.distributed as dist
    from tqdm import tqdm

    from loramoe_ds.data import build_dataloader
    from loramoe_ds.launch.preempt import PreemptionHandler
    from loramoe_ds.metrics import MetricsLogger
    from loramoe_ds.parallel.checkpoint import latest_tag
    from loramoe_ds.parallel.engine import MoETrainer
    from loramoe_ds.train_loop.metrics import MetricsAccumulator, csv_fields
    from loramoe_ds.train_loop.policy import CheckpointPolicy
    from loramoe_ds.train_loop.steps import optimizer_steps

    run = plan.run
    out = Path(run.output.dir)
    ckpt_dir = out / "checkpoints"
    own_handler = handler is None
    if own_handler:
        handler = PreemptionHandler().install()
    data = data or prepare_data(plan)
    trainer = MoETrainer.build(
        model_factory(plan),
        run.adapter,
        plan.ds_config,
        ep_size=run.parallel.ep_size,
        seed=run.train.seed,
        optim=plan.optim,
        lr_schedule=plan.lr_schedule,
        num_layers=plan.num_layers,
        loss_reduction=run.train.loss_reduction,
        activation_checkpointing=run.train.activation_checkpointing,
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    loader = build_dataloader(
        data.files,
        data.tokenizer,
        data.config,
        batch_size=run.train.micro_batch_size,
        rank=rank,
        world_size=world,
        is_main=is_main,
        barrier=dist.barrier,
        global_batch=int(plan.ds_config["train_batch_size"]),
    )
    if is_main:
        print(f"[data] {loader.stats}", flush=True)
    resumed_from = None
    if resume != "none":
        src = checkpoint_source(run, resume)
        if resume != "auto" or latest_tag(src) is not None:
            client = trainer.load(src)
            if client is not None:
                loader.load_state_dict(client["data"])
                resumed_from = trainer.global_step
    policy = CheckpointPolicy(
        max_steps=run.train.max_steps,
        save_every=run.output.save_every,
        keep=run.output.keep_checkpoints,
        stop_after=stop_after,
    )
    acc = MetricsAccumulator(device=trainer.device)
    metrics = MetricsLogger(out, enabled=is_main, fields=csv_fields(acc.metrics))
    bar = tqdm(total=policy.max_steps, initial=trainer.global_step, disable=not is_main,
               desc="train", dynamic_ncols=True)  # fmt: skip
    if is_main and resumed_from is not None:
        print(f"[resume] from step {resumed_from}", flush=True)
    last: dict[str, float] = {}
    preempted = False
    try:
        done_this_run = 0
        steps = optimizer_steps(loader, run.train.grad_accum)
        while trainer.global_step < policy.max_steps:
            last = acc.step(trainer.train_step(next(steps)))
            step = trainer.global_step
            done_this_run += 1
            if step % run.output.log_every == 0 or step == policy.max_steps:
                metrics.log(step, last)
            bar.update(1)
            bar.set_postfix(acc.postfix(last))
            decision = policy.decide(step, done_this_run, handler.any_rank_should_stop())
            if decision.save:
                trainer.save(ckpt_dir, {"data": loader.state_dict(), "step": step})
                if is_main:
                    policy.prune(ckpt_dir)
            if decision.stop:
                preempted = decision.preempted
                break
        if not preempted:
            trainer.export_adapter(out / "adapter")
        dist.barrier()
    finally:
        bar.close()
        metrics.close()
        if own_handler:
            handler.uninstall()
    return {
        "step": trainer.global_step,
        "last": last,
        "preempted": preempted,
        "output_dir": str(out),
        "resumed_from": resumed_from,
    }
