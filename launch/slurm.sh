#!/usr/bin/env bash
# Write (and with --submit, submit) an sbatch script that trains on several GPU nodes:
# one task per node, each driving all of its node's GPUs; jax.distributed detects SLURM.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/slurm.sh --nodes N --config FILE[:ARG] --workdir DIR [options] [-- TRAIN_ARGS...]

Writes an sbatch script (--out) that allocates N nodes with one task each and runs, from
this checkout (which must be on a filesystem every node sees),
  srun cclm-jax train --config FILE --workdir DIR --config.distributed=True TRAIN_ARGS...
jax.distributed.initialize() takes the coordinator, process count and process id from
SLURM. The script also exports JAX_LOCAL_DEVICE_IDS=0,...,G-1: without it JAX's SLURM
detection gives each process only the GPU numbered SLURM_LOCALID (0 with one task per node).
XLA_FLAGS and XLA_PYTHON_CLIENT_MEM_FRACTION are set as in launch/gpu.sh (see its --help).
Re-submitting with the same --workdir resumes from its latest checkpoint.

Options:
  --nodes N             number of nodes (required)
  --gpus-per-node G     GPUs per node (default: 8)
  --cpus-per-task C     CPUs for each node's task (default: the cluster's default)
  --partition P         SLURM partition (default: the cluster's default)
  --account A           SLURM account to charge (default: the user's default)
  --time T              time limit, e.g. 48:00:00 or 2-00:00:00 (default: the partition's)
  --job-name NAME       job name (default: cclm)
  --config FILE[:ARG]   config file, relative to the repository root or absolute (required)
  --workdir DIR         checkpoints and metrics: gs:// or a shared-filesystem path; a relative
                        path is taken from the current directory (required)
  --venv DIR            run DIR/bin/cclm-jax on the nodes (default: cclm-jax on the job's PATH)
  --mem-fraction F      XLA_PYTHON_CLIENT_MEM_FRACTION, in (0, 1] (default: 0.90)
  --no-xla-flags        do not add launch/gpu.sh's XLA flags
  --out FILE            where to write the sbatch script (default: ./NAME.sbatch)
  --submit              submit the written script with sbatch
  --dry-run             print the commands (writing the file as a here-document, then
                        sbatch with --submit) and run nothing
  -h, --help            show this help
  -- TRAIN_ARGS...      everything after -- is passed to `cclm-jax train`

Example:
  launch/slurm.sh --nodes 4 --gpus-per-node 8 --partition gpu --time 48:00:00 \
      --account my-lab --venv /shared/envs/cclm --config configs/cclm_base.py \
      --workdir /shared/runs/cclm1 --submit -- --config.total_steps=30000
EOF
}

NODES="" GPUS_PER_NODE=8 CPUS_PER_TASK="" PARTITION="" ACCOUNT="" TIME_LIMIT="" JOB_NAME=cclm
CONFIG="" WORKDIR="" VENV="" MEM_FRACTION=$GPU_MEM_FRACTION_DEFAULT OUT=""
XLA_DEFAULTS=1 SUBMIT=0
TRAIN_ARGS=()
while (($#)); do
  if [[ $1 == -- ]]; then TRAIN_ARGS=("${@:2}"); break; fi
  [[ $1 == --*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"
  case $1 in
    --nodes) need_value "$@"; NODES=$2; shift 2 ;;
    --gpus-per-node) need_value "$@"; GPUS_PER_NODE=$2; shift 2 ;;
    --cpus-per-task) need_value "$@"; CPUS_PER_TASK=$2; shift 2 ;;
    --partition) need_value "$@"; PARTITION=$2; shift 2 ;;
    --account) need_value "$@"; ACCOUNT=$2; shift 2 ;;
    --time) need_value "$@"; TIME_LIMIT=$2; shift 2 ;;
    --job-name) need_value "$@"; JOB_NAME=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --venv) need_value "$@"; VENV=$2; shift 2 ;;
    --mem-fraction) need_value "$@"; MEM_FRACTION=$2; shift 2 ;;
    --out) need_value "$@"; OUT=$2; shift 2 ;;
    --no-xla-flags) XLA_DEFAULTS=0; shift ;;
    --submit) SUBMIT=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help; arguments for cclm-jax train go after --)" ;;
  esac
