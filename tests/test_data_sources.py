"""Sources: TFDS builders from json-lines / aligned text, bad-input accounting, catalog reader."""
import base64
import gzip
import io
import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from cclm_jax.data import sources


def _png(colour, size=(12, 10)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _records(source, split="train"):
    out = []
    for ex in source.read(split):
        out.append({
            "image": ex["image"].numpy(),
            "captions": [c.decode("utf-8") for c in ex["captions"].numpy()],
            "languages": [c.decode("utf-8") for c in ex["languages"].numpy()],
        })
    return sorted(out, key=lambda r: r["captions"])


def test_bad_jsonl_lines_are_skipped_and_counted(tmp_path):
    red, blue, green = _png((255, 0, 0)), _png((0, 0, 255)), _png((0, 255, 0))
    lines = [
        json.dumps({"binary": _b64(red), "caption": {"en": "A red square.", "de": "Ein rotes Quadrat"}}),
        json.dumps({"binary": _b64(b"\x89PNG but truncated"), "caption": {"en": "corrupt image"}}),
        json.dumps({"binary": _b64(blue), "caption": {"en": "", "fr": "un carré bleu"}}),
        json.dumps({"binary": _b64(red), "text": {"en": "no caption field"}}),
        json.dumps({"caption": {"en": "no image field"}}),
        "",
        json.dumps({"binary": _b64(green), "caption": [{"en": "green", "de": "grün"}, {"en": "lime"}]}),
        '{"binary": "abc", "caption": ',
        json.dumps({"binary": "!!not base64!!", "caption": {"en": "bad base64"}}),
        json.dumps({"binary": _b64(green), "caption": {"en": "...", "de": "  "}}),
        json.dumps({"binary": _b64(green), "caption": 5}),
        json.dumps(["not", "an", "object"]),
    ]
    raw = "\n".join(lines).encode("utf-8")
    non_utf8 = b'{"binary": "' + _b64(blue).encode() + b'", "caption": {"en": "caf\xe9 au lait"}}'
    path = tmp_path / "data.jsonl"
    path.write_bytes(raw + b"\n" + non_utf8 + b"\n")

    source = sources.image_caption_jsonl({"train": [str(path)]}, str(tmp_path / "tfds"))
    assert source.skipped == {
        "corrupt_image": 2, "empty_caption": 3, "invalid_caption": 1, "invalid_json": 2,
        "invalid_utf8": 1, "missing_field": 2, "no_caption": 2,
    }
    records = _records(source)
    assert [r["captions"] for r in records] == [
        ["A red square.", "Ein rotes Quadrat"], ["green", "grün", "lime"], ["un carré bleu"]]
    assert [r["languages"] for r in records] == [["en", "de"], ["en", "de", "en"], ["fr"]]
    assert records[0]["image"] == red and records[1]["image"] == green
    # every non-blank line is either an example or exactly one record-level skip
    record_skips = sum(n for k, n in source.skipped.items() if k in sources.RECORD_SKIPS)
    assert record_skips + len(records) == 12
    # the report survives reopening without a rebuild
    again = sources.image_caption_jsonl({"train": [str(path)]}, str(tmp_path / "tfds"))
    assert again.skipped == source.skipped


def test_image_paths_language_fields_and_missing_files(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png((10, 20, 30)))
    path = tmp_path / "flickr.jsonl"
    path.write_text("\n".join([
        json.dumps({"image": "a.png", "task1": {"en": "a dog", "cs": "pes"}, "zh_caps": ["一只狗", "狗"]}),
        json.dumps({"image": "missing.png", "task1": {"en": "lost"}}),
    ]), encoding="utf-8")
    source = sources.image_caption_jsonl(
        {"train": [str(path)]}, str(tmp_path / "tfds"), image_field="image",
        caption_fields={"task1": "", "zh_caps": "zh"}, image_root=str(tmp_path / "img"))
    assert source.skipped == {"missing_image_file": 1}
    (record,) = _records(source)
    assert sorted(zip(record["languages"], record["captions"])) == [
        ("cs", "pes"), ("en", "a dog"), ("zh", "一只狗"), ("zh", "狗")]
    with pytest.raises(FileNotFoundError, match="image_root"):
        sources.image_caption_jsonl({"train": [str(path)]}, str(tmp_path / "tfds"),
                                    image_root=str(tmp_path / "no"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.image_caption_jsonl({"train": [str(tmp_path / "none.jsonl")]}, str(tmp_path / "tfds"))


def test_a_source_without_usable_examples_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"binary": "xx", "caption": {"en": "x"}}) + "\n")
    with pytest.raises(ValueError, match="no usable example"):
        sources.image_caption_jsonl({"train": [str(path)]}, str(tmp_path / "tfds"))


def test_changed_input_files_are_rebuilt(tmp_path):
    path = tmp_path / "d.jsonl"
    line = json.dumps({"binary": _b64(_png((1, 2, 3))), "caption": {"en": "one"}})
    path.write_text(line + "\n")
    first = sources.image_caption_jsonl({"train": [str(path)]}, str(tmp_path / "tfds"))
    assert first.num_examples("train") == 1
    path.write_text(line + "\n" + line.replace("one", "two") + "\n")
    second = sources.image_caption_jsonl({"train": [str(path)]}, str(tmp_path / "tfds"))
    assert second.num_examples("train") == 2


