"""Shared by the distributed tests and their worker processes: tiny model, data, launch.

Shape legend: B samples per micro-batch, S positions, W ranks, G GAS micro-batches.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from loramoe_ds.config import AdapterConfig

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VOCAB, LAYERS, HIDDEN = 64, 2, 32
MICRO_B = 2


def factory(layers: int = LAYERS):
    """A factory of the base model every rank builds (under zero.Init for ZeRO-3)."""

    def build():
        from loramoe_ds.tiny import tiny_model

        return tiny_model("llama", seed=0, vocab_size=VOCAB, layers=layers, hidden=HIDDEN)

    build.num_layers = layers
    return build


model_factory = factory()
MOLA = {"layers": 4, "adapter": {"num_experts": "2468"}}
"""A case's model and adapter for MoLA's inverted triangle: 2, 4, 6, 8 experts in 4 layers."""


def adapter_cfg(router: str, dropout: float = 0.0, **extra) -> AdapterConfig:
    """The tests' adapter; ``extra`` sets or overrides fields (e.g. ``null_experts``)."""
    if router == "soft":
        fields = dict(rank=4, alpha=8.0, dropout=dropout, router="soft", num_experts=4,
                      lbc_beta=0.1, load_balance_coef=0.01, z_loss_coef=0.001)  # fmt: skip
    else:
        fields = dict(
            target_modules=("q_proj", "v_proj", "gate_proj", "down_proj"),
            rank=4, alpha=8.0, dropout=dropout, router="topk", top_k=2, num_experts=[4, 8],
            lbc_beta=0.05, load_balance_coef=0.01, z_loss_coef=0.001,
        )  # fmt: skip
    return AdapterConfig(**{**fields, **extra})


def ds_config(world: int, stage: int, gas: int = 1):
    """The tests' DeepSpeed JSON: batch sizes and ZeRO only (the optimizer is :func:`optim`)."""
    return {
        "train_micro_batch_size_per_gpu": MICRO_B,
        "gradient_accumulation_steps": gas,
        "train_batch_size": MICRO_B * gas * world,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }


def optim(clip: float = 0.0, router_lr_scale: float = 1.0):
    """The tests' AdamW settings and joint clip (``clip`` 0: off)."""
    from loramoe_ds.parallel.settings import OptimizerSettings

    return OptimizerSettings(
        lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, grad_clip=clip,
        router_lr_scale=router_lr_scale,
    )  # fmt: skip


def warmup_lr(sched: bool = True):
    """DeepSpeed's linear ``WarmupLR``, 1e-3 -> 1e-2 in 4 steps (``None``: ``sched`` off)."""
    if not sched:
        return None

    def build(optimizer):
        from deepspeed.runtime.lr_schedules import WarmupLR

        return WarmupLR(optimizer, warmup_min_lr=1e-3, warmup_max_lr=1e-2, warmup_num_steps=4,
                        warmup_type="linear")  # fmt: skip

    return build


def init_state(
    router: str, seed: int = 1, layers: int = LAYERS, **extra
) -> dict[str, torch.Tensor]:
    """A full adapter state with non-zero B (so every gradient is non-trivial)."""
    from loramoe_ds.model.inject import inject

    model = inject(factory(layers)(), adapter_cfg(router, **extra))
    names = model.adapter_named_parameters()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, p in names:
        scale = 0.5 if n.endswith("router.weight") else 0.2
        out[n] = torch.randn(p.shape, generator=g) * scale
    return out


def case_model(case: dict, dropout: float = 0.0):
    """``(model factory, adapter config, initial adapter)`` of a test case.

    The case's ``router``, optional ``layers`` (decoder layers of the tiny model)
    and ``adapter`` (further adapter fields, e.g. :data:`MOLA`'s allocation).
    """
    layers, extra = case.get("layers", LAYERS), case.get("adapter", {})
    cfg = adapter_cfg(case["router"], dropout, **extra)
    return factory(layers), cfg, init_state(case["router"], layers=layers, **extra)


