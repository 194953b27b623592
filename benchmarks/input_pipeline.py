"""Input pipeline throughput per source, with the full pre-training transform.

    python benchmarks/input_pipeline.py [--batches 20] [--repeats 5] [--write]
    python benchmarks/input_pipeline.py --prepared [--write]   json-lines vs prepared shards, and preparation

image_caption: decode JPEG crop window, RandomResizedCrop(224, 0.2-1) bicubic, flip,
RandomAugment(2, 7), caption choice, pre_caption, XLM-R tokenisation, masking (batch 64).
parallel_text: swap, pre_caption, tokenisation and masking of both sentences (batch 128).
Data: the Flickr8k JPEGs (224x224) and Multi30K from ../shared/data with the XLM-R
SentencePiece model when present, else the generated demo (64 px images, demo tokenizer).

Reported per source, best and median of the repeats: examples/s of the pipeline on all cores
(wall clock), and examples per CPU-second of the process (all threads, main thread included):
the rate of one busy core, which is what "per core" means here; it is much less sensitive than
wall clock to other jobs on a shared machine. Also the wall-clock rate with a one-thread tf.data pool. Build time (TFDS
preparation, cached under --data-dir) is not counted. ``--write`` replaces the
"## Input pipeline" section of benchmarks/RESULTS.md.

``--prepared`` compares, for the image–caption kind with the same transform, the json-lines source
(built into TFDS on first use, one file) with the dataset ``cclm-jax data prepare`` writes
(``kind=tfds``, 4 tfrecord shards), alternating the two in the same process (rounds interleaved,
so load from other jobs hits both alike), and times the preparation itself: in-process and as a
Beam DirectRunner pipeline (when apache-beam is installed), examples per second of wall clock
and per CPU-second of this process (Beam's DirectRunner works in this process's threads).
``--write`` replaces the "## Input pipeline: prepared shards" section.
"""
import argparse
import datetime
import os
import pathlib
import platform
import shutil
import subprocess
import time

from cclm_jax.data import builders, pipeline, prepare
from cclm_jax.data.config import default_data_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Input pipeline"
PREPARED_SECTION = "## Input pipeline: prepared shards"


def config(data_dir: str, threads: int):
    cfg = default_data_config()
    cfg.data_dir = data_dir
    cfg.threads = threads
    cfg.shuffle_buffer = 2048
    cfg.image_caption.update(batch_size=64, image_res=224, randaugment=True, crop_scale=(0.2, 1.0))
    cfg.parallel_text.update(batch_size=128)
    if SHARED.exists():
        flickr = SHARED / "flickr8k"
        multi30k = SHARED / "multi30k"
        cfg.tokenizer = str(SHARED / "xlmr_spm" / "sentencepiece.bpe.model")
        cfg.image_caption.update(kind="jsonl", paths=[str(flickr / "train.jsonl")], image_field="image",
                                 image_root=str(flickr),
                                 caption_fields={"multi30k_task1": "", "flickr8kcn_zh": "zh"})
        cfg.parallel_text.update(kind="aligned_text", paths=[
            [str(multi30k / "train.en.gz"), str(multi30k / "train.de.gz")],
            [str(multi30k / "train.fr.gz"), str(multi30k / "train.cs.gz")]])
    return cfg


