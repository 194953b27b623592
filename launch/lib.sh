# Helpers shared by the launch scripts; sourced, never executed.
#
# Every state-changing command goes through `run`, so `--dry-run` prints the exact command lines
# (one per line, prefixed with "+ ", quoted so they can be pasted into bash) and runs nothing.
# A real run echoes the same lines to stderr before running each command.

# Set to 1 by the scripts' --dry-run option.
DRY_RUN=0

# Repository root (the directory above launch/).
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# XLA flags for GPU training, set by gpu.sh and slurm.sh (any XLA_FLAGS already in the environment
# are appended after these, so they win). Every flag must exist in the installed jaxlib: XLA aborts
# at start-up on an unknown flag, and tests/test_launch.py checks them against the local jaxlib.
#   latency hiding scheduler: schedules the async collectives (FSDP all-gathers, gradient
#     reduce-scatters and all-reduces) so that they overlap with compute instead of stalling it.
#   *_combine_threshold_bytes = 128 MiB: merges the many small per-parameter collectives into
#     a few large ones, which use NVLink / InfiniBand bandwidth far better.
GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_all_reduce_combine_threshold_bytes=134217728 \
--xla_gpu_all_gather_combine_threshold_bytes=134217728 \
--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728"

# Fraction of each GPU's memory that JAX preallocates (JAX's own default is 0.75); the rest is
# left to cuDNN / cuBLAS / NCCL workspaces.
GPU_MEM_FRACTION_DEFAULT=0.90

# die MESSAGE: print "<script>: error: MESSAGE" and exit 2 (bad usage or failed precondition).
die() {
  printf '%s: error: %s\n' "${0##*/}" "$*" >&2
  exit 2
}

# note MESSAGE: informational line on stderr.
note() {
  printf '%s: %s\n' "${0##*/}" "$*" >&2
}

# quote_word WORD: WORD as a single bash word; single-quoted only when it holds special characters.
quote_word() {
  local word=$1 escaped_quote="'\\''"
  if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/$escaped_quote}"
  fi
}

# quote_cmd WORD...: the words as one bash command line.
quote_cmd() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote_word "$word")"
  done
  printf '%s' "$out"
}

# run CMD ARG...: run a command, or only print it under --dry-run.
run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(quote_cmd "$@")"
  else
    printf '+ %s\n' "$(quote_cmd "$@")" >&2
    "$@"
  fi
}

# run_exec CMD ARG...: replace this shell with the command (so signals such as a preemption's
# SIGTERM reach it directly), or only print it under --dry-run.
run_exec() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(quote_cmd "$@")"
  else
    printf '+ %s\n' "$(quote_cmd "$@")" >&2
    exec "$@"
  fi
}

# run_export NAME VALUE: export an environment variable, or only print the export under --dry-run.
run_export() {
  if ((DRY_RUN)); then
    printf '+ export %s=%s\n' "$1" "$(quote_word "$2")"
  else
    printf '+ export %s=%s\n' "$1" "$(quote_word "$2")" >&2
    export "$1=$2"
  fi
}

# need_value OPTION ARGS...: fail unless OPTION (the first of the remaining arguments) has a value.
need_value() {
  [[ $# -ge 2 && -n $2 ]] || die "option $1 needs a value (see --help)"
}

# require VALUE OPTION HINT: fail with a message naming OPTION when VALUE is empty.
require() {
  [[ -n $1 ]] || die "missing required option $2 ($3); see --help"
}

# require_uint VALUE OPTION: fail unless VALUE is a non-negative integer.
require_uint() {
  [[ $1 =~ ^[0-9]+$ ]] || die "option $2 expects a non-negative integer, got '$1'"
}

# require_positive VALUE OPTION: fail unless VALUE is a positive integer.
require_positive() {
  [[ $1 =~ ^[1-9][0-9]*$ ]] || die "option $2 expects a positive integer, got '$1'"
}

# require_one_word VALUE OPTION: fail if VALUE contains whitespace (e.g. an #SBATCH value).
require_one_word() {
  [[ $1 != *[[:space:]]* ]] || die "option $2 must not contain whitespace, got '$1'"
}

# require_fraction VALUE OPTION: fail unless VALUE is a number in (0, 1].
require_fraction() {
  [[ $1 =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]] ||
    die "option $2 expects a number in (0, 1], got '$1'"
}

# config_path CONFIG: the file part of a `--config path.py[:arg]` value.
config_path() {
  printf '%s' "${1%%:*}"
}
