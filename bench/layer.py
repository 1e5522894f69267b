"""Fused LoRA-expert layer vs the per-expert loop (original LoRAMoE) vs one LoRA of rank E*r.

Times forward+backward of the adapter part of one linear (router + expert
mixture; the frozen base GEMM is identical for all methods and excluded), for
T tokens, over (d_in, d_out), E, r, soft and top-2 routing. Prints one table
with the ratios measured in the same run.

    python bench/layer.py [--device cpu|cuda] [--tokens 2048] [--repeats 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from loramoe_ds.model.experts import ExpertBank, local_mixture
from loramoe_ds.model.reference import loop_mixture
from loramoe_ds.model.router import Router


def _time_interleaved(fns: dict, repeats: int, device: str) -> dict[str, float]:
    """Median time of each function, measured round-robin (rotating order) so that
    background load on a shared machine hits every method alike."""

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for f in fns.values():  # warm-up
        f()
    sync()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            sync()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def bench_one(T, d_in, d_out, E, R, mode, repeats, device, dtype):
    torch.manual_seed(0)
    bank = ExpertBank(E, d_in, d_out, R).to(device, dtype)
    with torch.no_grad():
        bank.lora_B.normal_(std=0.02)
    router = Router(d_in, E, "soft" if mode == "soft" else "topk", 2).to(device, dtype)
    lora_A = torch.nn.Parameter(torch.randn(E * R, d_in, device=device, dtype=dtype) * 0.02)
    lora_B = torch.nn.Parameter(torch.randn(d_out, E * R, device=device, dtype=dtype) * 0.02)
    x = torch.randn(T, d_in, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(T, d_out, device=device, dtype=dtype)

    def fused():
        local_mixture(bank, x, router(x)).backward(g)

    def grouped():
        local_mixture(bank, x, router(x), topk_impl="grouped").backward(g)

    def loop():
        loop_mixture(bank, x, router(x)).backward(g)

    def lora():
        ((x @ lora_A.t()) @ lora_B.t()).backward(g)

    fns = {"fused": fused, "loop": loop, "lora": lora}
    if mode != "soft":
        fns["grouped"] = grouped
    return _time_interleaved(fns, repeats, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dims", default="576x1536,2048x5632")
    ap.add_argument("--experts", default="2,4,8")
    ap.add_argument("--ranks", default="4,8")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    dims = [tuple(int(v) for v in d.split("x")) for d in args.dims.split(",")]
    dev_name = (
        torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    )
    print(
        f"# bench/layer.py  device={args.device} ({dev_name}) threads={torch.get_num_threads()} "
        f"dtype={dtype} T={args.tokens} torch={torch.__version__}"
    )
    print(
        "# time = median fwd+bwd of router + expert mixture (ms), methods timed round-robin; "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )
    print(
        "# fused = the layer's default path (soft: 2 GEMMs; top-2: dense masked gates when "
        "E*r <= 256); grouped = sorted rows + grouped GEMM"
    )
    hdr = (
        "| d_in x d_out | E | r | routing | fused ms | grouped ms | loop ms | LoRA(E*r) ms "
        "| loop/fused | fused/LoRA |"
    )
    print(hdr)
    print("|" + "---|" * 10)
    for d_in, d_out in dims:
        for E in (int(e) for e in args.experts.split(",")):
            for R in (int(r) for r in args.ranks.split(",")):
                for mode in ("soft", "top2"):
                    t = bench_one(
                        args.tokens, d_in, d_out, E, R, mode, args.repeats, args.device, dtype
                    )
                    print(
                        f"| {d_in}x{d_out} | {E} | {R} | {mode} | {t['fused'] * 1e3:.2f} | "
                        + (f"{t['grouped'] * 1e3:.2f}" if "grouped" in t else "-")
                        + f" | {t['loop'] * 1e3:.2f} | {t['lora'] * 1e3:.2f} | "
                        f"{t['loop'] / t['fused']:.2f}x | {t['fused'] / t['lora']:.2f}x |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
