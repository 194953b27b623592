"""Region data: records (skip and count), crops, boxes, patch masks and rows against hand-computed values and a
loop transcription of the reference `get_image_attns`, and the region pipeline (static shapes, exact resume)."""
import base64
import json
import math

import numpy as np
import pytest
import tensorflow as tf

from cclm_jax.data import image as image_lib
from cclm_jax.data import pipeline
from cclm_jax.data import region as R
from cclm_jax.data.config import default_data_config, validate_data_config
from cclm_jax.data.sources import SkipCounter
from cclm_jax.data.tokenizer import Tokenizer

WORDS = ("red", "blue", "green", "circle", "square", "dog", "cat", "tree", "the", "a", "big", "small", "rot",
         "blau", "grün", "hund", "katze", "baum")


def _reference_image_attns(x, y, w, h, num_patch, patch_size):
    """The README's `get_image_attns`, transcribed as loops."""
    x_min = min(math.floor(x / patch_size), num_patch - 1)
    x_max = max(x_min + 1, min(math.ceil((x + w) / patch_size), num_patch))
    y_min = min(math.floor(y / patch_size), num_patch - 1)
    y_max = max(y_min + 1, min(math.ceil((y + h) / patch_size), num_patch))
    atts = [0] * (1 + num_patch ** 2)
    atts[0] = 1
    for j in range(x_min, x_max):
        for i in range(y_min, y_max):
            atts[num_patch * i + j + 1] = 1
    return atts


@pytest.mark.parametrize("box", [(64, 32, 96, 128), (150, 170, 74, 54), (100, 100, 10, 8), (40.5, 60.25, 100, 80),
                                 (63.8, 63.9, 0.5, 0.3), (0, 0, 224, 224), (223.5, 223.5, 0.5, 0.5), (96, 0, 64, 1)])
def test_patch_mask_is_get_image_attns(box):
    got = R.patch_mask(box, 224, 32)
    assert got.dtype == np.int32 and got.shape == (50,)
    np.testing.assert_array_equal(got, _reference_image_attns(*box, 7, 32))


def test_patch_mask_hand_cases():
    on = lambda mask: sorted(np.nonzero(mask[1:])[0].tolist())  # noqa: E731
    assert on(R.patch_mask((100, 100, 10, 8), 224, 32)) == [3 * 7 + 3]  # inside one cell
    assert on(R.patch_mask((63.8, 63.9, 0.5, 0.3), 224, 32)) == [8, 9, 15, 16]  # straddles a corner: 4 cells
    assert on(R.patch_mask((128, 0, 32, 32), 224, 32)) == [4]  # ends on a cell edge: not the next cell
    assert R.patch_mask((0, 0, 1, 1), 224, 32)[0] == 1


def test_patch_mask_matches_golden_rows(golden_dir):
    path = golden_dir.parent / "golden_region" / "ref_region.npz"
    if not path.exists():
        pytest.skip("../shared/reference/golden_region is absent")
    ref = np.load(path)
    for box, atts, target, whole in zip(ref["box_xywh_px"], ref["image_atts"], ref["target_bbox"], ref["is_image"]):
        if whole:
            continue
        np.testing.assert_array_equal(R.patch_mask(box, 224, 32), atts)
        np.testing.assert_allclose(R.target_box(box, 224), target, atol=1e-7)


