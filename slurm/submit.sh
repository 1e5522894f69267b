#!/bin/bash
# Submit slurm/train.sbatch with a consistent node/task/GPU layout.
#
#   slurm/submit.sh --nodes N --gpus-per-node G --time HH:MM:SS --config PATH \
#       [--partition P] [--account A] [--cpus-per-task C] [--job-name NAME] \
#       [--signal-seconds S] [--cpu] [--dry-run] [-- extra train.py args]
#
# One task (rank) per GPU: --ntasks-per-node=G and --gpus-per-node=G. With --cpu, G is
# the number of CPU ranks per node, no GPUs are requested and LORAMOE_DEVICE=cpu.
# Logs go to ${LOG_DIR:-logs}/<job-name>-<jobid>.out (appended across requeues).
# Prints the job id. TRAIN_CMD, LORAMOE_VENV, MAX_REQUEUES... pass through the
# environment (sbatch exports it).
set -euo pipefail

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

nodes="" gpus="" time_limit="" config="" partition="" account="" cpus_per_task=""
job_name="loramoe" signal_seconds="" cpu=0 dry_run=0
while (($#)); do
    case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --gpus-per-node) gpus=$2; shift 2 ;;
    --time) time_limit=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --partition) partition=$2; shift 2 ;;
    --account) account=$2; shift 2 ;;
    --cpus-per-task) cpus_per_task=$2; shift 2 ;;
    --job-name) job_name=$2; shift 2 ;;
    --signal-seconds) signal_seconds=$2; shift 2 ;;
    --cpu) cpu=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) echo "submit.sh: unknown argument '$1'" >&2; usage ;;
    esac
done

die() { echo "submit.sh: $*" >&2; exit 2; }
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer (got '${nodes}')"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer (got '${gpus}')"
[[ "$time_limit" =~ ^([0-9]+-)?[0-9]{1,2}:[0-9]{2}:[0-9]{2}$ ]] ||
    die "--time must be HH:MM:SS or D-HH:MM:SS (got '${time_limit}')"
if [[ -z "${TRAIN_CMD:-}" ]]; then
    [[ -n "$config" ]] || die "--config is required"
    [[ -f "$config" ]] || die "--config file '${config}' does not exist"
fi
[[ -z "$signal_seconds" || "$signal_seconds" =~ ^[0-9]+$ ]] ||
    die "--signal-seconds must be an integer"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log_dir=${LOG_DIR:-${repo}/logs}

args=(
    --job-name="$job_name"
    --nodes="$nodes"
    --ntasks-per-node="$gpus"
    --time="$time_limit"
    --chdir="$repo"
    --output="${log_dir}/%x-%j.out"
)
if ((cpu)); then
    export LORAMOE_DEVICE=cpu
else
    args+=(--gpus-per-node="$gpus")
    export LORAMOE_DEVICE=${LORAMOE_DEVICE:-gpu}
fi
[[ -n "$partition" ]] && args+=(--partition="$partition")
[[ -n "$account" ]] && args+=(--account="$account")
[[ -n "$cpus_per_task" ]] && args+=(--cpus-per-task="$cpus_per_task")
[[ -n "$signal_seconds" ]] && args+=(--signal="B:USR1@${signal_seconds}")

export CONFIG="$config" LORAMOE_ROOT="$repo"
if ((dry_run)); then
    printf '%q ' sbatch --parsable "${args[@]}" "${repo}/slurm/train.sbatch" "$@"
    echo
    exit 0
fi
mkdir -p "$log_dir" # sbatch does not create the --output directory
sbatch --parsable "${args[@]}" "${repo}/slurm/train.sbatch" "$@"
