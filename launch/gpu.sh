#!/usr/bin/env bash
# Train on the GPUs of one host: one `cclm-jax train` process drives all local GPUs.
# Optionally one node of a multi-node run that is not managed by SLURM (see --coordinator).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu.sh --config FILE[:ARG] --workdir DIR [options] [-- TRAIN_ARGS...]

Runs, in the current directory, with GPU-friendly XLA settings:
  cclm-jax train --config FILE --workdir DIR TRAIN_ARGS...
JAX uses every visible GPU from this one process. Re-running with the same --workdir
resumes from its latest checkpoint.

Environment it sets:
  XLA_FLAGS   --xla_gpu_enable_latency_hiding_scheduler=true: overlap collectives
                (FSDP all-gathers, gradient reduce-scatters) with compute
              --xla_gpu_{all_reduce,all_gather,reduce_scatter}_combine_threshold_bytes=
                134217728: merge small per-parameter collectives into few large ones
              any XLA_FLAGS already set come after these, so they override them
  XLA_PYTHON_CLIENT_MEM_FRACTION   share of GPU memory JAX preallocates (--mem-fraction)

Options:
  --config FILE[:ARG]   config file (required)
  --workdir DIR         checkpoints and metrics, local path or gs:// (required)
  --venv DIR            run DIR/bin/cclm-jax (default: cclm-jax on PATH)
  --install             first create --venv if missing and pip install -e '.[gpu]' into it
                        (launch/install.sh); needs --venv
  --gpus LIST           only these GPUs, e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES)
  --mem-fraction F      XLA_PYTHON_CLIENT_MEM_FRACTION, in (0, 1] (default: 0.90)
  --no-xla-flags        do not add the XLA flags above
  --coordinator H:P     multi-node without SLURM: address of process 0's coordinator;
                        with --num-processes and --process-id, exports JAX_COORDINATOR_ADDRESS,
                        JAX_NUM_PROCESSES, JAX_PROCESS_ID and passes --config.distributed=True
  --num-processes N     number of nodes (one process each); multi-node only
  --process-id I        this node's index, 0..N-1; multi-node only
  --dry-run             print every command (one per line, prefixed with "+ ") and run nothing
  -h, --help            show this help
  -- TRAIN_ARGS...      everything after -- is passed to `cclm-jax train`

Examples:
  launch/gpu.sh --venv ~/cclm_venv --install --config configs/cclm_base.py \
      --workdir /data/runs/cclm1 -- --config.total_steps=30000
  # node 1 of 2, node 0 at 10.0.0.1:
  launch/gpu.sh --config configs/cclm_base.py --workdir gs://bucket/run1 \
      --coordinator 10.0.0.1:12345 --num-processes 2 --process-id 1
EOF
}

CONFIG="" WORKDIR="" VENV="" GPUS="" MEM_FRACTION=$GPU_MEM_FRACTION_DEFAULT
COORDINATOR="" NUM_PROCESSES="" PROCESS_ID=""
INSTALL=0 XLA_DEFAULTS=1
TRAIN_ARGS=()
while (($#)); do
  if [[ $1 == -- ]]; then TRAIN_ARGS=("${@:2}"); break; fi
  [[ $1 == --*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"
  case $1 in
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --venv) need_value "$@"; VENV=$2; shift 2 ;;
    --gpus) need_value "$@"; GPUS=$2; shift 2 ;;
    --mem-fraction) need_value "$@"; MEM_FRACTION=$2; shift 2 ;;
    --coordinator) need_value "$@"; COORDINATOR=$2; shift 2 ;;
    --num-processes) need_value "$@"; NUM_PROCESSES=$2; shift 2 ;;
    --process-id) need_value "$@"; PROCESS_ID=$2; shift 2 ;;
    --install) INSTALL=1; shift ;;
    --no-xla-flags) XLA_DEFAULTS=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help; arguments for cclm-jax train go after --)" ;;
  esac
done

require "$CONFIG" --config "the config file, e.g. --config configs/cclm_base.py"
require "$WORKDIR" --workdir "where checkpoints and metrics go, e.g. --workdir runs/cclm1"
[[ -f $(config_path "$CONFIG") ]] || die "option --config: no such file: $(config_path "$CONFIG") (relative to $PWD)"
((INSTALL == 0)) || [[ -n $VENV ]] || die "option --install needs --venv DIR (the virtualenv to install into)"
require_fraction "$MEM_FRACTION" --mem-fraction
[[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "option --gpus expects GPU indices like 0,1,2,3, got '$GPUS'"

DISTRIBUTED=0
if [[ -n $COORDINATOR$NUM_PROCESSES$PROCESS_ID ]]; then
  require "$COORDINATOR" --coordinator "host:port of process 0, needed with --num-processes/--process-id"
  require "$NUM_PROCESSES" --num-processes "the number of nodes, needed with --coordinator"
  require "$PROCESS_ID" --process-id "this node's index, needed with --coordinator"
  [[ $COORDINATOR =~ ^[^:[:space:]]+:[0-9]+$ ]] || die "option --coordinator expects HOST:PORT, got '$COORDINATOR'"
  require_uint "$NUM_PROCESSES" --num-processes
  require_uint "$PROCESS_ID" --process-id
  ((PROCESS_ID < NUM_PROCESSES)) ||
    die "option --process-id must be below --num-processes ($NUM_PROCESSES), got $PROCESS_ID"
  DISTRIBUTED=1
fi

if ((INSTALL)); then
  install=(bash "$REPO_ROOT/launch/install.sh" --venv "$VENV" --extra gpu)
  ((DRY_RUN)) && install+=(--dry-run)
  "${install[@]}"
fi

CLI=cclm-jax
[[ -n $VENV ]] && CLI=$VENV/bin/cclm-jax
if ((!DRY_RUN)) && ! command -v "$CLI" >/dev/null 2>&1; then
  die "$CLI not found; pass --venv DIR (with --install to create it) or install the package"
fi

xla_flags=${XLA_FLAGS:-}
((XLA_DEFAULTS)) && xla_flags="$GPU_XLA_FLAGS${xla_flags:+ $xla_flags}"
[[ -n $xla_flags ]] && run_export XLA_FLAGS "$xla_flags"
run_export XLA_PYTHON_CLIENT_MEM_FRACTION "$MEM_FRACTION"
[[ -n $GPUS ]] && run_export CUDA_VISIBLE_DEVICES "$GPUS"

train=("$CLI" train --config "$CONFIG" --workdir "$WORKDIR")
if ((DISTRIBUTED)); then
  run_export JAX_COORDINATOR_ADDRESS "$COORDINATOR"
  run_export JAX_NUM_PROCESSES "$NUM_PROCESSES"
  run_export JAX_PROCESS_ID "$PROCESS_ID"
  train+=(--config.distributed=True)
fi
run_exec "${train[@]}" "${TRAIN_ARGS[@]}"
