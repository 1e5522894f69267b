#!/usr/bin/env bash
# Run the whole CPU test suite (unit, multi-rank gloo, launch integration) after
# setting up the environment. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launcher/setup.sh
. .venv/bin/activate
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check loramoe_ds launcher tests bench tools
ruff format --check loramoe_ds launcher tests bench tools
set +e
python -m pytest -m "not gpu" -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests -- treating as failure" >&2
  exit 1
fi
exit "$rc"
