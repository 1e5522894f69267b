"""One training step of a real model: frozen floor vs LoRA vs LoRAMoE vs MoLA, side by side.

A step is forward + backward + AdamW (the floor has no trainable weight, so it
is forward + backward through every layer down to the input embeddings, which
is what any adapter's backward has to do too). Every configuration gets its own
model; the frozen base weights are *shared* between them (one copy in memory),
and the configurations are timed round-robin in one process (rotating order,
median of ``--repeats`` steps), so background load hits all alike.

Configurations (all adapt the FFN ``gate_proj, up_proj, down_proj``, E=6, r=4,
expert dropout 0.05 unless flags say otherwise):

* ``floor``: the frozen model, no adapter;
* ``lora``: peft LoRA with rank E*r (equal total rank, same dropout);
* ``soft``: LoRAMoE soft routing with the LBC loss (beta 0.1);
* ``top2_dense``: MoLA top-2, the dense masked path;
* ``top2_grouped``: MoLA top-2, sorted rows + grouped GEMM;
* ``soft_prev``, ``top2_dense_prev`` (not run by default): the adapted linear's
  previous forward (fp32 router upcast saved for the backward, a Bernoulli per
  element for dropout, separate scale and residual-add passes), kept here so
  that before/after are measured side by side in one run.

Reported per configuration: median step time, tokens/s, peak memory of the
step (CUDA: ``max_memory_allocated`` minus the memory held before the step;
CPU: peak RSS of the step, from Linux's resettable ``VmHWM``, minus RSS before
it), the overhead over the floor, and on CUDA the MFU (model FLOPs of the step
over the device's peak; see :func:`step_flops`).

    python bench/step.py                                   # CPU: SmolLM2, fp32
    python bench/step.py --device cuda --dtype bf16        # SmolLM2 + a 1B Llama
    python bench/step.py --models smollm2,llama1b --repeats 3 --write-doc
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from loramoe_ds.config import AdapterConfig
from loramoe_ds.model.inject import inject

FFN = ("gate_proj", "up_proj", "down_proj")
CONFIGS = ("floor", "lora", "soft", "top2_dense", "top2_grouped")
PREV = ("soft_prev", "top2_dense_prev")
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
DOC_HEADING = "## One training step (`bench/step.py`)"

#: Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, for the MFU.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12, "4090": 165e12, "3090": 71e12}  # fmt: skip


def llama1b_config():
    """A Llama-3.2-1B-shaped config (1.24 B parameters), built locally, no download."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    )


def load_base(name: str, dtype: torch.dtype, device: str):
    """The frozen base model: SmolLM2-135M (converted once, cached) or a random 1B Llama."""
    import transformers

    if name == "smollm2":
        from loramoe_ds.smollm2 import ensure_smollm2

        model = transformers.AutoModelForCausalLM.from_pretrained(ensure_smollm2(), dtype=dtype)
    elif name == "llama1b":
        torch.manual_seed(0)
        with torch.device(device):  # initialise on the device (1.2 B weights)
            model = transformers.AutoModelForCausalLM.from_config(llama1b_config(), dtype=dtype)
    elif name == "tiny":  # smoke tests of this script
        from loramoe_ds.tiny import tiny_model

        model = tiny_model("llama", seed=0, vocab_size=256, layers=2, hidden=64).to(dtype)
    else:
        raise ValueError(
            f"--models entry {name!r}: valid values are ['smollm2', 'llama1b', 'tiny']"
        )
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).train()


def share_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of ``base`` that shares its (frozen) parameters and buffers."""
    memo = {id(t): t for t in [*base.parameters(), *base.buffers()]}
    return copy.deepcopy(base, memo)


@dataclass
class Setup:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    kind: str  # "hf" (model(**batch).loss) or "moe" (LoRAMoEModel)
    trainable: int  # trainable parameters
    expert_flop_fraction: float  # share of the adapter weights one token really uses


def prev_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The adapted linear's forward before the step-overhead work (dense paths only)."""
    from loramoe_ds.model.experts import dense_gates
    from loramoe_ds.model.router import Routing

    y = self.base(x)
    x_TD = x.reshape(-1, self.in_features)
    r = self.router
    logits = torch.nn.functional.linear(x_TD.float(), r.weight.float())
    probs = torch.softmax(logits, dim=-1)
    if r.mode == "soft":
        routing = Routing(logits, probs, probs, None)
        g_TE = probs
    else:
        top, idx = torch.topk(probs, r.top_k, dim=-1)
        routing = Routing(logits, probs, top / top.sum(-1, keepdim=True), idx)
        g_TE = dense_gates(routing.gates_TK, idx, r.num_experts, None)
    xd = torch.nn.functional.dropout(x_TD, self.dropout, self.training) if self.dropout else x_TD
    bank = self.experts
    E, R = bank.num_experts, bank.rank
    h = xd @ bank.lora_A.reshape(E * R, self.in_features).t()
    h = (h.view(-1, E, R) * g_TE.to(h.dtype).unsqueeze(-1)).view(-1, E * R)
    delta = h @ bank.lora_B.reshape(E * R, self.out_features)
    if self.recorder is not None:
        self.recorder.record(self, routing)
    return y + (self.scaling * delta).view(*x.shape[:-1], self.out_features).to(y.dtype)


