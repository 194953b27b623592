"""Prepared datasets (cclm_jax/data/builders.py): in-process and Apache Beam builds are identical; bytes kept."""
import pathlib

import pytest
import tensorflow as tf

from cclm_jax.data import builders
from tests import data_fixtures


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare_inputs")
    shards = data_fixtures.write_webdataset(root / "wds", shards=3, per_shard=6)
    keys = sorted(shards["captions"])
    de = data_fixtures.write_translations(root / "cc3m_de.tsv.gz", keys[::2], "de")
    wikimatrix = data_fixtures.write_wikimatrix(root / "WikiMatrix.de-en.tsv.gz", [
        (1.2, "ein Haus", "a house"), (1.01, "zu niedrig", "too low"), (1.5, "ein Baum", "a tree"),
        "not-a-number\tx\ty", "1.3\tonly two columns", (1.1, "...", "empty after cleaning"),
        (1.06, "ein Hund", "a dog")])
    image_caption = builders.Recipe("image_caption", "webdataset", {"train": shards["paths"]},
                                    {"caption_language": "en", "translations": {"de": de}, "join_field": "url"})
    parallel = builders.Recipe("parallel_text", "wikimatrix", {"train": [wikimatrix]}, {"min_score": 1.04})
    return {"shards": shards, "de_keys": keys[::2], "image_caption": image_caption, "parallel": parallel}


def _shard_records(builder) -> list[list[bytes]]:
    """The serialized records of every file of the train split, file by file, in file order."""
    files = sorted(str(i.filename) for i in builder.info.splits["train"].file_instructions)
    return [[r for r in tf.data.TFRecordDataset(f).as_numpy_iterator()] for f in files]


def test_webdataset_prepared_in_process_keeps_bytes_and_counts_skips(inputs, tmp_path):
    builder = builders.prepare(inputs["image_caption"], str(tmp_path), name="wds")
    assert builder.info.metadata["skipped"] == inputs["shards"]["skips"]
    assert builder.info.metadata["cclm_jax"]["kind"] == "image_caption"
    source = builders.open_prepared("cclm_image_caption/wds", str(tmp_path))
    got = {}
    for example in source.read("train"):
        captions = [c.decode() for c in example["captions"].numpy()]
        key = next(k for k, c in inputs["shards"]["captions"].items() if c == captions[0])
        got[key] = (example["image"].numpy(), captions, [x.decode() for x in example["languages"].numpy()])
    assert sorted(got) == sorted(inputs["shards"]["images"])
    for key, (image, captions, languages) in got.items():
        assert image == inputs["shards"]["images"][key]  # the JPEG bytes as downloaded, not re-encoded
        if key in inputs["de_keys"]:
            assert (captions[1], languages) == (f"de caption of {key}", ["en", "de"])
        else:
            assert languages == ["en"]


def test_same_dataset_with_and_without_beam(inputs, tmp_path):
    pytest.importorskip("apache_beam")
    for recipe, name in ((inputs["image_caption"], "cclm_image_caption"), (inputs["parallel"], "cclm_parallel_text")):
        local = builders.prepare(recipe, str(tmp_path / "local"), name="x", num_shards=3)
        beam = builders.prepare(recipe, str(tmp_path / "beam"), name="x", num_shards=3,
                                beam_options=["--runner=DirectRunner"])
        again = builders.prepare(recipe, str(tmp_path / "again"), name="x", num_shards=3, beam_options=[])
        assert beam.info.metadata["skipped"] == local.info.metadata["skipped"]
        # the same records in the same order; in-process shards split the order into equal counts, Beam's
        # into equal ranges of the key hash (TFDS's writers), each deterministic
        flat = lambda builder: [r for shard in _shard_records(builder) for r in shard]  # noqa: E731
        assert flat(beam) == flat(local)
        assert len(flat(local)) == local.info.splits["train"].num_examples > 0
        assert _shard_records(again) == _shard_records(beam)
        assert len(_shard_records(beam)) == len(_shard_records(local)) == 3
        assert pathlib.Path(tmp_path / "beam" / name / "x" / "1.0.0").is_dir()
    assert local.info.metadata["skipped"] == {"below_min_score": 1, "invalid_score": 1, "missing_field": 1,
                                              "empty_text": 1}
    texts = sorted(r["text_2"].numpy().decode() for r in builders.open_prepared(
        "cclm_parallel_text/x", str(tmp_path / "beam")).read("train"))
    assert texts == ["a dog", "a house", "a tree"]


def test_prepare_without_usable_example_fails_naming_the_input(tmp_path):
    bad = tmp_path / "00000.tar"
    bad.write_bytes(b"not a tar archive" * 64)
    recipe = builders.Recipe("image_caption", "webdataset", {"train": [str(bad)]})
    with pytest.raises(ValueError, match=r"no usable example in .*00000\.tar.*corrupt_shard"):
        builders.prepare(recipe, str(tmp_path / "out"), name="bad")


def test_open_prepared_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cclm-jax data prepare"):
        builders.open_prepared("cclm_image_caption/missing", str(tmp_path))
    with pytest.raises(ValueError, match="not a prepared dataset name"):
        builders.open_prepared("coco_captions", str(tmp_path))
    assert builders.beam_flags("runner=DataflowRunner, project=p,--region=r") == [
        "--runner=DataflowRunner", "--project=p", "--region=r"]
