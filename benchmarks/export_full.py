"""Peak memory and time of exporting / importing the full-size CCLM (cclm_base, 525.7 M parameters) on CPU.

    python benchmarks/export_full.py [--workdir /tmp/cclm_export_bench] [--results benchmarks/RESULTS.md] [--keep]

Each measurement runs in a fresh subprocess (peak RSS = `resource.getrusage(RUSAGE_SELF).ru_maxrss` is
per process): the child builds float32 parameters of the abstract shapes (numpy random, moved to jax CPU
arrays one leaf at a time, so the baseline is one copy of the parameters), then runs one step:
- `th`: `official.save` -> `.th` (official layout, tied decoder stored once);
- `safetensors`: `export.export_safetensors` -> `model.safetensors` + `config.json` (tied pair stored twice);
- `load_th` / `load_safetensors`: `official.load` of those files (no parameters built first);
- `make_init_files` (not reported): random full-size XLM-R-large and Swin-B stand-ins; `init_pretrained`:
  `pretrained.init_from_pretrained` from them.
Writes (or replaces) the `## Export` section of the results file, leaving other sections alone.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time

GIB = 1024 ** 3
STEPS = ("th", "safetensors", "load_th", "load_safetensors", "make_init_files", "init_pretrained")
XLMR_LARGE_CONFIG = {"architectures": ["XLMRobertaForMaskedLM"], "model_type": "xlm-roberta", "hidden_act": "gelu",
                     "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096,
                     "num_hidden_layers": 24, "vocab_size": 250002, "max_position_embeddings": 514,
                     "type_vocab_size": 1, "layer_norm_eps": 1e-05, "pad_token_id": 1}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _anon_bytes() -> int:
    """Anonymous resident memory (RssAnon): the process's own allocations, without file-backed pages."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon line")


class AnonPeak:
    """Samples RssAnon every 5 ms in a thread while active; `.peak` is the largest value seen (bytes)."""

    def __enter__(self):
        self.peak, self._stop = _anon_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _anon_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_bytes())


def _random_params(model_config):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cclm_jax.interop.shapes import param_shapes

    rng = np.random.default_rng(0)
    return jax.tree.map(lambda shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32)),
                        param_shapes(model_config), is_leaf=lambda x: isinstance(x, tuple))


def make_init_files(workdir: pathlib.Path) -> pathlib.Path:
    """Random full-size stand-ins for XLM-R-large (24 layers, HF names, tied decoder) and Swin-B (22k head)."""
    import numpy as np
    import torch

    from cclm_jax.interop.shapes import official_shapes
    from cclm_jax.interop.layout import official_layout
    from cclm_jax.models import base_model_config

    rng = np.random.default_rng(1)

    def rand(*shape):
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))

    xlmr_dir = workdir / "xlm-roberta-large"
    xlmr_dir.mkdir(parents=True, exist_ok=True)
    (xlmr_dir / "config.json").write_text(json.dumps(XLMR_LARGE_CONFIG))
    words = rand(250002, 1024)
    xlmr = {"roberta.embeddings.word_embeddings.weight": words,
            "roberta.embeddings.position_embeddings.weight": rand(514, 1024),
            "roberta.embeddings.token_type_embeddings.weight": rand(1, 1024),
            "roberta.embeddings.LayerNorm.weight": rand(1024), "roberta.embeddings.LayerNorm.bias": rand(1024)}
    for i in range(24):
        pre = f"roberta.encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            xlmr[pre + name + ".weight"], xlmr[pre + name + ".bias"] = rand(1024, 1024), rand(1024)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            xlmr[pre + name + ".weight"], xlmr[pre + name + ".bias"] = rand(1024), rand(1024)
        xlmr[pre + "intermediate.dense.weight"], xlmr[pre + "intermediate.dense.bias"] = rand(4096, 1024), rand(4096)
        xlmr[pre + "output.dense.weight"], xlmr[pre + "output.dense.bias"] = rand(1024, 4096), rand(1024)
    xlmr.update({"roberta.pooler.dense.weight": rand(1024, 1024), "roberta.pooler.dense.bias": rand(1024),
                 "lm_head.bias": rand(250002), "lm_head.dense.weight": rand(1024, 1024),
                 "lm_head.dense.bias": rand(1024), "lm_head.layer_norm.weight": rand(1024),
                 "lm_head.layer_norm.bias": rand(1024), "lm_head.decoder.weight": words})
    torch.save(xlmr, xlmr_dir / "pytorch_model.bin")
    del xlmr, words
    cfg = base_model_config()
    buffers = {e.key: e.make() for e in official_layout(cfg) if e.kind == "buffer"}
    swin = {}
    for key, shape, _ in official_shapes(cfg):
        if key.startswith("vision_encoder."):
            value = torch.from_numpy(buffers[key]) if key in buffers else rand(*shape)
            swin[key[len("vision_encoder."):]] = value
    swin.update({"head.weight": rand(21841, 1024), "head.bias": rand(21841)})
    torch.save({"model": swin}, workdir / "swin_base_patch4_window7_224_22k.pth")
    return xlmr_dir / "pytorch_model.bin"