def build(name: str, base, args) -> Setup:
    """One configuration's model on top of a shared copy of ``base``."""
    if name not in (*CONFIGS, *PREV):
        raise ValueError(f"--configs entry {name!r}: valid values are {[*CONFIGS, *PREV]}")
    model = share_copy(base)
    E, R = args.experts, args.rank
    if name == "floor":
        model.enable_input_require_grads()  # backward reaches the embeddings
        return Setup(name, model, None, "hf", 0, 1.0)
    if name == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=E * R, lora_alpha=args.alpha * E, lora_dropout=args.dropout, target_modules=list(FFN)
        )
        model = get_peft_model(model, cfg, autocast_adapter_dtype=False)  # same dtype as ours
        frac = 1.0
    else:
        router = "soft" if name.startswith("soft") else "topk"
        cfg = AdapterConfig(
            target_modules=FFN,
            rank=R,
            alpha=args.alpha,
            dropout=args.dropout,
            router=router,
            top_k=2,
            num_experts=E,
            lbc_beta=0.1 if router == "soft" else 0.0,
        )
        model = inject(model, cfg)
        for layer in model.moe_layers():
            layer.topk_impl = "grouped" if name == "top2_grouped" else "dense"
            if name in PREV:
                layer.forward = types.MethodType(prev_forward, layer)
        frac = 1.0 if name != "top2_grouped" else 2 / E
    model.to(args.device)  # the new adapter weights; the shared base is there already
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    n = sum(p.numel() for p in params)
    return Setup(name, model, opt, "hf" if name == "lora" else "moe", n, frac)


def make_batch(vocab: int, args, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=g)
    task = torch.randint(0, 2, (args.batch,), generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": ids.to(device),
        "task_type": task.to(device),
    }


def run_step(s: Setup, batch: dict) -> float:
    if s.optimizer is not None:
        s.optimizer.zero_grad(set_to_none=True)
    if s.kind == "moe":
        loss = s.model(**batch).loss
    else:
        loss = s.model(**{k: v for k, v in batch.items() if k != "task_type"}).loss
    loss.backward()
    if s.optimizer is not None:
        s.optimizer.step()
    return float(loss.detach())


