"""Generated demo data: captions that describe the pictures, in four languages, deterministic."""
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from cclm_jax.data import demo
from cclm_jax.data.text import pre_caption
from cclm_jax.data.tokenizer import Tokenizer

SPEC = demo.DemoSpec(image_size=48, num_train=24, num_val=30, num_parallel=50, vocab_size=500, seed=3)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return demo.prepare_demo(tmp_path_factory.mktemp("demo"), SPEC)


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_caption_grammar():
    scene = demo.Scene("star", "red", "small", "left", "white")
    assert [demo.caption(scene, lang) for lang in demo.LANGUAGES] == [
        "a small red star on the left against a white background",
        "ein kleiner roter Stern links vor weißem Hintergrund",
        "une petite étoile rouge à gauche sur fond blanc",
        "una estrella roja pequeña a la izquierda sobre fondo blanco",
    ]
    scene = demo.Scene("triangle", "purple", "large", "middle", "brown")
    assert [demo.caption(scene, lang) for lang in demo.LANGUAGES] == [
        "a large purple triangle in the middle against a brown background",
        "ein großes violettes Dreieck in der Mitte vor braunem Hintergrund",
        "un grand triangle violet au centre sur fond marron",
        "un triángulo morado grande en el centro sobre fondo marrón",
    ]
    with pytest.raises(ValueError, match="not 'it'"):
        demo.caption(scene, "it")


def _scene_of(english):
    words = english.split()
    return demo.Scene(
        shape=next(w for w in words if w in demo.SHAPES),
        colour=words[2], size=words[1],
        place=next(p for p in demo.PLACES if p in words),
        background=words[-2])


def test_pictures_show_what_the_captions_say(paths):
    areas = {}
    for record in _records(paths["val"]):
        assert sorted(record["caption"]) == sorted(demo.LANGUAGES)
        scene = _scene_of(record["caption"]["en"])
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(record["binary"]))), np.float64)
        assert pixels.shape == (48, 48, 3)
        background = np.array(demo.BACKGROUNDS[scene.background])
        colour = np.array(demo.COLOURS[scene.colour])
        shape = np.linalg.norm(pixels - colour, axis=-1) < 40
        assert np.linalg.norm(pixels[~shape].mean(0) - background) < 25
        ys, xs = np.nonzero(shape)
        fx, fy = demo.PLACES[scene.place]
        assert abs(xs.mean() / 48 - fx) < 0.08 and abs(ys.mean() / 48 - fy) < 0.08, record["caption"]["en"]
        areas.setdefault((scene.shape, scene.size), []).append(shape.mean())
    for shape in demo.SHAPES:  # every large one is bigger than every small one of its shape
        if (shape, "small") in areas and (shape, "large") in areas:
            assert max(areas[shape, "small"]) < min(areas[shape, "large"]), shape
    assert len(areas) >= 6


def test_generation_is_deterministic_and_cached(paths, tmp_path):
    again = demo.prepare_demo(tmp_path, SPEC)
    for key in ("train", "val", "parallel"):
        assert open(again[key], "rb").read() == open(paths[key], "rb").read()
    stamp = (tmp_path / SPEC.key() / "train.jsonl").stat().st_mtime_ns
    assert demo.prepare_demo(tmp_path, SPEC) == again
    assert (tmp_path / SPEC.key() / "train.jsonl").stat().st_mtime_ns == stamp
    other = demo.demo_paths(tmp_path, demo.DemoSpec(seed=4))
    assert other["train"] != again["train"]


def test_parallel_sentences_and_tokenizer(paths):
    pairs = _records(paths["parallel"])
    assert len(pairs) == SPEC.num_parallel
    assert all(p["source_lang"] != p["target_lang"] for p in pairs)
    assert {p["source_lang"] for p in pairs} == set(demo.LANGUAGES)
    tok = Tokenizer(paths["spm"])
    assert tok.vocab_size <= SPEC.vocab_size + 2 and tok.mask_id == tok.vocab_size - 1
    captions = [c for r in _records(paths["train"]) for c in r["caption"].values()]
    ids = [tok.encode(pre_caption(c, 40)) for c in captions]
    assert max(len(i) for i in ids) <= 38  # fits max_tokens 40 with <s> and </s>
    assert all(3 not in i for i in ids)  # no <unk>
    assert tok.decode(ids[0]) == pre_caption(captions[0], 40)


def _features(record):
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(record["binary"]))), np.float64) / 255.0
    small = pixels.reshape(8, 6, 8, 6, 3).mean(axis=(1, 3))  # 8x8 colour layout
    return np.concatenate([small.ravel(), [1.0]])


def test_a_linear_model_retrieves_demo_captions_far_above_chance(tmp_path):
    """The captions are predictable from the pixels: ridge regression from an 8x8 colour layout
    to the caption's words retrieves the right caption among 60 far more often than 1/60."""
    spec = demo.DemoSpec(image_size=48, num_train=600, num_val=60, num_parallel=1, vocab_size=300, seed=5)
    paths = demo.prepare_demo(tmp_path, spec)
    train, val = _records(paths["train"]), _records(paths["val"])
    vocabulary = sorted({w for r in train for w in r["caption"]["en"].split()})

    def words(record):
        return np.array([w in record["caption"]["en"].split() for w in vocabulary], np.float64)

    x = np.stack([_features(r) for r in train])
    y = np.stack([words(r) for r in train])
    weights = np.linalg.solve(x.T @ x + 1e-2 * np.eye(x.shape[1]), x.T @ y)
    predicted = np.stack([_features(r) for r in val]) @ weights
    captions = np.stack([words(r) for r in val])
    scores = predicted @ (captions - captions.mean(0)).T  # image i vs caption j
    recall_at_1 = np.mean(np.argmax(scores, axis=1) == np.arange(len(val)))
    assert recall_at_1 > 10 / len(val), recall_at_1
