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
    scene = demo.Scene("star", "red", "small")
    assert [demo.caption(scene, lang) for lang in demo.LANGUAGES] == [
        "a small red star", "ein kleiner roter Stern", "une petite étoile rouge", "una estrella roja pequeña"]
    scene = demo.Scene("triangle", "purple", "large")
    assert [demo.caption(scene, lang) for lang in demo.LANGUAGES] == [
        "a large purple triangle", "ein großes violettes Dreieck", "un grand triangle violet",
        "un triángulo morado grande"]
    scene = demo.Scene("diamond", "orange", "medium")
    assert [demo.caption(scene, lang) for lang in demo.LANGUAGES] == [
        "a medium orange diamond", "eine mittelgroße orangefarbene Raute", "un losange orange moyen",
        "un rombo naranja mediano"]
    with pytest.raises(ValueError, match="not 'it'"):
        demo.caption(scene, "it")


def _scene_of(english):
    _, size, colour, shape = english.split()
    return demo.Scene(shape=shape, colour=colour, size=size)


def test_pictures_show_what_the_captions_say(paths):
    areas = {}
    for record in _records(paths["val"]):
        assert sorted(record["caption"]) == sorted(demo.LANGUAGES)
        scene = _scene_of(record["caption"]["en"])
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(record["binary"]))), np.float64)
        assert pixels.shape == (48, 48, 3)
        colour = np.array(demo.COLOURS[scene.colour])
        shape = np.linalg.norm(pixels - colour, axis=-1) < 40
        background = np.linalg.norm(pixels - np.array(demo.BACKGROUND), axis=-1) < 25
        assert shape.mean() > 0.01, record["caption"]["en"]
        assert (shape | background).mean() > 0.85, record["caption"]["en"]  # the rest: anti-aliased edges
        ys, xs = np.nonzero(shape)
        assert min(xs.min(), ys.min()) > 0 and max(xs.max(), ys.max()) < 47  # the whole shape is inside
        areas.setdefault((scene.shape, scene.size), []).append(shape.mean())
    for shape in demo.SHAPES:  # every larger one is bigger than every smaller one of its shape
        for smaller, larger in (("small", "medium"), ("medium", "large")):
            if (shape, smaller) in areas and (shape, larger) in areas:
                assert max(areas[shape, smaller]) < min(areas[shape, larger]), (shape, smaller, larger)
    assert len(areas) >= 10


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
    """Fraction of the picture in each demo colour (the shape is anywhere: position-free statistics)."""
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(record["binary"]))), np.float64)
    fractions = [np.mean(np.linalg.norm(pixels - np.array(c), axis=-1) < 40) for c in demo.COLOURS.values()]
    return np.concatenate([fractions, np.sqrt(fractions), [1.0]])


def test_a_linear_model_retrieves_demo_captions_far_above_chance(tmp_path):
    """The captions are predictable from the pixels: ridge regression from colour-area statistics
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
