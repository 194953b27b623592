"""Skip verdicts of the data stay true: a repaired image loses its cached "corrupt" / "missing" verdict (the data's
key covers the image files), and fine-tuning data with `data.skip_missing_images` drops and counts records whose
image is missing, finding images under their common file names."""
import io
import json
import os
import pathlib

import pytest
from PIL import Image

from cclm_jax.data import sources


def _png(colour, size=(12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _two_image_jsonl(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    (images / "good.png").write_bytes(_png((10, 20, 30)))
    (images / "bad.png").write_bytes(b"not an image at all")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"image": name, "caption": {"en": f"picture {name}"}}) + "\n"
                            for name in ("good.png", "bad.png", "later.png")))
    return path, images


def _open(path, tmp_path, images):
    return sources.image_caption_jsonl({"train": [str(path)]}, str(tmp_path / "tfds"), image_field="image",
                                       image_root=str(images))


def test_a_repaired_or_added_image_loses_its_old_skip_verdict(tmp_path):
    path, images = _two_image_jsonl(tmp_path)
    first = _open(path, tmp_path, images)
    assert first.skipped == {"corrupt_image": 1, "missing_image_file": 1}
    assert first.num_examples("train") == 1
    again = _open(path, tmp_path, images)  # nothing changed: the cached build is reused
    assert again.builder.data_dir == first.builder.data_dir

    (images / "bad.png").write_bytes(_png((200, 0, 0)))  # repaired in place (the json-lines file is untouched)
    repaired = _open(path, tmp_path, images)
    assert repaired.builder.data_dir != first.builder.data_dir
    assert repaired.skipped == {"missing_image_file": 1}
    assert repaired.num_examples("train") == 2

    (images / "later.png").write_bytes(_png((0, 0, 200)))  # the missing one arrives
    complete = _open(path, tmp_path, images)
    assert complete.skipped == {} and complete.num_examples("train") == 3


def test_the_key_does_not_depend_on_records_without_an_image_path(tmp_path):
    """Lines the builder skips (bad JSON, no image field) do not break the key; base64 sources stat nothing."""
    path, images = _two_image_jsonl(tmp_path)
    with open(path, "a") as f:
        f.write("{not json\n" + json.dumps({"caption": {"en": "no image"}}) + "\n" + json.dumps([1, 2]) + "\n")
    source = _open(path, tmp_path, images)
    assert source.skipped == {"corrupt_image": 1, "missing_image_file": 1, "invalid_json": 2, "missing_field": 1}
    os.utime(images / "good.png", ns=(1, 1))  # touched: a new key even with the same bytes
    assert _open(path, tmp_path, images).builder.data_dir != source.builder.data_dir


# ------------------------------------------------------------------------------------------------ fine-tuning data

def _xvnli_fixture(tmp_path, skip: bool):
    """An IGLUE folder with an XVNLI train and test file; images stored as <id>.jpg, <id>.png, <id>_2.jpg (an
    annotation names only the id), and one image absent."""
    from cclm_jax.run_config import load_config_file

    images = tmp_path / "flickr30k"
    images.mkdir(exist_ok=True)
    for name in ("100.jpg", "101.png", "102_2.jpg", "102_7.jpg"):
        Image.new("RGB", (8, 8), (1, 2, 3)).save(images / name, format="PNG" if name.endswith(".png") else "JPEG")
    rows = [{"Flikr30kID": image_id, "sentence1": "p", "sentence2": f"h {k}", "gold_label": "entailment",
             "pairID": f"p{k}"} for k, image_id in enumerate(("100", "101", "102", "103", 100))]
    for lang in ("en", "de"):
        path = tmp_path / "iglue" / "XVNLI" / "annotations" / lang
        path.mkdir(parents=True, exist_ok=True)
        (path / ("train.jsonl" if lang == "en" else "test.jsonl")).write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "iglue" / "XVNLI" / "annotations" / "en" / "test.jsonl").write_text(
        json.dumps(rows[0]) + "\n")
    config = load_config_file("configs/finetune/xvnli.py")
    config.data.update(iglue_root=str(tmp_path / "iglue"), image_root=str(images), languages=("en", "de"),
                       skip_missing_images=skip)
    return config, images


def test_missing_images_stop_with_the_expected_names_or_are_skipped_and_counted(tmp_path, monkeypatch):
    from cclm_jax.data.finetune_data import load_task_data

    monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[1])
    config, images = _xvnli_fixture(tmp_path, skip=False)
    with pytest.raises(FileNotFoundError, match=r"1 of 4 images referenced by .*train\.jsonl are missing \(looked "
                                                r"up as <image root>/<id>\.jpg, <id>\.jpeg, <id>\.png or "
                                                r"<id>_<suffix>\.jpg\), first:\n  .*/103\.jpg"):
        load_task_data(config)

    config, images = _xvnli_fixture(tmp_path, skip=True)
    data = load_task_data(config)
    assert [e.image_path for e in data.train] == [str(images / n) for n in ("100.jpg", "101.png", "102_2.jpg",
                                                                            "100.jpg")]
    assert data.skipped == {"train": 1, "test/de": 1}
    assert len(data.tests["en"]) == 1 and len(data.tests["de"]) == 4
    assert data.metrics() == {"data/test/de/skipped_missing_image": 1.0, "data/train/skipped_missing_image": 1.0}
