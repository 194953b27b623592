"""Training pipelines (batch contract, exact resume, hosts, languages) and the retrieval dev set,
on a tiny generated demo; Flickr8k with the XLM-R tokenizer when ../shared/data is present."""
import io
import itertools
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from cclm_jax.data import demo, pipeline
from cclm_jax.data import image as image_lib
from cclm_jax.data.config import default_data_config, validate_data_config
from cclm_jax.data.mixture import Mixture
from cclm_jax.data.text import pre_caption

IMAGE_KEYS = {"image", "text_ids", "text_atts", "text_ids_masked", "masked_pos", "masked_ids"}
TEXT_KEYS = {"text_ids", "text_atts", "text_ids_masked", "masked_pos", "masked_ids"}
# Every demo caption, cleaned as the pipeline cleans it, -> its language.
CAPTION_LANGUAGES = {pre_caption(demo.caption(demo.Scene(shape, colour, size), lang), 30): lang
                     for shape, colour, size, lang in itertools.product(demo.SHAPES, demo.COLOURS, demo.SIZES,
                                                                        demo.LANGUAGES)}


def _tiny_config(data_dir):
    cfg = default_data_config()
    cfg.data_dir = str(data_dir)
    cfg.shuffle_buffer = 16
    cfg.demo.image_size = 32
    cfg.demo.num_train = 40
    cfg.demo.num_val = 10
    cfg.demo.num_parallel = 36
    cfg.demo.vocab_size = 400
    cfg.image_caption.image_res = 24
    cfg.image_caption.batch_size = 8
    cfg.parallel_text.batch_size = 8
    cfg.eval.image_res = 24
    cfg.eval.batch_size = 4
    return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = _tiny_config(tmp_path_factory.mktemp("data"))
    return cfg, pipeline.load_tokenizer(cfg)


def _language(tokenizer, ids):
    text = tokenizer.decode(ids)
    assert text in CAPTION_LANGUAGES, text
    return CAPTION_LANGUAGES[text]


def test_batch_contract(setup):
    cfg, tok = setup
    pipes = pipeline.build_train_pipelines(cfg, tok)
    assert set(pipes) == {"image_caption", "parallel_text"}
    image_batch = next(pipes["image_caption"])
    assert set(image_batch) == IMAGE_KEYS
    assert image_batch["image"].shape == (8, 24, 24, 3) and image_batch["image"].dtype == np.uint8
    text_batch = next(pipes["parallel_text"])
    assert set(text_batch) == TEXT_KEYS | {k + "_2" for k in TEXT_KEYS}
    for batch, suffixes, max_tokens, max_masks in ((image_batch, [""], 40, 12), (text_batch, ["", "_2"], 64, 20)):
        for s in suffixes:
            ids, atts = batch["text_ids" + s], batch["text_atts" + s]
            assert ids.shape == atts.shape == batch["text_ids_masked" + s].shape == (8, max_tokens)
            assert batch["masked_pos" + s].shape == batch["masked_ids" + s].shape == (8, max_masks)
            assert all(batch[k + s].dtype == np.int32 for k in TEXT_KEYS)
            lengths = atts.sum(1)
            np.testing.assert_array_equal(ids[:, 0], 0)
            np.testing.assert_array_equal(ids[np.arange(8), lengths - 1], 2)
            np.testing.assert_array_equal(ids[atts == 0], 1)
            real = batch["masked_ids" + s] != -100
            rows = np.nonzero(real)[0]
            np.testing.assert_array_equal(batch["masked_ids" + s][real], ids[rows, batch["masked_pos" + s][real]])
            assert np.all(batch["masked_pos" + s][real] < lengths[rows])
            assert (batch["text_ids_masked" + s] == tok.mask_id).any()
    # both sentences of a pair describe the same scene in two different languages
    langs = [(_language(tok, a), _language(tok, b))
             for a, b in zip(text_batch["text_ids"], text_batch["text_ids_2"])]
    assert all(a != b for a, b in langs)
    assert pipes["image_caption"].metrics() == {}


def _run(pipes, mixture, steps):
    out = []
    for step in steps:
        kind = mixture.kind_at(step)
        out.append((kind, next(pipes[kind])))
    return out


def _save(pipes) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{f"{kind}/{k}": v for kind, it in pipes.items() for k, v in it.get_state().items()})
    return buffer.getvalue()


def _load(pipes, blob: bytes):
    arrays = np.load(io.BytesIO(blob))
    for kind, it in pipes.items():
        it.set_state({k.split("/", 1)[1]: arrays[k] for k in arrays.files if k.startswith(kind + "/")})


