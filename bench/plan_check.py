"""The cost model (loramoe_ds/cost_model/) against a real run: bytes by collective, memory.

    python bench/plan_check.py                      # tiny + SmolLM2, 2 and 4 ranks, packed and not
    python bench/plan_check.py --models tiny --worlds 2 --steps 2

Every rank runs the real training path (``make_plan`` -> ``prepare_data`` ->
``train``) on gloo CPU ranks with every ``torch.distributed`` collective
wrapped (:class:`CollectiveCounter`, installed before DeepSpeed starts its comm
backend, so DeepSpeed's own calls are counted too). Counting is on from the
start of each ``MoETrainer.train_step`` to the end of that step's metric
reduction (build, data loading, checkpoint and export are not counted).

Bytes of a call (the convention of the cost model): the full buffer of the
collective, i.e. ``all_reduce`` / ``broadcast``: the tensor; ``all_gather*``: the
gathered output; ``reduce_scatter*``: the unreduced input; ``all_to_all_single``:
the rows this rank hands in (its rows to itself included). A call is attributed
to a collective of the model by its caller (:data:`ATTRIBUTION`).

Memory of a rank (measured): the storage bytes of every live tensor at the
start of the first counted step (a ``gc`` scan, storages counted once) plus the
peak growth of the process's resident set during each counted step: ``VmHWM``
after the step minus ``VmRSS`` before it, the high-water mark reset
(``/proc/self/clear_refs``) at the step's start, as ``bench/memory.py`` does.
The ranks run with glibc's ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
at 64 KiB (:data:`MALLOC_ENV`), so every tensor above 64 KiB is its own mapping,
returned to the kernel when freed: the resident set then follows the live
tensors instead of keeping freed memory cached in malloc's arenas (torch has no
CPU caching allocator). The prediction is :func:`loramoe_ds.cost_model.predict`'s
memory items (for gloo ranks: ``plan_cost.workload(..., cpu=True)``).

``PLAN_CHECK_TRACE=1`` keeps every counted call in the records (``trace``);
``PLAN_CHECK_HOOKS=1`` every ZeRO-3 module fetch and release (``hooks``,
:func:`record_hooks`), which ``loramoe_ds/cost_model/zero3.py`` simulates.

Each rank writes a JSON record; the driver compares with the prediction for the
token counts the ranks actually saw and prints one table.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the prediction must use this checkout's cost model
    sys.path.insert(0, str(REPO))

# (collective, first caller file fragment) -> cost-model collective name
ATTRIBUTION = (
    ("loramoe_ds/parallel/dispatch.py", "exchange_counts", "ep_counts_a2a"),
    ("loramoe_ds/parallel/dispatch.py", "", "ep_rows_a2a"),
    ("loramoe_ds/parallel/token_mean.py", "", "token_mean_allreduce"),
    ("loramoe_ds/train_loop/step_metrics.py", "", "metrics_allreduce"),
    ("loramoe_ds/parallel/nonfinite.py", "", "nonfinite_allreduce"),
    ("loramoe_ds/parallel/aux_scope.py", "", "aux_scope"),
    ("loramoe_ds/parallel/expert_optimizer.py", "sync_grads", "expert_grad_allreduce"),
    ("loramoe_ds/parallel/expert_optimizer.py", "sq_norm", "grad_norm_allreduce"),
    ("loramoe_ds/parallel/engine.py", "_clip_joint", "clip_grad_allgather"),
    ("deepspeed/runtime/zero/partition_parameters.py", "", "zero3_param_allgather"),
    ("deepspeed/runtime/zero/stage3.py", "_post_step", "zero3_param_allgather"),
    ("deepspeed/runtime/zero/partitioned_param_coordinator.py", "reset_step", "zero3_trace_bcast"),
    ("deepspeed/runtime/zero/stage3.py", "get_grad_norm", "engine_norm_allreduce"),
    ("deepspeed/runtime/zero/stage3.py", "has_overflow", "engine_norm_allreduce"),
    ("deepspeed/runtime/zero/stage_1_and_2.py", "get_grad_norm", "engine_norm_allreduce"),
    ("deepspeed/runtime/zero/stage_1_and_2.py", "has_overflow", "engine_norm_allreduce"),
    ("deepspeed/runtime/zero/stage3.py", "", "engine_grad_reduce"),
    ("deepspeed/runtime/zero/stage_1_and_2.py", "", "engine_grad_reduce"),
    ("deepspeed/runtime/comm/", "", "engine_grad_reduce"),
)

WARMUP_STEPS = 1
"""Optimizer steps run before counting: ZeRO-3's first step gathers its persistent
parameters at every forward and backward too; later steps keep them gathered."""

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "all_to_all_single",
    "all_to_all",
    "broadcast",
    "reduce",
    "all_reduce_coalesced",
)


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _call_bytes(name: str, args, kwargs) -> int:
    """Bytes of one call, by the module docstring's convention."""

    def arg(i, key):
        return kwargs[key] if key in kwargs else args[i]

    if name in ("all_reduce", "broadcast", "reduce"):
        return _nbytes(arg(0, "tensor"))
    if name == "all_reduce_coalesced":
        return sum(_nbytes(t) for t in arg(0, "tensors"))
    if name == "all_gather":
        return sum(_nbytes(t) for t in arg(0, "tensor_list"))
    if name in ("all_gather_into_tensor", "_all_gather_base"):
        return _nbytes(arg(0, "output_tensor"))
    if name in ("reduce_scatter_tensor", "_reduce_scatter_base"):
        return _nbytes(arg(1, "input"))
    if name == "reduce_scatter":
        return sum(_nbytes(t) for t in arg(1, "input_list"))
    if name == "all_to_all_single":
        return _nbytes(arg(1, "input"))
    if name == "all_to_all":
        return sum(_nbytes(t) for t in arg(1, "input_tensor_list"))
    raise AssertionError(name)


