"""Ahead-of-time compile of the train steps for a TPU slice or GPU node from this CPU: a thin wrapper of
`cclm_jax.aot` (the future `cclm-jax compile`), with the same options:

    JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 python benchmarks/compile_aot.py --config configs/tiny.py \
        --topology v5e:2x2 [--mesh.fsdp -1 ...] [--set key=value ...] [--kinds image_caption,parallel_text] \
        [--batch-per-chip N] [--search-batch] [--json out.json] [--dump-hlo DIR]

See `cclm_jax/aot.py` for what it reports and how to install libtpu (a separate venv).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cclm_jax import aot  # noqa: E402

if __name__ == "__main__":
    aot.main()
