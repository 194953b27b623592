"""``config.data``: defaults, documentation of every key, and validation.

Top level
    seed (int)              seeds shuffling, crops, RandAugment, caption choice, swaps, masking.
    data_dir (str)          cache root: TFDS builds go to ``data_dir/tfds``, the demo to
                            ``data_dir/demo`` (default ``~/.cache/cclm_jax``).
    tokenizer (str)         SentencePiece model path (XLM-R: ``.../sentencepiece.bpe.model``) or
                            ``"demo"`` (the model trained with the demo data).
    shuffle_buffer (int)    examples in each training shuffle buffer (encoded images or texts).
    prefetch (int)          batches prefetched by each training pipeline.
    threads (int)           tf.data private thread pool size; 0 = TensorFlow's default.
    mix (dict kind -> int)  fixed batch ratio, e.g. {"image_caption": 1, "parallel_text": 1} (3M) or
                            {"image_caption": 1, "parallel_text": 2, "region": 1} (4M);
                            kinds with ratio 0 get no pipeline.
    host_shards (int)       input shards every source is split into (equal sizes); 0 (default) =
                            one per process. Each process reads ``host_shards / process_count``
                            consecutive shards (process p: shards p*k .. p*k+k-1) and concatenates
                            their batches in shard order, so ``batch_size`` is per shard and the
                            global batch is ``batch_size * host_shards``, laid out exactly as the
                            global array of a ``host_shards``-process run. One process with
                            host_shards=N therefore trains on the batches of an N-process run.
                            Checkpoints keep the data position of every shard: a run may resume
                            with another process count if host_shards stays the same.
    demo                    DemoSpec fields: image_size (stored px), num_train, num_val,
                            num_parallel, vocab_size, seed.

image_caption (training) and eval (retrieval dev set) share the reader keys
    kind                    "jsonl" (CCLM json-lines), "img2dataset" (img2dataset shards), "tfds" (a
                            dataset written by `cclm-jax data prepare`, or a prepared catalog dataset) or
                            "demo" (train split for image_caption, val split for eval).
    paths (tuple[str])      json-lines files (kind jsonl) or shard files (kind img2dataset: local or
                            gs://, glob patterns allowed: "/data/cc3m/*.tar"); on the command line
                            --config.data.X.paths="('a', 'b')".
    format (str)            img2dataset layout: "webdataset" (.tar), "parquet", "tfrecord"; "" = from
                            the file names (cclm_jax/data/img2dataset.py).
    caption_language (str)  language of the img2dataset captions ("en" for CC3M).
    translations (tuple[str]) "lang=path" of caption TSVs in the CC3M layout (caption<TAB>url), e.g. the
                            UC2 translations; joined to the samples by ``join_field``.
    join_field (str)        "url" (the sample's url, default) or "key" (the sample key).
    image_field (str)       json field with base64 bytes or, with image_root, a path.
    image_root (str)        "" = base64 images; else the directory that image paths are relative to.
    caption_fields (dict)   field -> language; "" = the field holds {lang: text | [texts]} (or a
                            list of such dicts). {} (default) = {"caption": ""}, the CCLM layout
                            (an empty default, so that ``update`` does not merge a stale key).
    tfds_name, tfds_split, tfds_data_dir, image_feature, caption_feature, tfds_language
                            dataset of kind tfds: "cclm_image_caption/<name>" (written by `cclm-jax data
                            prepare`; languages from the data, the feature keys unused; tfds_data_dir ""
                            = data_dir/tfds) or a catalog dataset, e.g. "coco_captions", "train",
                            "image", "captions/text", "en".
    languages (tuple[str])  keep only captions in these languages; () = all.
    image_res (int)         output pixels (square).
    max_tokens, max_words   caption length limits (ids incl. <s> </s>; words for pre_caption).
image_caption only
    batch_size (int)        per-shard batch (= per-process batch with the default host_shards;
                            remainder dropped).
    crop_scale (lo, hi)     RandomResizedCrop area range: (0.2, 1.0) pre-training, (0.5, 1.0) fine-tuning.
    randaugment (bool)      RandomAugment(2, 7) after crop and flip.
    max_masks, mask_prob    masking: 12 and 0.4 in the reference.
    sample_2_captions (bool) also emit a second caption in another language (``*_2`` keys).
eval only
    batch_size (int)        images per evaluation batch (last batch padded, ``valid`` marks rows).

parallel_text
    kind                    "jsonl" (source_text/target_text lines), "aligned_text" (paths =
                            [[file_1, file_2], ...] line-aligned, .gz ok: OPUS Moses files),
                            "wikimatrix" (WikiMatrix.<l1>-<l2>.tsv[.gz] files), "tfds"
                            (tfds_name "cclm_parallel_text/<name>" in tfds_data_dir, tfds_split) or "demo".
    min_score (float)       WikiMatrix: keep pairs with a LASER margin score >= this (1.04).
    paths, batch_size, max_tokens (64), max_words (64), max_masks (20), mask_prob (0.4).

region (region grounding, the 4M setting; records and sampling: ``cclm_jax/data/region.py``)
    kind                    "jsonl" (region json-lines in ``paths``) or "demo" (the demo's
                            ``region_train.jsonl``: 2-3 shapes per picture, ``cclm_jax/data/demo.py``).
    paths, image_field, image_root, languages
                            as for image_caption.
    image_res, patch_size   output pixels and the image tower's total stride (32 for Swin): the patch
                            masks live on the (image_res / patch_size)^2 grid of its output tokens.
    batch_size (int)        rows (captions) per shard batch (128 in the reference).
    max_images (int)        images per shard batch (48); every image gives 1..max_regions rows.
    max_regions (int)       rows per image, whole-image caption included (5).
    min_perc_in_image       a box is kept when more than this part of its area survives the crop (0.5).
    careful_hflip (bool)    no flip for images whose captions mention left or right.
    randaugment (bool)      RandomAugment(2, 7) over the photometric ops (randaugment.REGION_AUGMENTS).
    max_tokens, max_words, max_masks, mask_prob
                            as for image_caption (40, 40, 12, 0.4).
"""
import glob
import os