def run_step(step: str, workdir: pathlib.Path) -> dict:
    """One measurement in this process; returns sizes (bytes), RSS (bytes) and seconds."""
    import jax

    from cclm_jax.interop import official  # noqa: F401  (imports torch before the measurement)
    from cclm_jax.models import base_model_config

    cfg = base_model_config()
    params = None
    result = {"step": step}
    if step in ("th", "safetensors"):
        start = time.perf_counter()
        params = _random_params(cfg)
        jax.block_until_ready(params)
        result["build_s"] = time.perf_counter() - start
        result["param_bytes"] = sum(x.nbytes for x in jax.tree.leaves(params))
    result["rss_before"] = _rss_bytes()
    result["anon_before"] = _anon_bytes()
    result["peak_before"] = _peak_bytes()
    with AnonPeak() as anon:
        path = _run(step, workdir, cfg, params, result)
    result["anon_peak"] = anon.peak
    result["peak"] = _peak_bytes()
    result["file_bytes"] = path.stat().st_size
    return result


def _run(step: str, workdir: pathlib.Path, cfg, params, result: dict) -> pathlib.Path:
    import jax

    from cclm_jax.interop import export, official

    start = time.perf_counter()
    if step == "th":
        path = workdir / "cclm_base.th"
        official.save(path, cfg, params)
    elif step == "safetensors":
        path = export.export_safetensors(workdir / "safetensors", cfg, params)
    elif step == "make_init_files":
        path = make_init_files(workdir)
    elif step == "init_pretrained":
        from cclm_jax.interop.pretrained import init_from_pretrained

        path = workdir / "xlm-roberta-large" / "pytorch_model.bin"
        params, _ = init_from_pretrained(cfg, path.parent, workdir / "swin_base_patch4_window7_224_22k.pth",
                                         jax.random.PRNGKey(0))
        jax.block_until_ready(params)
        result["param_bytes"] = sum(x.nbytes for x in jax.tree.leaves(params))
    else:
        path = workdir / ("cclm_base.th" if step == "load_th" else "safetensors/model.safetensors")
        _, params = official.load(path, text_num_heads=16)
        jax.block_until_ready(params)
        result["param_bytes"] = sum(x.nbytes for x in jax.tree.leaves(params))
    result["seconds"] = time.perf_counter() - start
    return path


def _section(results: list[dict]) -> str:
    rows = []
    for r in results:
        if r["step"] == "make_init_files":
            continue
        rows.append(f"| {r['step']} | {r['param_bytes'] / GIB:.2f} | {r['rss_before'] / GIB:.2f} | "
                    f"{r['peak'] / GIB:.2f} | {r['anon_before'] / GIB:.2f} | {r['anon_peak'] / GIB:.2f} | "
                    f"{r['seconds']:.1f} | {r['file_bytes'] / GIB:.2f} |")
    cpu = platform.processor() or platform.machine()
    return "\n".join([
        "## Export",
        "",
        f"Full-size cclm_base (525,677,393 float32 parameters, random values), CPU only, {os.cpu_count()} cores "
        f"({cpu}), {time.strftime('%Y-%m-%d')}; `python benchmarks/export_full.py`. One fresh process per row; "
        "RSS from /proc/self/statm before the step; peak RSS from getrusage (whole process lifetime: it "
        "includes building the parameters, and the pages of memory-mapped checkpoint files, which the kernel "
        "can drop); anon = RssAnon (the process's own allocations), sampled every 5 ms during the step. GiB. "
        "The machine is shared with other jobs: seconds vary by 2-3x between runs; memory does not.",
        "",
        "| step | params | RSS before | peak RSS | anon before | anon peak | seconds | file |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "`th`: official.save (torch.save of the official state_dict; tied decoder stored once). "
        "`safetensors`: export_safetensors streamed tensor by tensor (tied pair stored twice, +0.95 GiB on "
        "disk). `load_*`: official.load of those files (memory-mapped, converted tensor by tensor). "
        "`init_pretrained`: init_from_pretrained from random full-size stand-ins of XLM-R-large "
        "(`pytorch_model.bin`, 24 layers, 2.09 GiB) and Swin-B 22k (`.pth`); the file column is the XLM-R file "
        "and the time includes jit-compiling the init of the new parameters.",
        "",
    ])


def write_section(results_path: pathlib.Path, section: str) -> None:
    """Replace the `## Export` section of `results_path` (or append it), keeping every other section."""
    text = results_path.read_text() if results_path.exists() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == "## Export"), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        text = "".join(lines[:start]) + section + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    results_path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/cclm_export_bench")
    parser.add_argument("--results", default=str(pathlib.Path(__file__).with_name("RESULTS.md")))
    parser.add_argument("--keep", action="store_true", help="keep the ~9 GB of files written to --workdir")
    parser.add_argument("--step", choices=STEPS, help="internal: run one measurement and print JSON")
    args = parser.parse_args()
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.step:
        print(json.dumps(run_step(args.step, workdir)))
        return
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    results = []
    for step in STEPS:
        out = subprocess.run([sys.executable, __file__, "--step", step, "--workdir", str(workdir)],
                             check=True, capture_output=True, text=True, env=env).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    write_section(pathlib.Path(args.results), _section(results))
    print(f"wrote the Export section of {args.results}")
    if not args.keep:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
