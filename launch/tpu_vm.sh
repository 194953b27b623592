#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create (or reuse) it, ship the code to every worker,
# install, run `cclm-jax train` on all workers at once, stream the logs, optionally delete it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh --name NAME --zone ZONE --accelerator TYPE --config FILE[:ARG]
                        --workdir gs://BUCKET/RUN [options] [-- TRAIN_ARGS...]

Steps (each one a gcloud command; --dry-run prints them all):
  1. reuse the TPU VM NAME if it is READY, else create it:
     gcloud compute tpus tpu-vm create NAME --zone ZONE --accelerator-type TYPE --version V
  2. copy the code to every worker: a `git archive` tarball of --ref from this checkout (only
     committed files travel), sent with `tpu-vm scp --recurse --worker=all`; or, with --repo,
     `git clone` of that URL (checked out at --ref) on every worker
  3. install on every worker (--worker=all): launch/install.sh creates $HOME/cclm_venv
     (Python >= 3.11) and pip-installs the code into it with the [tpu] extra
  4. train on every worker (--worker=all), output streamed here and appended to
     $HOME/cclm_train.log on each worker:
     cclm-jax train --config FILE --workdir gs://... --config.distributed=True TRAIN_ARGS...
  5. with --delete: delete the VM when the script ends, whether training succeeded or not

Resume: run the same command again. The VM is reused, the code re-copied, the install reuses
the venv and only updates what changed, and training resumes from the latest checkpoint in --workdir.
A preempted spot VM must be deleted first (the error message gives the command).

Options:
  --name NAME          TPU VM / pod slice name (required)
  --zone ZONE          zone, e.g. us-west4-a (required)
  --project PROJECT    Google Cloud project (default: gcloud's configured project)
  --accelerator TYPE   accelerator type, e.g. v5litepod-64, v4-32, v6e-256 (required)
  --version RUNTIME    TPU software version (default from the accelerator: v6e-* ->
                       v2-alpha-tpuv6e, v5p-* -> v2-alpha-tpuv5, v5litepod-* ->
                       v2-alpha-tpuv5-lite, v2/v3/v4-* -> tpu-ubuntu2204-base)
  --spot               create a spot VM (cheaper, can be preempted)
  --preemptible        create a preemptible VM (older form of --spot)
  --config FILE[:ARG]  config file, relative to the repository root (required)
  --workdir gs://...   checkpoints and metrics; a GCS path, since every worker writes
                       to it (required)
  --repo URL           clone this git URL on the workers instead of copying this checkout
  --ref REF            git commit, branch or tag to run (default: HEAD of this checkout;
                       with --repo, the repository's default branch)
  --env KEY=VALUE      environment variable for training on every worker (repeatable),
                       e.g. --env LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true
  --delete             delete the VM when the script ends (success or failure)
  --dry-run            print every command (one per line, prefixed with "+ ") and run nothing;
                       assumes the VM does not exist yet
  -h, --help           show this help
  -- TRAIN_ARGS...     everything after -- is passed to `cclm-jax train`

Example:
  launch/tpu_vm.sh --name cclm-v5e --zone us-west4-a --accelerator v5litepod-64 --spot \
      --config configs/cclm_base.py --workdir gs://my-bucket/cclm/run1 --delete \
      -- --config.total_steps=30000
EOF
}

NAME="" ZONE="" PROJECT="" ACCELERATOR="" VERSION="" CONFIG="" WORKDIR="" REPO_URL="" REF=""
SPOT=0 PREEMPTIBLE=0 DELETE=0
ENV_VARS=() TRAIN_ARGS=()
while (($#)); do
  if [[ $1 == -- ]]; then TRAIN_ARGS=("${@:2}"); break; fi
  [[ $1 == --*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --accelerator) need_value "$@"; ACCELERATOR=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --repo) need_value "$@"; REPO_URL=$2; shift 2 ;;
    --ref) need_value "$@"; REF=$2; shift 2 ;;
    --env) need_value "$@"; ENV_VARS+=("$2"); shift 2 ;;
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --delete) DELETE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help; arguments for cclm-jax train go after --)" ;;
  esac
done

# default_runtime TYPE: the TPU software version Google recommends for JAX on TYPE.
default_runtime() {
  case $1 in
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v5litepod-*) printf 'v2-alpha-tpuv5-lite' ;;
    v2-* | v3-* | v4-*) printf 'tpu-ubuntu2204-base' ;;
    *) return 1 ;;
  esac
}