import ml_collections

from cclm_jax.data.mixture import Mixture

KINDS = ("image_caption", "parallel_text", "region")
_IMAGE_KINDS = ("jsonl", "img2dataset", "tfds", "demo")
_PARALLEL_KINDS = ("jsonl", "aligned_text", "wikimatrix", "tfds", "demo")
_IMG2DATASET_FORMATS = ("", "webdataset", "parquet", "tfrecord")


def _reader_defaults(kind: str, image_res: int, max_tokens: int) -> dict:
    return dict(
        kind=kind, paths=(), image_field="binary", image_root="", caption_fields={},
        tfds_name="", tfds_split="train", tfds_data_dir="", image_feature="image",
        caption_feature="captions/text", tfds_language="en", languages=(),
        format="", caption_language="en", translations=(), join_field="url",
        image_res=image_res, max_tokens=max_tokens, max_words=max_tokens)


def default_data_config() -> ml_collections.ConfigDict:
    """All ``config.data`` keys with their defaults (the demo data, reference text settings)."""
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0
    cfg.data_dir = "~/.cache/cclm_jax"
    cfg.tokenizer = "demo"
    cfg.shuffle_buffer = 10_000
    cfg.prefetch = 2
    cfg.threads = 0
    cfg.mix = {"image_caption": 1, "parallel_text": 1, "region": 0}
    cfg.host_shards = 0
    cfg.demo = dict(image_size=64, num_train=3000, num_val=150, num_parallel=20000,
                    vocab_size=1000, seed=0)
    cfg.image_caption = dict(
        _reader_defaults("demo", 224, 40), batch_size=128, crop_scale=(0.2, 1.0),
        randaugment=True, max_masks=12, mask_prob=0.4, sample_2_captions=False)
    cfg.eval = dict(_reader_defaults("demo", 224, 40), batch_size=64)
    cfg.parallel_text = dict(kind="demo", paths=(), batch_size=128, max_tokens=64, max_words=64,
                             max_masks=20, mask_prob=0.4, min_score=1.04, tfds_name="", tfds_split="train",
                             tfds_data_dir="")
    cfg.region = dict(kind="jsonl", paths=(), image_field="binary", image_root="", languages=(), image_res=224,
                      patch_size=32, batch_size=128, max_images=48, max_regions=5, min_perc_in_image=0.5,
                      careful_hflip=True, randaugment=True, max_tokens=40, max_words=40, max_masks=12,
                      mask_prob=0.4)
    return cfg


def _fail(key: str, message: str):
    raise ValueError(f"config.data.{key}: {message}")


