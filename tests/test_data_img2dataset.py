"""img2dataset readers (parquet, tfrecord, webdataset keys) and the WikiMatrix reader, with skip reasons."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from cclm_jax.data import converters, img2dataset, sources
from tests import data_fixtures


def _read(fn, path, **options):
    counter = sources.SkipCounter()
    examples = [ex for _, ex in fn(path, counter=counter, **options)]
    return examples, dict(counter.counts)


def test_parquet_rows_with_failed_downloads_and_translations(tmp_path):
    image = data_fixtures.jpeg((10, 200, 30))
    table = pa.table({
        "key": ["000", "001", "002", "003"],
        "caption": ["a green square", "failed", "", "a broken one"],
        "url": ["http://a/0", "http://a/1", "http://a/2", "http://a/3"],
        "jpg": [image, None, image, b"\xff\xd8 broken"],
        "status": ["success", "failed_to_download", "success", "success"],
        "error_message": [None, "timeout", None, None]})
    pq.write_table(table, tmp_path / "00000.parquet")
    tsv = tmp_path / "fr.tsv"
    tsv.write_text("un carré vert\thttp://a/0\nune traduction\thttp://a/2\n")
    examples, skipped = _read(img2dataset.examples, str(tmp_path / "00000.parquet"), translations={"fr": str(tsv)})
    assert skipped == {"failed_download": 1, "empty_caption": 1, "corrupt_image": 1}
    assert [(ex["captions"], ex["languages"]) for ex in examples] == [
        (["a green square", "un carré vert"], ["en", "fr"]), (["une traduction"], ["fr"])]
    assert examples[0]["image"] == image


def test_tfrecord_shard_and_corrupt_tail(tmp_path):
    image = data_fixtures.jpeg((200, 10, 30))
    path = tmp_path / "00000.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for key, caption in (("000", b"first photo"), ("001", b"")):
            feature = {"key": key.encode(), "jpg": image, "txt": caption}
            example = tf.train.Example(features=tf.train.Features(feature={
                k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v])) for k, v in feature.items()}))
            writer.write(example.SerializeToString())
    path.write_bytes(path.read_bytes() + b"\x40" + b"\x00" * 15)  # a truncated record at the end
    examples, skipped = _read(img2dataset.examples, str(path), join_field="key")
    assert [ex["captions"] for ex in examples] == [["first photo"]]
    assert skipped == {"empty_caption": 1, "no_caption": 1, "corrupt_shard": 1}


def test_wikimatrix_threshold_and_language_pair(tmp_path):
    path = data_fixtures.write_wikimatrix(tmp_path / "WikiMatrix.cs-en.tsv.gz", [
        (1.2, "dům", "house"), (1.0, "nízko", "low"), "x\ty\tz", "1.5\tjen jeden", (1.3, "ano", "?!")])
    examples, skipped = _read(converters.wikimatrix_examples, path, min_score=1.04)
    assert examples == [{"text_1": "dům", "text_2": "house", "lang_1": "cs", "lang_2": "en"}]
    assert skipped == {"below_min_score": 1, "invalid_score": 1, "missing_field": 1, "empty_text": 1}
    with pytest.raises(ValueError, match="cannot tell the language pair"):
        converters.wikimatrix_languages("/data/pairs.tsv")
    assert img2dataset.format_of("/d/00001.TAR") == "webdataset"