def measure(iterator, batch_size: int, batches: int, repeats: int, warmup: int = 3) -> dict:
    """Best and median of ``repeats`` timings of ``batches`` batches each."""
    for _ in range(warmup):
        next(iterator)
    runs = []
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(batches):
            next(iterator)
        runs.append((time.process_time() - cpu, time.perf_counter() - wall))
    n = batches * batch_size
    cpu = sorted(c for c, _ in runs)
    wall = sorted(w for _, w in runs)
    return {"examples": n, "wall_rate": n / wall[0], "wall_rate_median": n / wall[len(wall) // 2],
            "per_cpu_second": n / cpu[0], "per_cpu_second_median": n / cpu[len(cpu) // 2]}


def run(data_dir: str, batches: int, repeats: int) -> list:
    rows = []
    for threads in (0, 1):
        cfg = config(data_dir, threads)
        tokenizer = pipeline.load_tokenizer(cfg)
        iterators = pipeline.build_train_pipelines(cfg, tokenizer)
        for kind, iterator in iterators.items():
            result = measure(iterator, cfg[kind].batch_size, batches, repeats)
            iterator.close()
            rows.append({"kind": kind, "threads": threads or os.cpu_count(), **result})
            print(f"{kind:14s} threads={rows[-1]['threads']}: {result['wall_rate']:6.0f} "
                  f"(median {result['wall_rate_median']:6.0f}) ex/s wall, {result['per_cpu_second']:6.0f} "
                  f"(median {result['per_cpu_second_median']:6.0f}) ex per CPU-second", flush=True)
    return rows


def markdown(rows: list, batches: int, repeats: int) -> str:
    source = ("Flickr8k JPEGs (224x224, ../shared/data) + Multi30K en-de/fr-cs, XLM-R tokenizer"
              if SHARED.exists() else "generated demo data (64 px), demo tokenizer")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        SECTION, "",
        f"`python benchmarks/input_pipeline.py` on {platform.machine()}, {os.cpu_count()} cores, "
        f"{datetime.date.today()} (load average {load} from other jobs); best and median of "
        f"{repeats} runs of {batches} batches after 3 warm-up batches; data: {source}. "
        "Full pre-training transform (image: JPEG crop-window decode, RandomResizedCrop 224 "
        "scale 0.2-1 bicubic, flip, RandomAugment(2, 7) with OpenCV, caption choice; text: "
        "pre_caption, XLM-R tokenisation, span masking; parallel text: swap, both sentences "
        "tokenised and masked). \"Per CPU-second\" = examples / CPU time of the whole process "
        "(all threads), i.e. the rate of one busy core; wall-clock numbers move 2-3x with other "
        "jobs on this shared machine, CPU time much less.", "",
        "| source | tf.data threads | examples/s wall (best / median) | examples per CPU-second (best / median) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['threads']} | {r['wall_rate']:.0f} / {r['wall_rate_median']:.0f} | "
                     f"{r['per_cpu_second']:.0f} / {r['per_cpu_second_median']:.0f} |")
    return "\n".join(lines) + "\n"


def _timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.process_time() - cpu, time.perf_counter() - wall


def run_prepared(data_dir: str, batches: int, repeats: int) -> dict:
    """Image–caption throughput from json-lines vs prepared shards (interleaved rounds), and preparation rates."""
    cfg = config(data_dir, 0)
    cfg.mix = {"image_caption": 1}
    recipe = prepare.section_recipe(cfg, "image_caption")
    builds = {}
    modes = [("in-process", None)]
    try:
        import apache_beam  # noqa: F401

        modes.append(("Beam DirectRunner", ["--runner=DirectRunner", "--direct_num_workers=1"]))
    except ImportError:
        print("apache-beam is not installed: the Beam preparation is not timed")
    for label, beam in modes:
        out = os.path.join(data_dir, "prepared_" + label.split()[0].lower())
        shutil.rmtree(out, ignore_errors=True)
        builder, cpu, wall = _timed(lambda: builders.prepare(recipe, out, name="bench", beam_options=beam,  # noqa: B023
                                                             num_shards=4))
        n = builder.info.splits["train"].num_examples
        builds[label] = {"examples": n, "wall_rate": n / wall, "per_cpu_second": n / cpu}
        print(f"prepare {label}: {n} examples, {n / wall:.0f} ex/s wall, {n / cpu:.0f} ex per CPU-second", flush=True)
    prepared = cfg.copy_and_resolve_references()
    prepared.image_caption.update(kind="tfds", tfds_name="cclm_image_caption/bench", tfds_data_dir=out)
    tokenizer = pipeline.load_tokenizer(cfg)
    iterators = {"json-lines": pipeline.build_train_pipelines(cfg, tokenizer)["image_caption"],
                 "prepared shards": pipeline.build_train_pipelines(prepared, tokenizer)["image_caption"]}
    runs = {name: [] for name in iterators}
    for _ in range(repeats):  # interleaved: one timed run of each source per round
        for name, iterator in iterators.items():
            runs[name].append(measure(iterator, cfg.image_caption.batch_size, batches, 1, warmup=1))
    for iterator in iterators.values():
        iterator.close()
    reads = {}
    for name, results in runs.items():
        cpu = sorted(r["per_cpu_second"] for r in results)
        wall = sorted(r["wall_rate"] for r in results)
        reads[name] = {"per_cpu_second": cpu[-1], "per_cpu_second_median": cpu[len(cpu) // 2],
                       "wall_rate": wall[-1], "wall_rate_median": wall[len(wall) // 2]}
        print(f"read {name}: {reads[name]}", flush=True)
    return {"builds": builds, "reads": reads}


def markdown_prepared(result: dict, batches: int, repeats: int) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    source = ("Flickr8k train JPEGs (../shared/data), XLM-R tokenizer" if SHARED.exists()
              else "generated demo data (64 px), demo tokenizer")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    reads = result["reads"]
    base = reads["json-lines"]["per_cpu_second_median"]
    lines = [
        PREPARED_SECTION, "",
        f"`python benchmarks/input_pipeline.py --prepared` at commit {commit.strip() or '?'} on {platform.machine()}, "
        f"{os.cpu_count()} cores, {datetime.date.today()} (load average {load} from other jobs); data: {source}; "
        f"image–caption kind with the full pre-training transform (as above), {repeats} interleaved rounds of "
        f"{batches} batches of {64} per source. Reading: best / median; the ratio compares medians per CPU-second.",
        "", "| reading from | examples/s wall | examples per CPU-second | ratio |", "|---|---|---|---|"]
    for name, r in reads.items():
        lines.append(f"| {name} | {r['wall_rate']:.0f} / {r['wall_rate_median']:.0f} | {r['per_cpu_second']:.0f} / "
                     f"{r['per_cpu_second_median']:.0f} | {r['per_cpu_second_median'] / base:.2f} |")
    lines += ["", "| preparing (`data prepare`, 4 shards) | examples | examples/s wall | examples per CPU-second |",
              "|---|---|---|---|"]
    for label, b in result["builds"].items():
        lines.append(f"| {label} | {b['examples']} | {b['wall_rate']:.0f} | {b['per_cpu_second']:.0f} |")
    return "\n".join(lines) + "\n"


def write_section(text: str, section: str = SECTION):
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if section + "\n" in current:
        start = current.index(section + "\n")
        following = current.find("\n## ", start + len(section))
        current = current[:start] + text + ("\n" + current[following + 1:] if following >= 0 else "")
    else:
        current = current.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(current)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-dir", default="~/.cache/cclm_jax/bench")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--prepared", action="store_true", help="json-lines vs prepared shards, and preparation")
    args = parser.parse_args()
    if args.prepared:
        text = markdown_prepared(run_prepared(os.path.expanduser(args.data_dir), args.batches, args.repeats),
                                 args.batches, args.repeats)
        print(text)
        if args.write:
            write_section(text, PREPARED_SECTION)
        return
    rows = run(os.path.expanduser(args.data_dir), args.batches, args.repeats)
    text = markdown(rows, args.batches, args.repeats)
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
