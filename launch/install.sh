#!/usr/bin/env bash
# Create a virtualenv (Python >= 3.11) and pip-install this checkout into it, editable.
# Used on TPU VM workers by tpu_vm.sh and locally by gpu.sh --install.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/install.sh --venv DIR [--extra NAME] [--python X.Y] [--dry-run]

Creates the virtualenv DIR unless it already exists, then installs this checkout into it:
  DIR/bin/python -m pip install -e '<repository root>[NAME]'
Re-running it is cheap: an existing venv is reused and pip only installs what changed.

Options:
  --venv DIR      virtualenv to create or reuse (required)
  --extra NAME    setup.py extra(s) to install, comma-separated: tpu (jax[tpu]), gpu
                  (jax[cuda12]), test, torch; "none" installs the base package (default: none)
  --python X.Y    Python version for a new venv (default: 3.12). The first of pythonX.Y,
                  python3.12, python3.11, python3 that is >= 3.11 creates it; when none is
                  (Ubuntu 22.04 TPU VM images ship Python 3.10), uv is installed with
                  `pip install --user` and fetches Python X.Y.
  --dry-run       print the commands (one per line, prefixed with "+ ") and run nothing
  -h, --help      show this help

Example:
  launch/install.sh --venv ~/cclm_venv --extra gpu
EOF
}

VENV="" EXTRA=none PYTHON_VERSION=3.12
while (($#)); do
  [[ $1 == --*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"
  case $1 in
    --venv) need_value "$@"; VENV=$2; shift 2 ;;
    --extra) need_value "$@"; EXTRA=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON_VERSION=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

require "$VENV" --venv "the virtualenv to create or reuse, e.g. --venv ~/cclm_venv"
[[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] || die "option --python expects a version like 3.12, got '$PYTHON_VERSION'"

# pip_target: the repository root, with '[extras]' after checking each one against setup.py.
pip_target() {
  [[ $EXTRA == none ]] && { printf '%s' "$REPO_ROOT"; return; }
  local name
  for name in ${EXTRA//,/ }; do
    grep -Eq "^[[:space:]]*\"$name\":" "$REPO_ROOT/setup.py" ||
      die "option --extra: '$name' is not an extra in $REPO_ROOT/setup.py (EXTRAS_REQUIRE)"
  done
  printf '%s[%s]' "$REPO_ROOT" "$EXTRA"
}

# python_ok CMD: true when CMD runs a Python >= 3.11.
python_ok() {
  command -v "$1" >/dev/null 2>&1 &&
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

TARGET=$(pip_target)
if [[ -e $VENV/bin/python ]]; then
  python_ok "$VENV/bin/python" || die "option --venv: $VENV holds a Python older than 3.11; remove it or pick another --venv"
  note "reusing the virtualenv $VENV"
else
  creator=""
  for candidate in "python$PYTHON_VERSION" python3.12 python3.11 python3; do
    if python_ok "$candidate"; then creator=$candidate; break; fi
  done
  if [[ -n $creator ]]; then
    run "$creator" -m venv "$VENV"
  else
    note "no Python >= 3.11 on PATH; installing uv to fetch Python $PYTHON_VERSION"
    run python3 -m pip install --user --upgrade uv
    run python3 -m uv venv --seed --python "$PYTHON_VERSION" "$VENV"
  fi
fi
run "$VENV/bin/python" -m pip install --upgrade pip
run "$VENV/bin/python" -m pip install -e "$TARGET"