def test_transform_box_crop_flip_resize_and_min_area():
    crop = (10, 20, 100, 80)  # x0, y0, w0, h0
    np.testing.assert_allclose(R.transform_box((30, 40, 20, 10), crop, False, 224, 0.5),
                               (20 * 2.24, 20 * 2.8, 20 * 2.24, 10 * 2.8))
    # flipped: x -> (w0 - x) - w = (100 - 20) - 20 = 60
    np.testing.assert_allclose(R.transform_box((30, 40, 20, 10), crop, True, 224, 0.5),
                               (60 * 2.24, 20 * 2.8, 20 * 2.24, 10 * 2.8))
    # 3/4 of the area inside: clipped to the crop
    np.testing.assert_allclose(R.transform_box((0, 40, 40, 10), crop, False, 224, 0.5),
                               (0.0, 20 * 2.8, 30 * 2.24, 10 * 2.8))
    assert R.transform_box((-10, 40, 40, 10), crop, False, 224, 0.5) is None  # exactly half: dropped (> 0.5)
    assert R.transform_box((200, 40, 10, 10), crop, False, 224, 0.5) is None  # outside
    np.testing.assert_allclose(R.target_box((20, 40, 60, 100), 200), (0.25, 0.45, 0.3, 0.5))


def _png(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return image_lib.encode_png(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_crop_around_box_follows_the_uniforms():
    data = _png(100, 80)
    example = {"image": tf.constant(data), "width": tf.constant(100, tf.int64), "height": tf.constant(80, tf.int64),
               "boxes": tf.constant([5, 5, 10, 10, 30, 20, 40, 30], tf.int64), "left_right": tf.constant(0, tf.int64)}
    u = tf.constant([0.9, 0.5, 0.5, 0.5, 0.5, 0.2])  # elem 1 (30, 20, 40, 30); flip (0.2 < 0.5)
    out = R.crop_around_box(example, u, 32, careful_hflip=True)
    # x0 = floor(0.5 * 31) = 15, y0 = floor(0.5 * 21) = 10, x1 = 70 + floor(0.5 * 31) = 85, y1 = 50 + floor(0.5 * 31)
    np.testing.assert_array_equal(out["crop"].numpy(), [15, 10, 70, 55])
    assert bool(out["flip"])
    decoded = image_lib.decode_image(tf.constant(data))
    want = image_lib.resize_bicubic(decoded[10:65, 15:85], 32).numpy()[:, ::-1]
    np.testing.assert_array_equal(out["image"].numpy(), want)
    careful = R.crop_around_box(dict(example, left_right=tf.constant(1, tf.int64)), u, 32, careful_hflip=True)
    assert not bool(careful["flip"])
    u_max = tf.constant([0.0, 0.999, 0.999, 0.999, 0.999, 0.9])  # elem 0, widest offsets
    np.testing.assert_array_equal(R.crop_around_box(example, u_max, 32, True)["crop"].numpy(), [5, 5, 95, 75])


def _write_records(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")


def _b64(data):
    return base64.b64encode(data).decode()


def test_records_skip_and_count_bad_input(tmp_path):
    img = _b64(_png(60, 40))
    records = [
        {"binary": img, "caption": {"en": "a red dog", "de": "ein roter hund"},
         "elems": [{"bb": [10, 5, 20, 20], "caption": {"en": "the dog", "de": "der hund"},
                    "attributes": {"en": "red", "de": "rot"}},
                   {"bb": [50, 5, 20, 20], "caption": "outside"},  # x + w > 60
                   {"bb": [10, 5, 0, 20], "caption": "zero width"},
                   {"bb": [1, 1, 5, 5], "caption": "?!"},  # nothing left after cleaning
                   {"bb": [0, 0, 60, 40], "caption": ["the left tree", {"de": "baum"}]}]},
        {"binary": img, "caption": "no elems"},
        {"binary": img, "elems": [{"bb": [-1, 0, 5, 5], "caption": "x"}]},
        "{not json",
        {"binary": "!!notbase64", "elems": [{"bb": [0, 0, 5, 5], "caption": "x"}]},
    ]
    path = tmp_path / "regions.jsonl"
    _write_records(path, records)
    counter = SkipCounter()
    out = list(R.region_examples([str(path)], image_field="binary", image_root="", counter=counter))
    assert dict(counter.counts) == {"invalid_box": 3, "empty_caption": 1, "missing_field": 1, "no_region": 1,
                                    "invalid_json": 1, "corrupt_image": 1}
    assert len(out) == 1
    example = out[0][1]
    assert (example["width"], example["height"], example["left_right"]) == (60, 40, 1)
    np.testing.assert_array_equal(example["boxes"], [10, 5, 20, 20, 0, 0, 60, 40])
    meta = json.loads(example["meta"])
    assert meta["caption"] == [["en", "a red dog"], ["de", "ein roter hund"]]
    assert meta["elems"][0] == {"caption": [["en", "the dog"], ["de", "der hund"]],
                                "attributes": [["en", "red"], ["de", "rot"]]}
    assert meta["elems"][1]["caption"] == [["en", "the left tree"], ["de", "baum"]]
    assert meta["boxes"] == [[10, 5, 20, 20], [0, 0, 60, 40]]


def test_image_rows_whole_caption_first_attributes_and_limits():
    meta = {"caption": [["en", "a scene"]], "boxes": [[0, 0, 50, 50], [60, 60, 40, 40], [0, 0, 100, 100]],
            "elems": [{"caption": [["en", "one"]], "attributes": [["en", "red"], ["de", "rot"]]},
                      {"caption": [["de", "zwei"]], "attributes": [["en", "blue"]]},
                      {"caption": [["en", "three"]], "attributes": []}]}
    rng = np.random.default_rng(0)
    rows = R.image_rows(meta, (0, 0, 100, 100), False, rng, image_res=50, max_regions=5, min_perc_in_image=0.5)
    assert rows[0] == ("a scene", None)
    assert sorted(rows[1:]) == sorted([("red one", (0.0, 0.0, 25.0, 25.0)), ("blue zwei", (30.0, 30.0, 20.0, 20.0)),
                                       ("three", (0.0, 0.0, 50.0, 50.0))])
    two = R.image_rows(meta, (0, 0, 100, 100), False, rng, image_res=50, max_regions=2, min_perc_in_image=0.5)
    assert len(two) == 2 and two[0] == ("a scene", None)
    german = R.image_rows(meta, (0, 0, 100, 100), False, rng, image_res=50, max_regions=5, min_perc_in_image=0.5,
                          languages=("de",))
    assert german == [("blue zwei", (30.0, 30.0, 20.0, 20.0))]  # no German whole caption; attribute in any language


def test_batch_rows_draws_and_pads_with_invalid_rows():
    rows = [[("whole", None), ("box a", (0.0, 0.0, 32.0, 32.0))], [("box b", (32.0, 64.0, 64.0, 32.0))]]
    texts, out = R.batch_rows(rows, 5, np.random.default_rng(0), image_res=128, patch_size=32)
    np.testing.assert_array_equal(out["valid"], [True, True, True, False, False])
    by_text = {t: r for r, t in enumerate(texts[:3])}
    assert set(by_text) == {"whole", "box a", "box b"}
    w, a, b = by_text["whole"], by_text["box a"], by_text["box b"]
    np.testing.assert_array_equal(out["idx_to_group_img"][[w, a, b]], [0, 0, 1])
    np.testing.assert_array_equal(out["is_image"][[w, a, b]], [1, 0, 0])
    np.testing.assert_array_equal(out["image_atts"][w], np.ones(17))
    np.testing.assert_array_equal(np.nonzero(out["image_atts"][b])[0], [0, 1 + 2 * 4 + 1, 1 + 2 * 4 + 2])
    np.testing.assert_allclose(out["target_bbox"][[w, a, b]], [[0.5, 0.5, 1, 1], [0.125, 0.125, 0.25, 0.25],
                                                               [0.5, 0.625, 0.5, 0.25]])
    assert texts[3:] == [texts[0], texts[1]]  # padding repeats rows, marked invalid
    _, many = R.batch_rows(rows * 3, 2, np.random.default_rng(0), image_res=128, patch_size=32)
    assert many["valid"].all() and many["idx_to_group_img"].max() < 6


# ----------------------------------------------------------------------------- the pipeline

def _region_file(path, n_images=12):
    rng = np.random.default_rng(1)
    lines = []
    for i in range(n_images):
        w, h = int(rng.integers(40, 80)), int(rng.integers(40, 80))
        elems = []
        for _ in range(int(rng.integers(1, 5))):
            bw, bh = int(rng.integers(4, w // 2)), int(rng.integers(4, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            words = " ".join(rng.choice(WORDS, 3))
            elems.append({"bb": [x, y, bw, bh], "caption": {"en": words, "de": words + " de"}})
        record = {"binary": _b64(_png(w, h, i)), "elems": elems}
        if i % 2:
            record["caption"] = {"en": "a picture", "de": "ein bild"}
        lines.append(record)
    _write_records(path, lines)


@pytest.fixture(scope="module")
def region_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("region")
    _region_file(root / "regions.jsonl")
    tokenizer = Tokenizer.train([" ".join(WORDS)] * 20 + ["a picture", "ein bild de"], root / "spm", vocab_size=60)
    cfg = default_data_config()
    cfg.data_dir = str(root / "cache")
    cfg.shuffle_buffer = 8
    cfg.mix = {"region": 1}
    cfg.region.update(paths=(str(root / "regions.jsonl"),), image_res=32, patch_size=8, batch_size=6, max_images=3,
                      max_tokens=12, max_words=12, max_masks=4)
    validate_data_config(cfg)
    return cfg, tokenizer


def test_region_pipeline_batch_contract_and_resume(region_setup):
    cfg, tok = region_setup
    it = pipeline.build_train_pipelines(cfg, tok)["region"]
    first = next(it)
    assert first["image"].shape == (3, 32, 32, 3) and first["image"].dtype == np.uint8
    assert first["image_atts"].shape == (6, 17) and first["target_bbox"].shape == (6, 4)
    for key in ("idx_to_group_img", "is_image", "valid"):
        assert first[key].shape == (6,)
    assert first["text_ids"].shape == (6, 12) and first["masked_pos"].shape == (6, 4)
    assert 0 <= first["idx_to_group_img"].min() and first["idx_to_group_img"].max() < 3
    assert (first["image_atts"][:, 0] == 1).all()
    for atts, target, whole in zip(first["image_atts"], first["target_bbox"], first["is_image"]):
        if whole:
            assert atts.all() and tuple(target) == (0.5, 0.5, 1.0, 1.0)
        else:  # the mask is the box's patch mask
            x, y = (target[0] - target[2] / 2) * 32, (target[1] - target[3] / 2) * 32
            np.testing.assert_array_equal(atts, R.patch_mask((x, y, target[2] * 32, target[3] * 32), 32, 8))
    state = it.get_state()
    second = next(it)
    again = pipeline.build_train_pipelines(cfg, tok)["region"]
    again.set_state(state)
    resumed = next(again)
    for key in second:
        np.testing.assert_array_equal(resumed[key], second[key], err_msg=key)
    assert it.metrics() == {}


def test_two_shards_offset_the_image_index(region_setup):
    cfg, tok = region_setup
    cfg = cfg.copy_and_resolve_references()
    cfg.host_shards = 2
    batch = next(pipeline.build_host_pipelines(cfg, tok)["region"])
    assert batch["image"].shape[0] == 6 and batch["idx_to_group_img"].shape == (12,)
    assert batch["idx_to_group_img"][:6].max() < 3 and batch["idx_to_group_img"][6:].min() >= 3


def test_region_config_errors_name_the_key(region_setup):
    cfg, _ = region_setup
    for key, value, message in [("patch_size", 5, "region.patch_size"), ("min_perc_in_image", 1.0,
                                                                          "region.min_perc_in_image"),
                                ("max_images", 0, "region.max_images"), ("paths", ("/nonexistent.jsonl",),
                                                                         "region.paths[0]")]:
        bad = cfg.copy_and_resolve_references()
        bad.region[key] = value
        with pytest.raises((ValueError, FileNotFoundError), match=message.replace("[", r"\[")):
            validate_data_config(bad)
