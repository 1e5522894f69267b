"""One training run: data, trainer, loop, checkpoints, export (collective).

``launcher/train.py`` resolves the plan (:func:`loramoe_ds.plan.make_plan`,
before any process group), then calls :func:`prepare_data` -- the training data
validated and tokenised before any model is loaded or engine built -- and
:func:`train`, the loop built from :mod:`loramoe_ds.train_loop`'s parts around
:class:`~loramoe_ds.parallel.engine.MoETrainer`. The base model comes from
:mod:`loramoe_ds.base_model`; the process group from
:func:`~loramoe_ds.parallel.groups.init_process_group`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramoe_ds.base_model import load_tokenizer, model_factory
from loramoe_ds.config import RunConfig
from loramoe_ds.launch.exit_codes import collective_phase
from loramoe_ds.parallel.groups import init_process_group, rank0_group
from loramoe_ds.plan import Plan, checkpoint_source


def _train_files(run: RunConfig) -> list[str]:
    from loramoe_ds.data import demo_path

    return [demo_path("train.jsonl") if f == "demo" else f for f in run.data.train_files]


def _noop() -> None:
    return None


def _start_process_group(run: RunConfig) -> None:
    init_process_group(run.parallel.timeout_s, run.parallel.rank0_timeout_s)


def _rank0_barrier() -> None:
    """Wait for rank-0-only work (the data cache) on the long-timeout gloo side group."""
    import torch.distributed as dist

    dist.barrier(group=rank0_group())


def truncate_metrics(path: str | Path, step: int) -> int:
    """Drop the rows of ``metrics.csv`` after optimizer step ``step`` (rank 0, on resume).

    A run that died after logging steps past its last checkpoint re-does those
    steps; cutting the file back to the checkpoint's step first keeps every step
    logged exactly once. Cut in place (``os.truncate``), so the CSV tracker's
    handle, already open in append mode, goes on writing at the new end.

    Returns:
        The number of rows removed.
    """
    import csv
    import os

    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        lines = f.readlines()
    if not lines:
        return 0
    header = next(csv.reader([lines[0].decode()]))
    col = header.index("step") if "step" in header else 0
    offset = len(lines[0])
    for i, raw in enumerate(lines[1:], start=1):
        row = next(csv.reader([raw.decode()]), [])
        if row and row[col].isdigit() and int(row[col]) > step:
            os.truncate(path, offset)
            return len(lines) - i
        offset += len(raw)
    return 0


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
    tokenised cache; with several ranks the others wait on the gloo side group
    with ``parallel.rank0_timeout_s`` (no DeepSpeed engine, no model; not an NCCL
    collective under a short watchdog) and receive rank 0's verdict, so a bad record
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
        _start_process_group(run)  # the process group only; train and MoETrainer.build reuse it
    tok, stats, err, exc = None, None, None, None
    if is_main:
        try:
            tok = load_tokenizer(plan, True, _noop)
            _, stats = load_tokenized(files, tok, cfg, is_main=True, barrier=_noop)
        except BaseException as e:  # the other ranks must hear of it, not hang
            exc = e
            err = (isinstance(e, ValueError), str(e) or type(e).__name__)
    if world > 1:  # the others waited for rank 0's tokenising on the long-timeout side group
        import torch.distributed as dist

        box = [err]
        with collective_phase("waiting for rank 0 to prepare the data"):
            dist.broadcast_object_list(box, src=0, group=rank0_group())
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


def start_metrics(plan: Plan) -> Any:
    """Rank 0 starts the trackers of ``output.report_to`` (collective).

    Every rank hears whether rank 0 could, so a tracker that cannot start (an
    unreachable mlflow server, say) stops every rank instead of leaving the others
    waiting in the first step.

    Returns:
        The :class:`~loramoe_ds.train_loop.logger.MetricsLogger` (disabled off rank 0).

    Raises:
        TrackerStartError: ``output.report_to=[...]: rank 0 could not start tracking: ...``.
    """
    import torch.distributed as dist

    from loramoe_ds.train_loop.logger import MetricsLogger
    from loramoe_ds.train_loop.step_metrics import STEP_METRICS, csv_fields
    from loramoe_ds.train_loop.trackers import TrackerStartError

    out = plan.run.output
    metrics, err, exc = MetricsLogger(out.dir, enabled=False), None, None
    if dist.get_rank() == 0:
        try:
            metrics = MetricsLogger(
                out.dir,
                fields=(*csv_fields(STEP_METRICS), "skipped_steps"),  # parallel/nonfinite.py
                report_to=out.report_to,
                config=plan.run.to_dict(),
                run_name=out.run_name,
            )
        except Exception as e:  # the other ranks must hear of it, not hang
            exc, err = e, f"{type(e).__name__}: {e}".splitlines()[0]
    if dist.get_world_size() > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err is not None:
        raise TrackerStartError(
            f"output.report_to={out.report_to}: rank 0 could not start tracking: {err}"
        ) from exc
    return metrics


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
    (:func:`~loramoe_ds.train_loop.step_batches.step_batches`),
    :class:`~loramoe_ds.train_loop.step_metrics.MetricsAccumulator` turns it into one
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
    from loramoe_ds.parallel.checkpoint import latest_tag
    from loramoe_ds.parallel.engine import MoETrainer
    from loramoe_ds.parallel.nonfinite import NonFiniteStreak
    from loramoe_ds.train_loop.policy import CheckpointPolicy
    from loramoe_ds.train_loop.step_batches import step_batches
    from loramoe_ds.train_loop.step_metrics import MetricsAccumulator

    run = plan.run
    out = Path(run.output.dir)
    ckpt_dir = out / "checkpoints"
    own_handler = handler is None
    if own_handler:
        handler = PreemptionHandler().install()
    data = data or prepare_data(plan)
    _start_process_group(run)  # one process: started only now, after the data was checked
    metrics = start_metrics(plan)  # before the model loads: a failing tracker costs seconds
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
        placements=plan.placements,
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
        barrier=_rank0_barrier,
        global_batch=int(plan.ds_config["train_batch_size"]),
        flash_attn_kwargs=run.model.attn_implementation.startswith("flash"),
    )
    if is_main:
        print(f"[data] {loader.stats}", flush=True)
    resumed_from = None
    if resume != "none":
        src = checkpoint_source(run, resume)
        if resume != "auto" or latest_tag(src) is not None:
            with collective_phase("resuming from a checkpoint"):
                client = trainer.load(src)
            if client is not None:
                loader.load_state_dict(client["data"])
                resumed_from = trainer.global_step
    if is_main:
        dropped = truncate_metrics(out / "metrics.csv", trainer.global_step)
        if dropped:
            print(f"[resume] metrics.csv: {dropped} rows after step {trainer.global_step} "
                  "dropped (those steps are re-done)", flush=True)  # fmt: skip
    policy = CheckpointPolicy(
        max_steps=run.train.max_steps,
        save_every=run.output.save_every,
        keep=run.output.keep_checkpoints,
        stop_after=stop_after,
    )
    acc = MetricsAccumulator(device=trainer.device)
    streak = NonFiniteStreak(run.train.nonfinite, run.train.nonfinite_patience,
                             int(trainer.engine.skipped_steps))  # fmt: skip
    bar = tqdm(total=policy.max_steps, initial=trainer.global_step, disable=not is_main,
               desc="train", dynamic_ncols=True)  # fmt: skip
    if is_main and resumed_from is not None:
        print(f"[resume] from step {resumed_from}", flush=True)
    last: dict[str, float] = {}
    preempted = False
    end = "failed"  # what the trackers record unless the loop gets to its end
    try:
        done_this_run = 0
        steps = step_batches(loader, run.train.grad_accum)
        while trainer.global_step < policy.max_steps:
            batches = next(steps)
            with collective_phase(f"optimizer step {trainer.global_step + 1}"):
                result = trainer.train_step(batches)
                last = acc.step(result)
                stop_requested = handler.any_rank_should_stop()
            step = trainer.global_step
            done_this_run += 1
            last["skipped_steps"] = streak.update(step, result.nonfinite)
            if step % run.output.log_every == 0 or step == policy.max_steps:
                metrics.log(step, last)
            streak.check(step, ckpt_dir)
            bar.update(1)
            bar.set_postfix(acc.postfix(last))
            decision = policy.decide(step, done_this_run, stop_requested)
            if decision.save:
                with collective_phase(f"checkpoint save at step {step}"):
                    trainer.save(ckpt_dir, {"data": loader.state_dict(), "step": step})
                if is_main:
                    policy.prune(ckpt_dir)
            if decision.stop:
                preempted = decision.preempted
                break
        with collective_phase("adapter export"):
            if not preempted:
                trainer.export_adapter(out / "adapter")
            dist.barrier(group=rank0_group())
        end = "preempted" if preempted else "finished"
    finally:
        bar.close()
        metrics.close(end)
        if own_handler:
            handler.uninstall()
    return {
        "step": trainer.global_step,
        "last": last,
        "preempted": preempted,
        "output_dir": str(out),
        "resumed_from": resumed_from,
    }