def test_resume_after_save_gives_bitwise_identical_batches(setup):
    cfg, tok = setup
    mixture = Mixture({"image_caption": 2, "parallel_text": 1})
    # epochs: image-caption 5 batches, parallel-text 4. Stopping after step 8 leaves the
    # image-caption stream at an epoch boundary and parallel text mid-epoch.
    stop, steps = 8, 13
    reference = _run(pipeline.build_train_pipelines(cfg, tok), mixture, range(steps))
    first = pipeline.build_train_pipelines(cfg, tok)
    _run(first, mixture, range(stop))
    blob = _save(first)
    resumed = pipeline.build_train_pipelines(cfg, tok)
    _load(resumed, blob)
    continued = _run(resumed, mixture, range(stop, steps))
    for (kind_a, a), (kind_b, b) in zip(reference[stop:], continued):
        assert kind_a == kind_b
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{kind_a}/{key}")
    # the pipeline is random: consecutive epochs differ
    images = [batch["image"] for kind, batch in reference if kind == "image_caption"]
    assert not np.array_equal(images[0], images[5])


def test_state_mismatch_is_rejected(setup):
    cfg, tok = setup
    it = pipeline.build_train_pipelines(cfg, tok)["parallel_text"]
    state = it.get_state()
    state["batch_size"] = np.int64(16)
    with pytest.raises(ValueError, match="batch size 16"):
        it.set_state(state)
    with pytest.raises(ValueError, match="lacks"):
        it.set_state({"batches": np.int64(0)})


def test_two_hosts_share_the_schedule_and_split_the_data(setup):
    cfg, tok = setup
    hosts = [pipeline.build_train_pipelines(cfg, tok, process_index=i, process_count=2) for i in range(2)]
    schedules = [[Mixture(dict(cfg.mix)).kind_at(s) for s in range(12)] for _ in hosts]
    assert schedules[0] == schedules[1] == ["image_caption", "parallel_text"] * 6
    firsts = [next(h["image_caption"]) for h in hosts]
    assert firsts[0]["image"].shape == firsts[1]["image"].shape == (8, 24, 24, 3)
    assert not np.array_equal(firsts[0]["image"], firsts[1]["image"])
    # host shards are disjoint halves: 20 examples each, so an epoch is 2 batches
    assert hosts[0]["image_caption"].get_state()["next_example"] == 8
    with pytest.raises(ValueError, match="fewer than the per-host batch size"):
        big = _tiny_config(cfg.data_dir)
        big.image_caption.batch_size = 32
        pipeline.build_train_pipelines(big, tok, process_index=0, process_count=2)


def test_language_filter_and_second_caption(setup):
    cfg, tok = setup
    german = _tiny_config(cfg.data_dir)
    german.mix = {"image_caption": 1}
    german.image_caption.languages = ["de"]
    batch = next(pipeline.build_train_pipelines(german, tok)["image_caption"])
    assert {_language(tok, ids) for ids in batch["text_ids"]} == {"de"}

    two = _tiny_config(cfg.data_dir)
    two.mix = {"image_caption": 1}
    two.image_caption.sample_2_captions = True
    it = pipeline.build_train_pipelines(two, tok)["image_caption"]
    batches = [next(it) for _ in range(3)]
    assert set(batches[0]) == IMAGE_KEYS | {k + "_2" for k in TEXT_KEYS}
    pairs = [(_language(tok, a), _language(tok, b)) for batch in batches
             for a, b in zip(batch["text_ids"], batch["text_ids_2"])]
    assert all(a != b for a, b in pairs)
    assert len({a for a, _ in pairs}) == 4  # the first caption's language varies over all four


def test_parallel_pairs_are_swapped_half_of_the_time(setup, tmp_path):
    cfg, tok = setup
    path = tmp_path / "pairs.jsonl"
    pair = {"source_text": "a red circle on the left", "target_text": "ein roter kreis links"}
    path.write_text((json.dumps(pair) + "\n") * 64)
    text = _tiny_config(cfg.data_dir)
    text.mix = {"parallel_text": 1}
    text.parallel_text.kind = "jsonl"
    text.parallel_text.paths = [str(path)]
    it = pipeline.build_train_pipelines(text, tok)["parallel_text"]
    first = np.concatenate([next(it)["text_ids"] for _ in range(16)])  # two epochs
    english = np.array(["circle" in tok.decode(ids).split() for ids in first])
    german = np.array(["kreis" in tok.decode(ids).split() for ids in first])
    np.testing.assert_array_equal(english, ~german)
    assert 0.35 < english.mean() < 0.65


def test_retrieval_eval_set(setup):
    cfg, tok = setup
    data = pipeline.build_retrieval_eval(cfg, tok)
    assert data.num_images == 10
    assert sorted(data.texts) == ["de", "en", "es", "fr"]
    for lang, texts in data.texts.items():
        np.testing.assert_array_equal(texts["image_index"], np.arange(10))
        assert texts["text_ids"].shape == texts["text_atts"].shape == (10, 40)
        assert {_language(tok, ids) for ids in texts["text_ids"]} == {lang}
    batches = list(data.image_batches())
    assert [b["valid"].sum() for b in batches] == [4, 4, 2]
    assert all(b["image"].shape == (4, 24, 24, 3) and b["image"].dtype == np.uint8 for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["image_index"][b["valid"]] for b in batches]), np.arange(10))
    again = list(data.image_batches())
    np.testing.assert_array_equal(batches[1]["image"], again[1]["image"])  # no randomness