def _positive_int(cfg, section: str, key: str):
    value = cfg[section][key] if section else cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(f"{section}.{key}" if section else key, f"must be a positive integer, got {value!r}")


def _check_file(key: str, path, pattern_ok: bool = False):
    """A file must exist; with ``pattern_ok`` a glob pattern must match one (a ``gs://`` path is checked when read)."""
    if isinstance(path, str) and "://" in path:
        return
    if pattern_ok and isinstance(path, str) and any(c in path for c in "*?["):
        if not glob.glob(os.path.expanduser(path)):
            raise FileNotFoundError(f"config.data.{key}: no file matches {path!r}")
        return
    if not isinstance(path, str) or not os.path.isfile(os.path.expanduser(path)):
        raise FileNotFoundError(f"config.data.{key}: file {path!r} does not exist")


def _check_text_limits(cfg, section: str, masks: bool):
    for key in ("max_tokens", "max_words") + (("max_masks",) if masks else ()):
        _positive_int(cfg, section, key)
    if cfg[section].max_tokens < 2:
        _fail(f"{section}.max_tokens", "must be >= 2 to hold <s> and </s>")
    if masks and not 0.0 < cfg[section].mask_prob < 1.0:
        _fail(f"{section}.mask_prob", f"must be in (0, 1), got {cfg[section].mask_prob!r}")


def _check_reader(cfg, section: str):
    reader = cfg[section]
    if reader.kind not in _IMAGE_KINDS:
        _fail(f"{section}.kind", f"must be one of {_IMAGE_KINDS}, got {reader.kind!r}")
    if reader.kind == "jsonl":
        if not reader.paths:
            _fail(f"{section}.paths", "kind 'jsonl' needs at least one json-lines file")
        for i, path in enumerate(reader.paths):
            _check_file(f"{section}.paths[{i}]", path)
        if reader.image_root and not os.path.isdir(os.path.expanduser(reader.image_root)):
            raise FileNotFoundError(
                f"config.data.{section}.image_root: directory {reader.image_root!r} does not exist")
        for field, language in reader.caption_fields.items():
            if not isinstance(language, str):
                _fail(f"{section}.caption_fields.{field}", f"must be a language code or '', got {language!r}")
    if reader.kind == "img2dataset":
        _check_img2dataset(reader, section)
    if reader.kind == "tfds" and not reader.tfds_name:
        _fail(f"{section}.tfds_name", "kind 'tfds' needs a catalog dataset name")
    _positive_int(cfg, section, "image_res")
    _positive_int(cfg, section, "batch_size")
    _check_text_limits(cfg, section, masks=section == "image_caption")


def _check_region(cfg):
    section = cfg.region
    if section.kind not in ("jsonl", "demo"):
        _fail("region.kind", f"must be 'jsonl' or 'demo', got {section.kind!r}")
    if section.kind == "jsonl" and not section.paths:
        _fail("region.paths", "needs at least one region json-lines file (or kind 'demo')")
    for i, path in enumerate(section.paths):
        _check_file(f"region.paths[{i}]", path)
    if section.image_root and not os.path.isdir(os.path.expanduser(section.image_root)):
        raise FileNotFoundError(f"config.data.region.image_root: directory {section.image_root!r} does not exist")
    for key in ("image_res", "patch_size", "batch_size", "max_images", "max_regions"):
        _positive_int(cfg, "region", key)
    if section.image_res % section.patch_size:
        _fail("region.patch_size", f"must divide image_res {section.image_res}, got {section.patch_size}")
    if not 0.0 <= section.min_perc_in_image < 1.0:
        _fail("region.min_perc_in_image", f"must be in [0, 1), got {section.min_perc_in_image!r}")
    _check_text_limits(cfg, "region", masks=True)


def translation_files(section) -> dict[str, str]:
    """{language: path} of a reader section's ``translations`` ("lang=path" strings)."""
    pairs = {}
    for i, item in enumerate(section.translations):
        lang, sep, path = item.partition("=") if isinstance(item, str) else ("", "", "")
        if not sep or not lang or not path:
            raise ValueError(f"translations[{i}] must be 'lang=path', got {item!r}")
        pairs[lang] = os.path.expanduser(path) if "://" not in path else path
    return pairs