def test_parallel_text_from_jsonl_and_aligned_files(tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_bytes(b"\n".join([
        json.dumps({"source_text": "Hello there", "target_text": "Hallo", "source_lang": "en",
                    "target_lang": "de"}).encode(),
        json.dumps({"source_text": "only one side"}).encode(),
        json.dumps({"source_text": "!!!", "target_text": "x"}).encode(),
        b'{"source_text": "\xff\xfe", "target_text": "y"}',
        json.dumps({"source_text": "Good night", "target_text": "Bonne nuit"}).encode(),
    ]) + b"\n")
    with gzip.open(tmp_path / "t.en.gz", "wt", encoding="utf-8") as f:
        f.write("A dog.\nA cat.\n\nA bird.\n")
    with gzip.open(tmp_path / "t.de.gz", "wt", encoding="utf-8") as f:
        f.write("Ein Hund.\nEine Katze.\nLeer links.\nEin Vogel.\n")
    source = sources.parallel_text(
        {"train": [str(jsonl), [str(tmp_path / "t.en.gz"), str(tmp_path / "t.de.gz")]]}, str(tmp_path / "tfds"))
    assert source.skipped == {"missing_field": 1, "empty_text": 2, "invalid_utf8": 1}
    pairs = sorted((ex["text_1"].numpy().decode(), ex["text_2"].numpy().decode(), ex["lang_1"].numpy().decode(),
                    ex["lang_2"].numpy().decode()) for ex in source.read("train"))
    assert pairs == [
        ("A bird.", "Ein Vogel.", "en", "de"), ("A cat.", "Eine Katze.", "en", "de"),
        ("A dog.", "Ein Hund.", "en", "de"), ("Good night", "Bonne nuit", "src", "tgt"),
        ("Hello there", "Hallo", "en", "de")]


def test_misaligned_files_are_an_error(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "a.fr").write_text("un\ndeux\n")
    with pytest.raises(ValueError, match="differ in length"):
        sources.parallel_text({"train": [[str(tmp_path / "a.en"), str(tmp_path / "a.fr")]]},
                              str(tmp_path / "tfds"))


def test_host_splits_are_disjoint_and_equal(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"source_text": f"s {i}", "target_text": f"t {i}"}) + "\n"
                            for i in range(11)))
    source = sources.parallel_text({"train": [str(path)]}, str(tmp_path / "tfds"))
    shards = [[ex["text_1"].numpy() for ex in source.read(source.host_split("train", i, 3))] for i in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert len(set().union(*shards)) == 9
    assert sum(1 for _ in source.read(source.host_split("train", 0, 1))) == 11
    with pytest.raises(ValueError, match="outside"):
        source.host_split("train", 3, 3)


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    """A catalog-style dataset: decoded Image feature, nested caption sequence."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(4):
            pixels = np.full((6, 8, 3), 40 * i, np.uint8)
            yield i, {"image": pixels, "captions": {"text": [f"picture {i}", f"image number {i}"]}}


def test_catalog_dataset_with_mapped_features(tmp_path):
    TinyCaptions(data_dir=str(tmp_path)).download_and_prepare()
    source = sources.catalog_image_caption("tiny_captions", image_feature="image",
                                           caption_feature="captions/text", language="en",
                                           data_dir=str(tmp_path))
    examples = sorted(_records(source), key=lambda r: r["captions"][0])
    assert [r["captions"] for r in examples] == [[f"picture {i}", f"image number {i}"] for i in range(4)]
    assert all(r["languages"] == ["en", "en"] for r in examples)
    decoded = tf.io.decode_image(examples[2]["image"]).numpy()
    assert decoded.shape == (6, 8, 3) and decoded.max() == 80
    with pytest.raises(KeyError, match="captions/title"):
        sources.catalog_image_caption("tiny_captions", image_feature="image", caption_feature="captions/title",
                                      language="en", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not prepared"):
        sources.catalog_image_caption("tiny_captions", image_feature="image", caption_feature="captions/text",
                                      language="en", data_dir=str(tmp_path / "elsewhere"))


def test_a_concurrent_build_by_another_process_is_accepted(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"binary": _b64(_png((9, 9, 9))), "caption": {"en": "grey", "de": ""}}) + "\n")
    recipe = {"splits": {"train": [str(path)]}, "image_field": "binary", "image_root": "",
              "caption_fields": {"caption": ""}}
    config = sources.RecipeConfig(name=sources._fingerprint(recipe), recipe_json=json.dumps(recipe, sort_keys=True))
    loser = sources.ImageCaptionJsonl(config=config, data_dir=str(tmp_path / "tfds"))

    def lose_the_race(**kwargs):  # the other process renames its build into place first
        sources.ImageCaptionJsonl(config=config, data_dir=str(tmp_path / "tfds")).download_and_prepare(**kwargs)
        raise OSError("destination exists")

    monkeypatch.setattr(loser, "download_and_prepare", lose_the_race)
    source = sources._prepare(loser)
    assert source.num_examples("train") == 1 and source.skipped == {"empty_caption": 1}