require "$NAME" --name "the TPU VM / pod slice name, e.g. --name cclm-v5e"
require "$ZONE" --zone "the zone, e.g. --zone us-west4-a"
require "$ACCELERATOR" --accelerator "the accelerator type, e.g. --accelerator v5litepod-64"
require "$CONFIG" --config "the config file, e.g. --config configs/cclm_base.py"
require "$WORKDIR" --workdir "a GCS path, e.g. --workdir gs://my-bucket/cclm/run1"
[[ $WORKDIR == gs://?* ]] ||
  die "option --workdir must be a gs:// path that every TPU worker can write to, got '$WORKDIR'"
((SPOT + PREEMPTIBLE < 2)) || die "options --spot and --preemptible exclude each other; pick one"
if [[ -z $VERSION ]]; then
  VERSION=$(default_runtime "$ACCELERATOR") ||
    die "no default TPU software version for accelerator '$ACCELERATOR'; pass --version"
fi
for assignment in "${ENV_VARS[@]}"; do
  [[ $assignment =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] ||
    die "option --env expects KEY=VALUE with KEY a shell variable name, got '$assignment'"
done

if [[ -z $REPO_URL ]]; then
  REF=${REF:-HEAD}
  git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
    die "$REPO_ROOT is not a git checkout, so it cannot be archived; pass --repo URL"
  git -C "$REPO_ROOT" rev-parse --verify --quiet "$REF^{commit}" >/dev/null ||
    die "option --ref: '$REF' is not a commit in $REPO_ROOT"
  git -C "$REPO_ROOT" cat-file -e "$REF:$(config_path "$CONFIG")" 2>/dev/null ||
    die "option --config: $(config_path "$CONFIG") is not committed in $REF of $REPO_ROOT (only committed files are copied)"
  if [[ $REF == HEAD && -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
    note "warning: uncommitted changes in $REPO_ROOT are not copied (git archive ships HEAD)"
  fi
fi

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[[ -n $PROJECT ]] && WHERE+=(--project "$PROJECT")
# Remote paths; "$HOME" is expanded by the worker's shell.
CODE_DIR='"$HOME/cclm_jax"'
VENV_DIR='"$HOME/cclm_venv"'

# on_all_workers COMMAND: run a shell command on every worker of the VM.
on_all_workers() {
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$1"
}

delete_vm() {
  run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet
}

# ---- 1. the VM -------------------------------------------------------------------------------
describe=("${TPU[@]}" describe "$NAME" "${WHERE[@]}" --format=value\(state\))
state=""
if ((DRY_RUN)); then
  run "${describe[@]}"
  note "dry run: assuming the TPU VM $NAME does not exist yet"
else
  printf '+ %s\n' "$(quote_cmd "${describe[@]}")" >&2
  state=$("${describe[@]}" 2>/dev/null) || state=""
fi
if [[ -z $state ]]; then
  create=("${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type "$ACCELERATOR" --version "$VERSION")
  ((SPOT)) && create+=(--spot)
  ((PREEMPTIBLE)) && create+=(--preemptible)
  run "${create[@]}"
elif [[ $state == READY ]]; then
  note "reusing the TPU VM $NAME (READY)"
else
  die "the TPU VM $NAME exists but is $state; delete it ($(quote_cmd "${TPU[@]}" delete "$NAME" "${WHERE[@]}")) and run again"
fi
if ((DELETE)); then
  trap 'status=$?; delete_vm || note "could not delete $NAME; delete it by hand"; exit $status' EXIT
fi

# ---- 2. the code -----------------------------------------------------------------------------
if [[ -z $REPO_URL ]]; then
  tarball=${TMPDIR:-/tmp}/cclm_jax-$NAME.tar.gz
  run git -C "$REPO_ROOT" archive --format=tar.gz --prefix=cclm_jax/ -o "$tarball" "$REF"
  run "${TPU[@]}" scp --recurse "$tarball" "$NAME:cclm_jax.tar.gz" "${WHERE[@]}" --worker=all
  run rm -f "$tarball"
  on_all_workers "rm -rf $CODE_DIR && tar -xzf \"\$HOME/cclm_jax.tar.gz\" -C \"\$HOME\""
else
  fetch="rm -rf $CODE_DIR && git clone --quiet $(quote_word "$REPO_URL") $CODE_DIR"
  [[ -n $REF ]] && fetch+=" && git -C $CODE_DIR checkout --quiet $(quote_word "$REF")"
  on_all_workers "$fetch"
fi

# ---- 3. install ------------------------------------------------------------------------------
on_all_workers "bash $CODE_DIR/launch/install.sh --venv $VENV_DIR --extra tpu"

# ---- 4. train --------------------------------------------------------------------------------
train="set -o pipefail;"
for assignment in "${ENV_VARS[@]}"; do
  train+=" export ${assignment%%=*}=$(quote_word "${assignment#*=}");"
done
train+=" cd $CODE_DIR && \"\$HOME/cclm_venv/bin/cclm-jax\" $(quote_cmd train --config "$CONFIG" \
  --workdir "$WORKDIR" --config.distributed=True "${TRAIN_ARGS[@]}") 2>&1 | tee -a \"\$HOME/cclm_train.log\""
on_all_workers "$train"