def _check_img2dataset(reader, section: str):
    if not reader.paths:
        _fail(f"{section}.paths", "kind 'img2dataset' needs at least one shard file")
    if reader.format not in _IMG2DATASET_FORMATS:
        _fail(f"{section}.format", f"must be one of {_IMG2DATASET_FORMATS}, got {reader.format!r}")
    for i, path in enumerate(reader.paths):
        _check_file(f"{section}.paths[{i}]", path, pattern_ok=True)
        if not reader.format and not str(path).lower().endswith((".tar", ".parquet", ".tfrecord")):
            _fail(f"{section}.paths[{i}]", f"{path!r}: cannot tell the layout from the name (.tar, .parquet, "
                  ".tfrecord); set format")
    try:
        translations = translation_files(reader)
    except ValueError as e:
        _fail(section, str(e))
    for lang, path in translations.items():
        _check_file(f"{section}.translations[{lang}]", path)
    if not isinstance(reader.join_field, str) or not reader.join_field:
        _fail(f"{section}.join_field", "must name the sample field the translations join on ('url' or 'key')")


def resolve_host_shards(cfg: ml_collections.ConfigDict, process_count: int) -> int:
    """The number of input shards of ``cfg.host_shards`` for ``process_count`` processes (0 -> one per
    process); raises ValueError unless it is a positive multiple of ``process_count``."""
    shards = cfg.host_shards or process_count
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 0 or shards % process_count:
        _fail("host_shards", f"must be 0 or a positive multiple of the {process_count} processes, "
                             f"got {cfg.host_shards!r}")
    return shards


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
    """Raise ValueError / FileNotFoundError naming the key for any missing file or bad value."""
    defaults = default_data_config()
    for key in defaults:
        if key not in cfg:
            _fail(key, "missing (see cclm_jax.data.config.default_data_config)")
    try:
        mixture = Mixture(dict(cfg.mix))
        mixture.iterations_per_cycle()
    except ValueError as e:
        _fail("mix", str(e))
    for kind in mixture.kinds:
        if kind not in KINDS:
            _fail("mix", f"unknown batch kind {kind!r}; expected {KINDS}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        _fail("seed", f"must be an integer >= 0, got {cfg.seed!r}")
    if cfg.tokenizer != "demo":
        _check_file("tokenizer", cfg.tokenizer)
    if isinstance(cfg.host_shards, bool) or not isinstance(cfg.host_shards, int) or cfg.host_shards < 0:
        _fail("host_shards", f"must be an integer >= 0, got {cfg.host_shards!r}")
    _positive_int(cfg, "", "shuffle_buffer")
    _positive_int(cfg, "", "prefetch")
    if isinstance(cfg.threads, bool) or not isinstance(cfg.threads, int) or cfg.threads < 0:
        _fail("threads", f"must be an integer >= 0, got {cfg.threads!r}")
    for key in ("image_size", "num_train", "num_val", "num_parallel", "vocab_size"):
        _positive_int(cfg, "demo", key)
    if "image_caption" in mixture.kinds:
        _check_reader(cfg, "image_caption")
        low, high = cfg.image_caption.crop_scale
        if not 0.0 < low <= high <= 1.0:
            _fail("image_caption.crop_scale", f"needs 0 < low <= high <= 1, got {(low, high)}")
    _check_reader(cfg, "eval")
    if "parallel_text" in mixture.kinds:
        section = cfg.parallel_text
        if section.kind not in _PARALLEL_KINDS:
            _fail("parallel_text.kind", f"must be one of {_PARALLEL_KINDS}, got {section.kind!r}")
        if section.kind == "tfds" and not section.tfds_name:
            _fail("parallel_text.tfds_name", "kind 'tfds' needs a dataset name (cclm_parallel_text/<name>)")
        if section.kind not in ("demo", "tfds") and not section.paths:
            _fail("parallel_text.paths", f"kind {section.kind!r} needs input files")
        for i, entry in enumerate(section.paths if section.kind not in ("demo", "tfds") else []):
            if section.kind in ("jsonl", "wikimatrix"):
                _check_file(f"parallel_text.paths[{i}]", entry, pattern_ok=section.kind == "wikimatrix")
                continue
            if isinstance(entry, str) or len(entry) != 2:
                _fail(f"parallel_text.paths[{i}]", f"must be [file_1, file_2], got {entry!r}")
            for j, path in enumerate(entry):
                _check_file(f"parallel_text.paths[{i}][{j}]", path)
        _positive_int(cfg, "parallel_text", "batch_size")
        _check_text_limits(cfg, "parallel_text", masks=True)
    if "region" in mixture.kinds:
        _check_region(cfg)