done

require "$NODES" --nodes "the number of nodes, e.g. --nodes 4"
require "$CONFIG" --config "the config file, e.g. --config configs/cclm_base.py"
require "$WORKDIR" --workdir "a shared path or gs://, e.g. --workdir /shared/runs/cclm1"
require_positive "$NODES" --nodes
require_positive "$GPUS_PER_NODE" --gpus-per-node
[[ -z $CPUS_PER_TASK ]] || require_positive "$CPUS_PER_TASK" --cpus-per-task
require_one_word "$JOB_NAME" --job-name
require_one_word "$PARTITION" --partition
require_one_word "$ACCOUNT" --account
require_one_word "$TIME_LIMIT" --time
require_fraction "$MEM_FRACTION" --mem-fraction
config_file=$(config_path "$CONFIG")
[[ $config_file == /* ]] || config_file=$REPO_ROOT/$config_file
[[ -f $config_file ]] || die "option --config: no such file: $config_file"
[[ $WORKDIR == *://* || $WORKDIR == /* ]] || WORKDIR=$PWD/$WORKDIR
OUT=${OUT:-$PWD/$JOB_NAME.sbatch}
[[ -d $(dirname "$OUT") ]] || die "option --out: directory $(dirname "$OUT") does not exist"

# sbatch_script: the job script's text.
sbatch_script() {
  local cli=cclm-jax
  [[ -n $VENV ]] && cli=$VENV/bin/cclm-jax
  printf '#!/bin/bash\n'
  printf '# CCLM training on %s nodes x %s GPUs, written by launch/slurm.sh.\n' "$NODES" "$GPUS_PER_NODE"
  printf '#SBATCH --job-name=%s\n' "$JOB_NAME"
  printf '#SBATCH --nodes=%s\n' "$NODES"
  printf '#SBATCH --ntasks-per-node=1\n'
  printf '#SBATCH --gpus-per-node=%s\n' "$GPUS_PER_NODE"
  [[ -n $CPUS_PER_TASK ]] && printf '#SBATCH --cpus-per-task=%s\n' "$CPUS_PER_TASK"
  [[ -n $PARTITION ]] && printf '#SBATCH --partition=%s\n' "$PARTITION"
  [[ -n $ACCOUNT ]] && printf '#SBATCH --account=%s\n' "$ACCOUNT"
  [[ -n $TIME_LIMIT ]] && printf '#SBATCH --time=%s\n' "$TIME_LIMIT"
  printf '#SBATCH --output=%%x-%%j.out\n'
  printf 'set -euo pipefail\n'
  if ((XLA_DEFAULTS)); then
    printf '# XLA flags of launch/gpu.sh; XLA_FLAGS from the submitting shell come last and win.\n'
    printf 'export XLA_FLAGS="%s${XLA_FLAGS:+ $XLA_FLAGS}"\n' "$GPU_XLA_FLAGS"
  fi
  printf 'export XLA_PYTHON_CLIENT_MEM_FRACTION=%s\n' "$MEM_FRACTION"
  printf '# One process per node drives all its GPUs (JAX would otherwise pick GPU SLURM_LOCALID only).\n'
  printf 'export JAX_LOCAL_DEVICE_IDS=%s\n' "$(seq -s, 0 $((GPUS_PER_NODE - 1)))"
  printf 'cd %s\n' "$(quote_word "$REPO_ROOT")"
  printf 'srun --kill-on-bad-exit=1 %s\n' "$(quote_cmd "$cli" train --config "$CONFIG" \
    --workdir "$WORKDIR" --config.distributed=True "${TRAIN_ARGS[@]}")"
}

if ((DRY_RUN)); then
  printf '+ cat > %s <<'\''SBATCH_EOF'\''\n' "$(quote_word "$OUT")"
  sbatch_script
  printf 'SBATCH_EOF\n'
else
  sbatch_script >"$OUT"
  note "wrote $OUT"
fi
if ((SUBMIT)); then
  ((DRY_RUN)) || command -v sbatch >/dev/null 2>&1 ||
    die "option --submit: sbatch is not on PATH (run on a SLURM login node, or drop --submit)"
  run sbatch "$OUT"
else
  note "submit it with: sbatch $(quote_word "$OUT")"
fi
