"""Chaos test of a whole training run: faults at seeded random points, relaunch, compare.

Runs ``launcher/train.py`` on the tiny model (``configs/tiny.yaml``) with 2 ranks
on CPU (gloo), started the way torchrun would (``RANK``/``WORLD_SIZE``/...),
checkpointing often. Each launch gets one fault at a random step (``--seed``);
after it ends -- however it ends -- the job is relaunched with the same command
(``--resume auto``), as a cluster's requeue would, until the run finishes. Then
the final adapter, the final checkpoint's optimizer state and ``metrics.csv`` are
compared with an uninterrupted run of the same command.

Faults (``--kinds``):

* ``kill_rank``: SIGKILL of one rank mid-run (an OOM kill, a dead node);
* ``kill_in_save``: rank 0 SIGKILLs itself in the middle of writing a checkpoint
  (``LORAMOE_FAULT_SAVE=kill:<step>``, a testing hook that is off unless set);
* ``preempt``: SIGUSR1 to one rank (Slurm's warning before the time limit);
* ``stop_rank``: SIGSTOP of one rank (it stops answering inside a collective);
  the others must exit within ``parallel.timeout_s``; then it is SIGKILLed;
* ``enospc``: the save of a step fails as on a full disk
  (``LORAMOE_FAULT_SAVE=enospc:<step>``);
* ``corrupt``: both ranks SIGKILLed, then 64 bytes flipped in (or the tail cut
  off) a file of the newest checkpoint; the relaunch must skip it.

Usage::

    python bench/chaos.py --steps 200 --faults 12 --seed 0 --out runs/chaos
    python bench/chaos.py --steps 40 --faults 3 --kinds kill_rank,stop_rank,corrupt

Prints a table (faults by kind, launches, exit codes, steps re-done, the time a
silent rank took to be noticed) and the maximum absolute difference of the final
state from the uninterrupted run; ``--json`` writes the same as JSON. Exit status
0 only when every check passed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launcher" / "train.py")
CONFIG = str(ROOT / "configs" / "tiny.yaml")
KINDS = ("kill_rank", "kill_in_save", "preempt", "stop_rank", "enospc", "corrupt")
FAULT_ENV = "LORAMOE_FAULT_SAVE"  # loramoe_ds.parallel.checkpoint.store.FAULT_ENV
WORLD = 2
EXPECTED = {
    "kill_rank": "the killed rank -9, the other 76 (peer lost)",
    "kill_in_save": "rank 0 -9, rank 1 76",
    "preempt": "75 on both (checkpointed, requeue)",
    "stop_rank": "the other rank 76 within parallel.timeout_s, the stopped one -9",
    "enospc": "74 on both (save failed, previous checkpoint intact)",
    "corrupt": "-9 on both; the relaunch skips the damaged checkpoint",
    "none": "0 on both",
}


def _expected(kind: str, rank: int | None) -> list[int]:
    if kind in ("kill_rank", "stop_rank"):
        return [-9 if r == rank else 76 for r in range(WORLD)]
    return {
        "kill_in_save": [-9, 76],
        "preempt": [75] * WORLD,
        "enospc": [74] * WORLD,
        "corrupt": [-9] * WORLD,
        "none": [0] * WORLD,
    }[kind]


TIMING_COLUMNS = ("tokens_per_s", "elapsed_s")
"""metrics.csv columns that measure wall time (differ between any two runs)."""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps of the run")
    ap.add_argument("--save-every", type=int, default=5, help="checkpoint every N steps")
    ap.add_argument("--faults", type=int, default=12, help="faults to inject (one per launch)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated fault kinds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-s", type=float, default=20.0, help="parallel.timeout_s")
    ap.add_argument("--out", default="runs/chaos", help="working directory (replaced)")
    ap.add_argument("--launch-timeout", type=float, default=600.0, help="seconds per launch")
    ap.add_argument("--json", default=None, help="write the report here too")
    return ap.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(out: Path, a) -> list[str]:
    return [
        f"output.dir={out}",
        f"train.max_steps={a.steps}",
        f"output.save_every={a.save_every}",
        "output.keep_checkpoints=3",
        f"parallel.timeout_s={a.timeout_s}",
        f"parallel.rank0_timeout_s={3 * a.timeout_s}",
        f"data.cache_dir={Path(a.out) / 'data_cache'}",
    ]


LIVE: list[subprocess.Popen] = []
"""Every rank process started here (killed on the way out, whatever happens)."""


class Launch:
    """One launch of the job: ``WORLD`` rank processes, logs in ``out/logs``."""

    def __init__(self, out: Path, a, index: int, rank0_env: dict[str, str] | None = None):
        self.out, self.start, self.started = out, time.time(), False
        port = _free_port()
        logs = out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = [logs / f"launch{index}_rank{r}.txt" for r in range(WORLD)]
        self.procs = []
        for r in range(WORLD):
            env = dict(os.environ)
            for k in ("LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "LORAMOE_DIST_LAUNCHER", FAULT_ENV):
                env.pop(k, None)
            env.update(
                RANK=str(r), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(WORLD),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
                OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(ROOT),
            )  # fmt: skip
            if r == 0 and rank0_env:
                env.update(rank0_env)
            cmd = [
                sys.executable,
                TRAIN,
                "--config",
                CONFIG,
                "--resume",
                "auto",
                *_overrides(out, a),
            ]
            with open(self.logs[r], "w") as log:
                self.procs.append(
                    subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                )
                LIVE.append(self.procs[-1])

    def step(self) -> int:
        """The last step this launch logged (0 before its first row)."""
        f = self.out / "metrics.csv"
        if not f.is_file() or f.stat().st_mtime < self.start:
            return 0
        if not self.started:
            self.started = "[data]" in self.logs[0].read_text(errors="replace")
            if not self.started:
                return 0  # the metrics file is still the previous launch's
        rows = _rows(f)
        return int(rows[-1]["step"]) if rows else 0

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def wait_step(self, target: int, deadline: float) -> int:
        """Wait until step ``target`` is logged (or the launch ends); the step reached."""
        while time.time() < deadline:
            s = self.step()
            if s >= target or not self.running():
                return s
            time.sleep(0.1)
        return self.step()

    def signal(self, rank: int, sig: int) -> None:
        try:
            self.procs[rank].send_signal(sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> list[int]:
        """Exit codes (negative: killed by that signal); stragglers are SIGKILLed."""
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        return [p.returncode for p in self.procs]

    def text(self, rank: int = 0) -> str:
        return self.logs[rank].read_text(errors="replace")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _latest_step(out: Path) -> int:
    f = out / "checkpoints" / "latest"
    if not f.is_file():
        return 0
    return int("".join(c for c in f.read_text() if c.isdigit()) or 0)


def _damage(out: Path, rng: random.Random) -> str:
    """Flip 64 bytes mid-file, or cut the file in half, in the newest checkpoint."""
    tag = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    name = rng.choice(["adapter_model.safetensors", "optimizer.pt", "trainer_state.pt"])
    f = tag / name
    data = bytearray(f.read_bytes())
    if rng.random() < 0.5:
        mid = len(data) // 2
        for i in range(mid, min(mid + 64, len(data))):
            data[i] ^= 0xFF
        how = "64 bytes flipped"
    else:
        data = data[: len(data) // 2]
        how = "truncated to half"
    f.write_bytes(bytes(data))
    return f"{f.relative_to(out)} {how}"


def run_reference(a) -> Path:
    out = Path(a.out) / "reference"
    launch = Launch(out, a, 0)
    codes = launch.wait(a.launch_timeout)
    if codes != [0] * WORLD:
        raise SystemExit(f"reference run failed: exit codes {codes}\n{launch.text()[-3000:]}")
    return out


def _next_save(step: int, a, rng: random.Random) -> int:
    first = (step // a.save_every + 1) * a.save_every
    saves = list(range(first, a.steps, a.save_every))
    return rng.choice(saves[:2]) if saves else -1


def run_chaos(a) -> dict:
    rng = random.Random(a.seed)
    kinds = [k for k in a.kinds.split(",") if k]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise SystemExit(f"--kinds: unknown {bad}; valid {list(KINDS)}")
    plan = [kinds[i % len(kinds)] for i in range(a.faults)]
    rng.shuffle(plan)
    out = Path(a.out) / "chaos"
    events, index, redone, damaged_expect = [], 0, 0, []
    while True:
        index += 1
        resumed = _latest_step(out)  # at most the step the launch will resume from
        kind = plan.pop(0) if plan and resumed < a.steps - 2 * a.save_every - 2 else None
        env, save_at = None, None
        if kind in ("kill_in_save", "enospc"):
            save_at = _next_save(resumed, a, rng)
            if save_at < 0:
                kind = None
            else:
                env = {FAULT_ENV: f"{'kill' if kind == 'kill_in_save' else 'enospc'}:{save_at}"}
        launch = Launch(out, a, index, env)
        deadline = time.time() + a.launch_timeout
        ev = {"launch": index, "kind": kind or "none", "resumed_from": resumed}
        t_fault = None
        if kind in ("kill_rank", "preempt", "stop_rank", "corrupt"):
            target = min(a.steps - 1, resumed + rng.randint(1, 2 * a.save_every))
            if kind == "corrupt":  # two checkpoints on disk: one to damage, one to fall back to
                target = max(target, 2 * a.save_every + 1)
            reached = launch.wait_step(target, deadline)
            rank = rng.randrange(WORLD)
            ev.update(at_step=reached, rank=rank)
            t_fault = time.time()
            if kind == "kill_rank":
                launch.signal(rank, signal.SIGKILL)
            elif kind == "preempt":
                launch.signal(rank, signal.SIGUSR1)
            elif kind == "corrupt":
                for r in range(WORLD):
                    launch.signal(r, signal.SIGKILL)
            else:  # stop_rank: the other rank must give up within parallel.timeout_s
                t0 = time.time()
                launch.signal(rank, signal.SIGSTOP)
                other = launch.procs[1 - rank]
                try:
                    other.wait(timeout=a.timeout_s * 4 + 60)
                except subprocess.TimeoutExpired:
                    pass
                ev["noticed_after_s"] = round(time.time() - t0, 1)
                launch.signal(rank, signal.SIGKILL)  # what the scheduler does next
        elif kind is not None:
            ev["save_at"] = save_at
        codes = launch.wait(max(1.0, deadline - time.time()))
        if t_fault is not None:
            ev["ended_after_s"] = round(time.time() - t_fault, 1)
        ev["as_expected"] = codes == _expected(ev["kind"], ev.get("rank"))
        logged = _rows(out / "metrics.csv") if (out / "metrics.csv").is_file() else []
        last = int(logged[-1]["step"]) if logged else 0
        ev.update(exit_codes=codes, last_logged=last, kept=_latest_step(out))
        ev["message"] = next(
            (
                ln
                for r in range(WORLD)
                for ln in launch.text(r).splitlines()
                if ln.startswith("error:")
            ),
            "",
        )
        skipped = [ln for ln in launch.text(0).splitlines() if "skipping damaged" in ln]
        if damaged_expect:
            ev["skipped_damaged"] = skipped
            if not skipped:
                raise SystemExit(f"launch {index}: the damaged checkpoint was not reported")
            damaged_expect = []
        if any(c in (1, 2) for c in codes):
            raise SystemExit(f"launch {index} failed: exit codes {codes}\n{launch.text()[-3000:]}")
        tags = list((out / "checkpoints").glob("global_step*"))
        if kind == "corrupt" and len(tags) >= 2:
            ev["damage"] = _damage(out, rng)
            damaged_expect = [ev["damage"]]
        got = re.search(r"\[resume\] from step (\d+)", launch.text(0))
        ev["resumed_from"] = int(got.group(1)) if got else 0
        if events:
            redone += max(0, events[-1]["last_logged"] - ev["resumed_from"])
        events.append(ev)
        print(json.dumps(ev), flush=True)
        if codes == [0] * WORLD:
            break
        if index > a.faults * 3 + 5:
            raise SystemExit("too many launches without finishing")
    return {"events": events, "steps_redone": redone, "out": str(out)}


def compare(ref: Path, got: Path) -> dict:
    """Max abs differences of the final adapter and Adam state; the metrics checks."""
    import torch
    from safetensors.torch import load_file

    def maxdiff(a: dict, b: dict) -> float:
        assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
        return max(((a[k].float() - b[k].float()).abs().max().item() for k in a), default=0.0)

    adapter = maxdiff(
        load_file(str(ref / "adapter" / "adapter_model.safetensors")),
        load_file(str(got / "adapter" / "adapter_model.safetensors")),
    )
    tag = (ref / "checkpoints" / "latest").read_text().strip()
    assert tag == (got / "checkpoints" / "latest").read_text().strip()
    o_ref = torch.load(ref / "checkpoints" / tag / "optimizer.pt", weights_only=True)
    o_got = torch.load(got / "checkpoints" / tag / "optimizer.pt", weights_only=True)
    optim = max(maxdiff(o_ref[k], o_got[k]) for k in ("exp_avg", "exp_avg_sq"))
    steps_equal = o_ref["step"] == o_got["step"]
    r_rows, g_rows = _rows(ref / "metrics.csv"), _rows(got / "metrics.csv")
    g_steps = [int(r["step"]) for r in g_rows]
    once = g_steps == [int(r["step"]) for r in r_rows]
    cols = [c for c in r_rows[0] if c not in TIMING_COLUMNS and c != "step"]
    metric = 0.0
    for r, g in zip(r_rows, g_rows):
        for c in cols:
            if r[c] != g[c]:
                metric = max(metric, abs(float(r[c]) - float(g[c])))
    return {
        "adapter_max_abs_diff": adapter,
        "adam_moments_max_abs_diff": optim,
        "adam_steps_equal": steps_equal,
        "metrics_rows": len(g_rows),
        "every_step_once": once,
        "metrics_max_abs_diff": metric,
    }


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    ref = run_reference(a)
    t_ref = time.time() - t0
    chaos = run_chaos(a)
    result = compare(ref, Path(chaos["out"]))
    events = chaos["events"]
    by_kind: dict[str, int] = {}
    for e in events:
        if e["kind"] != "none":
            by_kind[e["kind"]] = by_kind.get(e["kind"], 0) + 1
    report = {
        "command": "python bench/chaos.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "steps": a.steps,
        "save_every": a.save_every,
        "faults_by_kind": by_kind,
        "launches": len(events),
        "runs_survived": f"{sum(by_kind.values())}/{sum(by_kind.values())}",
        "steps_redone": chaos["steps_redone"],
        "silent_rank_noticed_after_s": [
            e["noticed_after_s"] for e in events if "noticed_after_s" in e
        ],
        "exit_codes_as_expected": f"{sum(e['as_expected'] for e in events)}/{len(events)}",
        "max_time_to_exit_after_fault_s": max(
            (e["ended_after_s"] for e in events if "ended_after_s" in e), default=None
        ),
        "timeout_s": a.timeout_s,
        "reference_s": round(t_ref, 1),
        "total_s": round(time.time() - t0, 1),
        **result,
        "events": events,
    }
    ok = (
        result["every_step_once"]
        and result["adam_steps_equal"]
        and result["adapter_max_abs_diff"] == 0.0
        and result["adam_moments_max_abs_diff"] == 0.0
        and result["metrics_max_abs_diff"] == 0.0
        and all(e["as_expected"] for e in events)
    )
    report["ok"] = ok
    print()
    head = ("launch", "fault", "resumed", "at", "exit codes", "logged")
    print("{:>6} {:>12} {:>7} {:>5} {:>12} {:>6}  message".format(*head))
    for e in events:
        print(
            f"{e['launch']:>6} {e['kind']:>12} {e['resumed_from']:>7} "
            f"{e.get('at_step', e.get('save_at', '')):>5} {str(e['exit_codes']):>12} "
            f"{e['last_logged']:>6}  {e['message'][:90]}"
        )
    print()
    shown = (
        "faults_by_kind", "launches", "exit_codes_as_expected", "steps_redone",
        "silent_rank_noticed_after_s", "max_time_to_exit_after_fault_s",
        "adapter_max_abs_diff", "adam_moments_max_abs_diff", "adam_steps_equal",
        "metrics_rows", "every_step_once", "metrics_max_abs_diff", "total_s", "ok",
    )  # fmt: skip
    for k in shown:
        print(f"{k:>30}: {report[k]}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


def _main() -> int:
    try:
        return main()
    finally:
        for p in LIVE:
            if p.poll() is None:
                p.kill()
                p.wait()


if __name__ == "__main__":
    sys.exit(_main())