def batch(rank: int, step: int, micro: int) -> dict[str, torch.Tensor]:
    """Deterministic micro-batch of one rank; lengths differ between ranks (unequal T)."""
    g = torch.Generator().manual_seed(10_000 * rank + 100 * step + micro)
    S = 6 + 2 * (rank % 2)
    ids = torch.randint(0, VOCAB, (MICRO_B, S), generator=g)
    mask = torch.ones(MICRO_B, S, dtype=torch.long)
    mask[1, -2:] = 0  # right padding in the second sample
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :2] = -100
    task = torch.tensor([1, 0]) if (rank + step + micro) % 2 else torch.tensor([0, 0])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_type": task}


def uneven_batch(rank: int, micro: int) -> dict[str, torch.Tensor]:
    """A micro-batch whose length, padding and prompt length depend on (rank, micro).

    Labelled-token counts therefore differ a lot between ranks and micro-batches
    (what separates a token mean over the step from a mean of micro-batch means).
    """
    g = torch.Generator().manual_seed(7919 * rank + 31 * micro + 5)
    S = 5 + (3 * rank + 2 * micro) % 7
    ids = torch.randint(0, VOCAB, (MICRO_B, S), generator=g)
    mask = torch.ones(MICRO_B, S, dtype=torch.long)
    pad = (rank + micro) % 3
    if pad:
        mask[1, -pad:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, : 1 + (rank * 5 + micro * 3) % (S - 1)] = -100  # prompt of 1..S-1 tokens
    labels[1, : 1 + rank % 2] = -100
    task = torch.tensor([rank % 2, 1 - micro % 2])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_type": task}


def concat_batches(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch holding every sample of ``batches``, right-padded to the longest."""
    S = max(b["input_ids"].shape[1] for b in batches)

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, S - t.shape[1]), value=value)

    return {
        "input_ids": torch.cat([pad(b["input_ids"], 0) for b in batches]),
        "attention_mask": torch.cat([pad(b["attention_mask"], 0) for b in batches]),
        "labels": torch.cat([pad(b["labels"], -100) for b in batches]),
        "task_type": torch.cat([b["task_type"] for b in batches]),
    }


def reference_model(router: str, base_state: dict[str, torch.Tensor], dropout: float = 0.0):
    """Single-process model with the distributed run's base weights and initial adapter."""
    from loramoe_ds.model.inject import inject

    torch.manual_seed(0)
    model = inject(model_factory(), adapter_cfg(router, dropout))
    missing, unexpected = model.base.load_state_dict(base_state, strict=False)
    adapter = dict(model.adapter_named_parameters())
    assert not unexpected and set(missing) == set(adapter)
    init = init_state(router)
    with torch.no_grad():
        for n, p in adapter.items():
            p.copy_(init[n])
    return model, adapter


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> None:
    """``max|a - b| <= rtol * max(1, max|b|)``."""
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= rtol * max(1.0, scale), f"{what}: max abs err {err:.3g} (scale {scale:.3g})"


def launch(world: int, scenario: str, args: dict, out: Path, timeout: float = 300, env=None,
           wait: bool = True, worker: str = "_worker.py"):  # fmt: skip
    """Start ``world`` worker processes (gloo, CPU, one thread each).

    ``worker`` is a script beside this file, called ``worker SCENARIO ARGS OUT``
    (``scenario=None``: ``worker ARGS OUT``).
    """
    from launching import free_port, launch_ranks, start_ranks  # tests/: not in the workers

    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    envs, cmds = [], []
    for r in range(world):
        e = dict(os.environ)
        e.update(
            RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
        )  # fmt: skip
        e.update(env or {})
        envs.append(e)
        cmd = [sys.executable, str(HERE / worker)] + ([scenario] if scenario else [])
        cmds.append(cmd + [json.dumps(args), str(out)])
    logs = [out / f"log_rank{r}.txt" for r in range(world)]
    if not wait:
        return start_ranks(cmds, envs, logs=logs)
    codes = [code for code, _ in launch_ranks(cmds, envs, timeout, logs=logs)]
    if any(codes):
        logs = "\n".join((out / f"log_rank{r}.txt").read_text()[-3000:] for r in range(world))
        raise AssertionError(f"worker exit codes {codes}\n{logs}")
    return [torch.load(out / f"result_rank{r}.pt", weights_only=False) for r in range(world)]


def finish(results: dict, out: Path) -> None:
    """Write this rank's results where :func:`launch` reads them; leave the process group."""
    import torch.distributed as dist

    torch.save(results, out / f"result_rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()