class CollectiveCounter:
    """Counts the bytes and calls of every ``torch.distributed`` collective, by caller.

    Install before DeepSpeed initialises its comm backend (it binds some
    functions at that time). Only the outermost collective of a nested call is
    counted; only while :attr:`active`.
    """

    def __init__(self) -> None:
        self.active = False
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.raw: dict[str, int] = defaultdict(int)
        self._depth = 0
        self.trace: list = []

    def install(self) -> CollectiveCounter:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name in COLLECTIVES:
            for mod in (dist, c10d):
                fn = getattr(mod, name, None)
                if fn is None or getattr(fn, "_counted", False):
                    continue
                setattr(mod, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self._depth or not self.active:
                self._depth += 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    self._depth -= 1
            n = _call_bytes(name, args, kwargs)
            key = self._attribute()
            self.bytes[key] += n
            self.calls[key] += 1
            self.raw[f"{name}@{key}"] += n
            if os.environ.get("PLAN_CHECK_TRACE"):
                self.trace.append((name, key, n))
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        counted._counted = True
        return counted

    @staticmethod
    def _attribute() -> str:
        paths = []
        f = sys._getframe(2)
        while f is not None:
            paths.append((f.f_code.co_filename.replace(os.sep, "/"), f.f_code.co_name))
            f = f.f_back
        for frag, func, key in ATTRIBUTION:  # the first rule any frame matches
            for path, name in paths:
                if frag in path and (not func or func == name):
                    return key
        if os.environ.get("PLAN_CHECK_TRACE"):
            print("unattributed collective:", paths[:12], file=sys.stderr)
        return "other"


def live_tensor_bytes() -> int:
    """Storage bytes of every live tensor (each storage once), by a ``gc`` scan."""
    import torch

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                continue
            st = obj.untyped_storage()
        except Exception:  # noqa: BLE001 -- meta / sparse / freed objects
            continue
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
"""glibc malloc settings of every rank: allocations above 64 KiB mapped alone and unmapped
when freed, the heap trimmed above 64 KiB free (module docstring)."""


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def record_hooks(counter: CollectiveCounter, out: list) -> None:
    """Log ZeRO-3's module hooks while ``counter`` is active (``PLAN_CHECK_HOOKS=1``).

    Each fetch and release of DeepSpeed's ``PartitionedParameterCoordinator`` as
    ``[kind, phase, module id, parameter sizes]``: kind ``F`` (fetch) or ``R``
    (release), phase ``fwd``, ``recompute`` (activation checkpointing's forward in
    backward) or ``bwd``. :func:`loramoe_ds.cost_model.zero3_trace` writes the same
    trace from shapes; tests/distributed/test_plan_check.py compares the two.
    """
    import torch
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc

    coord = ppc.PartitionedParameterCoordinator
    fetch, release = coord.fetch_sub_module, coord.release_sub_module

    def sizes(m) -> list[int]:
        return sorted(p.ds_numel for p in ppc.iter_params(m, recurse=ppc.z3_leaf_module(m)))

    def logged_fetch(self, m, forward):
        if counter.active:
            recompute = forward and torch._C._current_graph_task_id() != -1
            phase = ("recompute" if recompute else "fwd") if forward else "bwd"
            out.append(["F", phase, m.ds_id, sizes(m)])
        return fetch(self, m, forward)

    def logged_release(self, m, forward=False):
        if counter.active:
            out.append(["R", "fwd" if forward else "bwd", m.ds_id, []])
        return release(self, m, forward)

    coord.fetch_sub_module, coord.release_sub_module = logged_fetch, logged_release


def worker(args) -> None:
    """One rank: the real run with the collectives counted (module docstring)."""
    counter = CollectiveCounter().install()
    import torch

    from loramoe_ds.config import load_ds_config, load_run_config
    from loramoe_ds.parallel import engine
    from loramoe_ds.plan import make_plan
    from loramoe_ds.run import prepare_data, train
    from loramoe_ds.train_loop import step_metrics

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    run = load_run_config(args.config, args.overrides)
    plan = make_plan(run, load_ds_config(args.deepspeed), world, rank)
    rec = {"rank": rank, "world": world, "micro_shapes": [], "resident": None, "peak": []}
    if os.environ.get("PLAN_CHECK_HOOKS"):
        record_hooks(counter, rec.setdefault("hooks", []))
    orig_step, orig_metrics = engine.MoETrainer.train_step, step_metrics.MetricsAccumulator.step

    seen = [0]

    def train_step(self, micro_batches, grad_hook=None):
        seen[0] += 1
        if seen[0] <= WARMUP_STEPS:  # DeepSpeed's first step gathers differently: not counted
            return orig_step(self, micro_batches, grad_hook)
        if rec["resident"] is None:
            gc.collect()
            rec["resident"] = live_tensor_bytes()
        rec["micro_shapes"].append([list(b["input_ids"].shape) for b in micro_batches])
        rec.setdefault("labels", []).append(
            [int((b["labels"][..., 1:] != -100).sum()) for b in micro_batches]
        )
        counter.active = True
        gc.collect()
        before = _status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident set
        out = orig_step(self, micro_batches, grad_hook)
        rec["peak"].append(_status_bytes("VmHWM") - before)
        return out

    def metrics_step(self, result):
        try:
            return orig_metrics(self, result)
        finally:
            counter.active = False

    engine.MoETrainer.train_step = train_step
    step_metrics.MetricsAccumulator.step = metrics_step
    torch.manual_seed(0)
    t0 = time.time()
    train(plan, resume="none", data=prepare_data(plan))
    rec["seconds"] = time.time() - t0
    rec["trace"] = counter.trace
    rec["bytes"], rec["calls"], rec["raw"] = (
        dict(counter.bytes),
        dict(counter.calls),
        dict(counter.raw),
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(rec, indent=1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    config: str, overrides: list[str], world: int, out: Path, timeout: float, ds: str | None = None
) -> list[dict]:
    """Run ``world`` worker ranks; each rank's JSON record."""
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, PYTHONPATH=str(REPO), RANK=str(r), LOCAL_RANK=str(r),
                   WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", **MALLOC_ENV)  # fmt: skip
        cmd = [sys.executable, __file__, "--worker", "--out", str(out), "--config", config,
               *(["--deepspeed", ds] if ds else []), *overrides]  # fmt: skip
        log = open(out / f"rank{r}.log", "w")  # noqa: SIM115
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    bad = [r for r, p in enumerate(procs) if p.returncode != 0]
    if bad:
        tail = (out / f"rank{bad[0]}.log").read_text()[-3000:]
        raise RuntimeError(f"rank(s) {bad} failed:\n{tail}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


CASES = {
    "tiny": ("configs/tiny.yaml", ["train.max_steps=2", "data.max_length=128"]),
    "tiny-topk": (
        "configs/tiny.yaml",
        [
            "train.max_steps=2",
            "data.max_length=128",
            "adapter.router=topk",
            "adapter.top_k=2",
            "adapter.num_experts=[2,4,4,8]",
            "adapter.target_modules=[q_proj,v_proj,gate_proj,down_proj]",
        ],
    ),  # fmt: skip
    "smollm2": ("configs/smollm2_packed.yaml", ["train.max_steps=2", "data.max_length=128"]),
}
"""name -> (run config, overrides): the measured cases (``--models`` picks among them)."""


UNMODELLED = ("zero3_trace_bcast", "engine_norm_allreduce", "other")
"""Counted but not in the cost model: ZeRO-3's check that every rank traced the same
modules (a broadcast of the trace's module ids at each forward, a few KiB) and
DeepSpeed's scalar norm / overflow all-reduces (bytes)."""

SHIPPED_DS = REPO / "ds_configs" / "zero3_cpu.json"
"""The DeepSpeed JSON the cases run with (its ZeRO section; batch sizes from the run config)."""


def bench_ds_config(out: Path) -> str:
    """:data:`SHIPPED_DS` less its batch sizes (the run config gives them), written to ``out``."""
    ds = json.loads(SHIPPED_DS.read_text())
    for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        ds.pop(k, None)
    path = out / "ds.json"
    path.write_text(json.dumps(ds))
    return str(path)


def predicted(config: str, overrides: list[str], rec: dict, world: int, ds: str | None):
    """The cost model's bytes (summed over the counted steps) and memory for one rank's record."""
    from loramoe_ds import cost_model as cm
    from loramoe_ds.config import load_ds_config, load_run_config
    from loramoe_ds.plan import make_plan
    from loramoe_ds.plan_cost import workload

    run = load_run_config(REPO / config, overrides)
    plan = make_plan(run, load_ds_config(ds), world, 0)
    shapes = plan.cost.shapes
    by: dict[str, float] = defaultdict(float)
    mem = {}
    for shp, lab in zip(rec["micro_shapes"], rec["labels"]):
        T = sum(b * s for b, s in shp) // len(shp)
        S = max(s for _, s in shp)
        w = workload(plan.run, plan.ds_config, world, plan.run.parallel.ep_size,
                     plan.run.parallel.zero_stage, plan.layer_placements, tokens=T,
                     label_tokens=max(lab), cpu=True)  # fmt: skip
        w = cm.Workload(**{**w.__dict__, "seq_len": S})
        cost = cm.predict(shapes, w)
        for k, v in cost.bytes.items():
            by[k] += v
        m = cost.memory
        peak = cost.peak_memory(w.activation_checkpointing)
        if peak > mem.get("peak", 0):
            mem = {"peak": peak, **m}
    return dict(by), mem, plan.run.train.activation_checkpointing


def measure(name, config, overrides, world, packing, ds, steps, out_root) -> dict:
    """Run one case: predicted and counted bytes per collective (all ranks, counted steps), memory.

    Returns:
        ``{"tag", "pred": {collective: B}, "meas": {collective: B},
        "memory": [(rank, predicted B, measured B, resident B, step peak B, predicted
        state B, predicted activations B, predicted items)], "wall"}``.
    """
    ov = [*overrides, f"data.packing={str(packing).lower()}", f"output.dir={out_root}/run",
          "output.save_every=0", f"train.max_steps={steps + WARMUP_STEPS}"]  # fmt: skip
    out = Path(out_root)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    recs = launch(config, ov, world, out, 1800, ds)
    wall = time.time() - t0
    meas: dict[str, float] = defaultdict(float)
    pred: dict[str, float] = defaultdict(float)
    mem_rows = []
    for rec in recs:
        for k, v in rec["bytes"].items():
            meas[k] += v
        by, mem, ckpt = predicted(config, ov, rec, world, ds)
        for k, v in by.items():
            pred[k] += v
        got = rec["resident"] + max(rec["peak"])
        act = mem["activations_ckpt" if ckpt else "activations_no_ckpt"]
        mem_rows.append((rec["rank"], mem["peak"], got, rec["resident"], max(rec["peak"]),
                         mem["peak"] - act, act, mem))  # fmt: skip
    tag = f"{name:9s} W={world} {'packed' if packing else 'padded'}"
    return {"tag": tag, "pred": dict(pred), "meas": dict(meas), "memory": mem_rows,
            "wall": wall, "steps": steps}  # fmt: skip


def table_rows(res: dict) -> list[str]:
    """One printed row per collective and per rank's memory."""
    tag, pred, meas = res["tag"], res["pred"], res["meas"]
    rows = []
    for k in sorted(set(meas) | set(pred)):
        p, m = pred.get(k, 0.0), meas.get(k, 0.0)
        ratio = f"{p / m:6.3f}" if m else "   -  "
        note = "   (not modelled)" if k in UNMODELLED else ""
        rows.append(f"{tag:24s} {k:24s} {p:14,.0f} {m:14,.0f} {ratio}{note}")
    for r, p, m, res_b, pk, state, act, _ in res["memory"]:
        rows.append(
            f"{tag:24s} {'memory rank ' + str(r):24s} {p:14,.0f} {m:14,.0f} {p / m:6.3f}"
            f"   (measured: resident {res_b / 2**20:.1f} + step peak {pk / 2**20:.1f} MiB;"
            f" predicted: state {state / 2**20:.1f} + activations {act / 2**20:.1f} MiB)"
        )
    rows.append(f"{tag:24s} ({res['wall']:.0f} s wall, {res['steps']} counted step(s))")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--config", default=None)
    ap.add_argument("--deepspeed", default=None, help="DeepSpeed JSON (default: none)")
    ap.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--worlds", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--packing", nargs="+", default=["false", "true"], choices=["false", "true"])
    ap.add_argument("--records", default=None, help="keep every rank's JSON record here")
    ap.add_argument("--steps", type=int, default=2, help="counted steps (after 1 warm-up step)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return
    import platform

    print(f"# bench/plan_check.py  {platform.node()} {os.cpu_count()} CPUs, gloo ranks, "
          f"DeepSpeed {_version('deepspeed')}, torch {_version('torch')}")  # fmt: skip
    print(f"{'case':24s} {'collective / item':24s} {'predicted B':>14s} {'counted B':>14s} "
          "pred/meas")  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        d = args.records or d
        Path(d).mkdir(parents=True, exist_ok=True)
        ds = args.deepspeed or bench_ds_config(Path(d))
        print(f"# DeepSpeed JSON: {args.deepspeed or SHIPPED_DS.relative_to(REPO)} (ZeRO section)")
        for name in args.models:
            config, overrides = CASES[name]
            for world in args.worlds:
                for packing in args.packing:
                    sub = Path(d) / f"{name}-{world}-{packing}"
                    res = measure(name, config, [*overrides, *args.overrides], world,
                                  packing == "true", ds, args.steps, sub)  # fmt: skip
                    print("\n".join(table_rows(res)), flush=True)


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


if __name__ == "__main__":
    main()