@pytest.mark.parametrize("edit,error,message", [
    (lambda c: setattr(c, "tokenizer", "/no/such/spm.model"), FileNotFoundError, "config.data.tokenizer"),
    (lambda c: setattr(c, "seed", -1), ValueError, "config.data.seed"),
    (lambda c: setattr(c, "mix", {"image_caption": 1, "videos": 1}), ValueError, "unknown batch kind 'videos'"),
    (lambda c: setattr(c, "mix", {"image_caption": -1}), ValueError, "non-negative integer"),
    (lambda c: c.image_caption.update(kind="jsonl", paths=["/no/file.jsonl"]), FileNotFoundError,
     r"image_caption.paths\[0\]"),
    (lambda c: c.image_caption.update(kind="parquet"), ValueError, "image_caption.kind"),
    (lambda c: c.image_caption.update(mask_prob=1.5), ValueError, "image_caption.mask_prob"),
    (lambda c: c.image_caption.update(crop_scale=(0.9, 0.5)), ValueError, "crop_scale"),
    (lambda c: c.parallel_text.update(kind="aligned_text", paths=[["/a.en"]]), ValueError,
     r"parallel_text.paths\[0\]"),
    (lambda c: c.parallel_text.update(batch_size=0), ValueError, "parallel_text.batch_size"),
    (lambda c: c.eval.update(kind="tfds", tfds_name=""), ValueError, "eval.tfds_name"),
])
def test_config_validation_names_the_key(edit, error, message):
    cfg = default_data_config()
    validate_data_config(cfg)
    edit(cfg)
    with pytest.raises(error, match=message):
        validate_data_config(cfg)


def test_process_exits_cleanly_with_prefetching_pipelines(setup, tmp_path):
    cfg, _ = setup
    config_file = tmp_path / "data.json"
    config_file.write_text(cfg.to_json())
    code = textwrap.dedent(f"""
        import json, ml_collections
        from cclm_jax.data import pipeline
        cfg = ml_collections.ConfigDict(json.loads(open({str(config_file)!r}).read()))
        pipes = pipeline.build_train_pipelines(cfg, pipeline.load_tokenizer(cfg))
        next(pipes["image_caption"]); next(pipes["parallel_text"])
        print("batches ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "batches ok" in done.stdout


def test_flickr8k_with_the_xlmr_tokenizer(shared_data_dir, tmp_path):
    flickr = shared_data_dir / "flickr8k"
    cfg = default_data_config()
    cfg.data_dir = str(tmp_path)
    cfg.tokenizer = str(shared_data_dir / "xlmr_spm" / "sentencepiece.bpe.model")
    cfg.mix = {"image_caption": 1}
    for section, batch_size in (("image_caption", 16), ("eval", 100)):
        cfg[section].update(kind="jsonl", paths=[str(flickr / "val.jsonl")], image_field="image",
                            image_root=str(flickr), batch_size=batch_size)
        cfg[section].caption_fields.update({"multi30k_task1": "", "flickr8kcn_zh": "zh"})
    tok = pipeline.load_tokenizer(cfg)
    it = pipeline.build_train_pipelines(cfg, tok)["image_caption"]
    assert it.skipped == {}
    batch = next(it)
    assert batch["image"].shape == (16, 224, 224, 3) and batch["text_ids"].shape == (16, 40)
    assert batch["image"].std() > 20  # real photographs, not blank images
    records = [json.loads(line) for line in open(flickr / "val.jsonl", encoding="utf-8")]
    cleaned = {pipeline.pre_caption(c, 40) for r in records
               for c in list(r["multi30k_task1"].values()) + r["flickr8kcn_zh"]}
    assert all(tok.decode(ids) in cleaned for ids in batch["text_ids"])

    data = pipeline.build_retrieval_eval(cfg, tok)
    assert data.num_images == len(records) == 237
    assert sorted(data.texts) == ["cs", "de", "en", "fr", "zh"]
    np.testing.assert_array_equal(np.sort(data.texts["de"]["image_index"]), np.arange(237))
    # group the captions by image index and match each group to its json-lines record
    by_german = {pipeline.pre_caption(r["multi30k_task1"]["de"], 40): r for r in records}
    german = {int(i): tok.decode(ids)
              for i, ids in zip(data.texts["de"]["image_index"], data.texts["de"]["text_ids"])}
    chinese = {}
    for i, ids in zip(data.texts["zh"]["image_index"], data.texts["zh"]["text_ids"]):
        chinese.setdefault(int(i), []).append(tok.decode(ids))
    for i in range(237):
        record = by_german[german[i]]
        assert sorted(chinese.get(i, [])) == sorted(pipeline.pre_caption(c, 40) for c in record["flickr8kcn_zh"])
    first = next(data.image_batches())
    for row in (0, 7):
        record = by_german[german[int(first["image_index"][row])]]
        expected = image_lib.eval_image(tf.constant((flickr / record["image"]).read_bytes()), 224).numpy()
        np.testing.assert_array_equal(first["image"][row], expected)
