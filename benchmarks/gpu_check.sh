#!/usr/bin/env bash
# GPU check: the released cclm_base (Swin-B 224 + 12 XLM-R-large layers) image–caption and sentence-pair train
# steps at batch 128 per chip in bfloat16 on the accelerators of this machine; prints a short table (examples/s,
# MFU, compile time, memory) and writes the full one. Meant to finish in under 5 minutes on one H100/H200.
#
#   benchmarks/gpu_check.sh             # on a GPU machine
#   benchmarks/gpu_check.sh --dry-run   # the same code path on CPU with configs/tiny.py, batch 8 (a few minutes)
#
# Installs nothing from the network. The accelerator image this project is lent has jax, flax, optax, numpy and
# absl but not ml_collections: carry its wheel in `.whl/` (ignored by git) and this script installs it from
# there into /tmp/site. Prepare it once on the development machine, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0
# and name `.whl` in the device run's `carry`. Nothing else is needed there (no TensorFlow: batches are synthetic).
#
# Environment: PYTHON (default python3), OUT (where results go; default /tmp/gpu_check), STEPS (timed steps per
# kind, default 5), EXTRA (more train_step.py arguments, e.g. "--variant xla_attn:model.attention_impl=xla").
# Results: $OUT/gpu_check.json (raw) and $OUT/RESULTS_gpu.md (a `## Train step` subsection to merge into
# benchmarks/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
STEPS=${STEPS:-5}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"

if [[ "${1:-}" == "--dry-run" ]]; then
  export JAX_PLATFORMS=cpu
  CONFIG=configs/tiny.py BATCH=8 STEPS=2
  LABEL="GPU check dry run (tiny config on CPU)"
else
  CONFIG=configs/cclm_base.py BATCH=128
  LABEL="GPU check: cclm_base 224 px, batch 128 per chip, bfloat16"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

if ! "$PYTHON" -c "import ml_collections" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "ml_collections is missing and no .whl/ was carried (see the header of $0)" >&2
    exit 2
  fi
fi

# bf16 compute with float32 parameters; cached cross-attention K/V; scanned text layers (compile time);
# attention through jax.nn.dot_product_attention, which is cuDNN flash attention where the shapes allow it
# and attention dropout is inactive (the reference's 0.1 keeps the explicit path in training).
# The global batch of each kind is 128 x the local devices, on the config's own mesh (FSDP for cclm_base).
NDEV=$("$PYTHON" -c "import jax; print(jax.local_device_count())")
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# shellcheck disable=SC2086
"$PYTHON" -u benchmarks/train_step.py --config "$CONFIG" --batch $((BATCH * NDEV)) --steps "$STEPS" \
  --set model.dtype=bfloat16 --set model.cache_cross_kv=True --set model.scan_layers=True \
  --set model.attention_impl=dot_product \
  --label "$LABEL" --results "$OUT/RESULTS_gpu.md" --json "$OUT/gpu_check.json" $EXTRA

"$PYTHON" - "$OUT/gpu_check.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
print(f"\n{report['machine']}\ncommit {report['commit']}, jax {report['jax']}")
print(f"{'arm':<10} {'kind':<14} {'batch':>5} {'ex/s':>9} {'MFU':>7} {'compile s':>10} {'step ms':>9} {'temp GiB':>9} {'total GiB':>9}")
for r in report["results"]:
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    print(f"{r['arm']:<10} {r['kind']:<14} {r['batch']:>5} {r['examples_per_s']:>9.1f} {mfu:>7} "
          f"{r['lower_s'] + r['compile_s']:>10.1f} {r['step_ms']:>9.1f} {r['memory']['temp_gib']:>9.2f} "
          f"{r['memory']['total_gib']:>9.2f}")
EOF