# -- memory --------------------------------------------------------------------
def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: reset VmHWM
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def timed_step(s: Setup, batch: dict, device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    run_step(s, batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def step_memory(s: Setup, batch: dict, device: str) -> float | None:
    """Peak memory of one step above what is held before it (MiB).

    CUDA: ``max_memory_allocated``. CPU: freed heap is first returned to the OS
    (``malloc_trim``), then Linux's peak-RSS mark is reset (``clear_refs``) and
    read back after the step; ``None`` where that is not available.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_step(s, batch)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    _malloc_trim()
    before = _rss_kib("VmRSS") if _reset_hwm() else None
    run_step(s, batch)
    hwm = _rss_kib("VmHWM")
    return (hwm - before) / 1024 if before is not None and hwm is not None else None


# -- FLOPs ---------------------------------------------------------------------
def step_flops(base, s: Setup, tokens: int, seq: int) -> float:
    """Model FLOPs of one step (the MFU numerator).

    Frozen weights: forward 2 + input-gradient 2 FLOPs per weight per token (no
    weight gradient); trainable adapter weights: 6 per weight per token, scaled
    by the share a token really uses (top-k grouped: k/E; dense paths compute
    every expert, counted in full); attention scores: ``12 * L * S * d`` per
    token (forward 4, backward 8; causal masking not discounted, as in PaLM).
    """
    cfg = base.config
    frozen = sum(p.numel() for n, p in base.named_parameters() if "embed_tokens" not in n)
    if cfg.tie_word_embeddings:
        frozen += base.get_output_embeddings().weight.numel()
    attn = 12 * cfg.num_hidden_layers * seq * cfg.num_attention_heads * cfg.head_dim
    return tokens * (4 * frozen + 6 * s.trainable * s.expert_flop_fraction + attn)


def peak_flops(device: str, dtype: torch.dtype, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, val in PEAK_BF16.items():
        if key in name:
            return val if dtype == torch.bfloat16 else None
    return None


# -- driver --------------------------------------------------------------------
def bench_model(model_name: str, args, dtype) -> list[dict]:
    base = load_base(model_name, dtype, args.device)
    batch = make_batch(base.config.vocab_size, args, args.device)
    names = [c for c in args.configs.split(",") if c]
    setups = {n: build(n, base, args) for n in names}
    for s in setups.values():  # warm-up (allocates AdamW state, autotunes kernels)
        for _ in range(args.warmup):
            run_step(s, batch)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpus: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for n in order:
            dt, cpu = timed_step(setups[n], batch, args.device)
            times[n].append(dt)
            cpus[n].append(cpu)
    mems = {n: step_memory(setups[n], batch, args.device) for n in names}  # after the timing
    tokens = args.batch * args.seq
    peak = peak_flops(args.device, dtype, args.peak_tflops)

    def over(samples: dict[str, list[float]], n: str) -> float | None:
        """Median over rounds of this config's time over the floor's in the same round."""
        if "floor" not in samples:
            return None
        return (statistics.median(a / b for a, b in zip(samples[n], samples["floor"])) - 1) * 100

    rows = []
    for n in names:
        t, c = statistics.median(times[n]), statistics.median(cpus[n])
        rows.append(
            {
                "model": model_name,
                "config": n,
                "ms": t * 1e3,
                "tok_s": tokens / t,
                "mem": mems[n],
                "over": over(times, n),
                "cpu_s": c,
                "over_cpu": over(cpus, n),
                "mfu": step_flops(base, setups[n], tokens, args.seq) / t / peak if peak else None,
                "trainable": setups[n].trainable,
                "all_ms": times[n],
                "all_cpu": cpus[n],
            }
        )
    return rows


def header(args, dtype) -> list[str]:
    dev = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    return [
        f"# bench/step.py  device={args.device} ({dev}) threads={torch.get_num_threads()} "
        f"dtype={dtype} batch={args.batch}x{args.seq} E={args.experts} r={args.rank} "
        f"dropout={args.dropout} torch={torch.__version__}",
        f"# step = forward + backward + AdamW, median of {args.repeats} (round-robin, "
        f"{args.warmup} warm-up); load average at start {os.getloadavg()[0]:.2f}",
        "# over floor = median over rounds of (step / floor step of the same round) - 1",
        "# CPU ms = process CPU time of the step (all threads; robust to other jobs "
        "taking the cores, not to their memory traffic)",
    ]


def table(rows: list[dict]) -> list[str]:
    out = [
        "| model | configuration | step ms | tokens/s | peak mem MiB | over floor | CPU ms "
        "| over floor (CPU) | MFU | trainable |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = f"{r['mem']:.0f}" if r["mem"] is not None else "-"
        over = f"{r['over']:+.1f}%" if r["over"] is not None else "-"
        over_c = f"{r['over_cpu']:+.1f}%" if r["over_cpu"] is not None else "-"
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "-"
        out.append(
            f"| {r['model']} | {r['config']} | {r['ms']:.0f} | {r['tok_s']:.0f} | {mem} | "
            f"{over} | {r['cpu_s'] * 1e3:.0f} | {over_c} | {mfu} | {r['trainable']:,} |"
        )
    return out


def write_doc(lines: list[str], note: str, command: str) -> None:
    """Replace (or append) the step section of docs/benchmarks.md, keeping the others."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    section = (
        f"{DOC_HEADING}\n\n`{command}`\n\n```\n" + "\n".join(lines) + "\n```\n\n" + note
    ).rstrip() + "\n"
    start = text.find(DOC_HEADING)
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(DOC_HEADING))
        text = text[:start] + section + ("" if end < 0 else text[end:])
    DOC.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    ap.add_argument("--models", default=None, help="comma list of smollm2, llama1b")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"of {[*CONFIGS, *PREV]}")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--experts", type=int, default=6)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for the MFU")
    ap.add_argument("--write-doc", action="store_true", help="update docs/benchmarks.md")
    ap.add_argument("--doc-note", default="", help="text under the table in the doc")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    ]
    models = args.models or ("smollm2,llama1b" if args.device == "cuda" else "smollm2")
    lines = header(args, dtype)
    for line in lines:
        print(line, flush=True)
    rows = []
    for m in models.split(","):
        rows += bench_model(m, args, dtype)
    lines += table(rows)
    for line in lines[4:]:
        print(line)
    for r in rows:
        print(
            f"# {r['model']} {r['config']} wall ms: "
            + " ".join(f"{x * 1e3:.0f}" for x in r["all_ms"])
            + " | CPU ms: "
            + " ".join(f"{x * 1e3:.0f}" for x in r["all_cpu"])
        )
    if args.write_doc:
        import sys

        write_doc(lines, args.doc_note, "python " + " ".join(["bench/step.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
