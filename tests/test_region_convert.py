"""COCO / Visual Genome annotations -> region records, on hand-made tiny annotation files, read back by the
region data builder."""
import json

import numpy as np
import pytest

from cclm_jax.data import image as image_lib
from cclm_jax.data import region as R
from cclm_jax.data import region_convert
from cclm_jax.data.sources import SkipCounter

COCO = {
    "images": [{"id": 7, "file_name": "b.png", "width": 40, "height": 30},
               {"id": 3, "file_name": "a.png", "width": 50, "height": 40},
               {"id": 9, "file_name": "none.png", "width": 10, "height": 10}],
    "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "traffic light"}],
    "annotations": [
        {"image_id": 3, "bbox": [1.5, 2.0, 20.0, 10.7], "category_id": 1, "iscrowd": 0},
        {"image_id": 3, "bbox": [0, 0, 50, 40], "category_id": 2, "iscrowd": 1},  # crowd: left out
        {"image_id": 7, "bbox": [30, 20, 20, 5], "category_id": 2, "iscrowd": 0},  # outside the 40x30 image
        {"image_id": 7, "bbox": [5, 5, 10, 10], "category_id": 5, "iscrowd": 0},  # unknown category
        {"image_id": 7, "bbox": [5, 5, 10, 10], "category_id": 2},
    ],
}


def test_coco_instances_to_records_and_back(tmp_path):
    (tmp_path / "coco.json").write_text(json.dumps(COCO))
    out = tmp_path / "coco_object.jsonl"
    region_convert.main(["coco", "--annotations", str(tmp_path / "coco.json"), "--out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == [
        {"binary": "a.png", "elems": [{"bb": [1.5, 2.0, 20.0, 10.7], "caption": "dog"}]},
        {"binary": "b.png", "elems": [{"bb": [30, 20, 20, 5], "caption": "traffic light"},
                                      {"bb": [5, 5, 10, 10], "caption": "traffic light"}]},
    ]
    for name, (w, h) in {"a.png": (50, 40), "b.png": (40, 30)}.items():
        (tmp_path / name).write_bytes(image_lib.encode_png(np.zeros((h, w, 3), np.uint8)))
    counter = SkipCounter()
    examples = [e for _, e in R.region_examples([str(out)], image_field="binary", image_root=str(tmp_path),
                                                counter=counter)]
    assert dict(counter.counts) == {"invalid_box": 1}
    np.testing.assert_array_equal(examples[0]["boxes"], [1, 2, 20, 10])
    np.testing.assert_array_equal(examples[1]["boxes"], [5, 5, 10, 10])


def test_visual_genome_objects_and_regions(tmp_path):
    objects = [{"image_id": 1, "attributes": [
        {"x": 1, "y": 2, "w": 3, "h": 4, "names": ["shirt "], "attributes": ["white", " "]},
        {"x": 0, "y": 0, "w": 5, "h": 5, "names": ["tree"]}, {"x": 0, "y": 0, "w": 5, "h": 5, "names": []}]},
        {"image_id": 2, "attributes": []}]
    regions = [{"id": 1, "regions": [{"x": 4, "y": 5, "width": 6, "height": 7, "phrase": " a man on a bike"},
                                     {"x": 0, "y": 0, "width": 1, "height": 1, "phrase": ""}]}]
    assert list(region_convert.vg_object_records(objects, "VG_100K/{image_id}.jpg")) == [
        {"binary": "VG_100K/1.jpg", "elems": [{"bb": [1, 2, 3, 4], "caption": "shirt", "attributes": ["white"]},
                                              {"bb": [0, 0, 5, 5], "caption": "tree"}]}]
    assert list(region_convert.vg_region_records(regions, "{image_id}.jpg")) == [
        {"binary": "1.jpg", "elems": [{"bb": [4, 5, 6, 7], "caption": "a man on a bike"}]}]


def test_unreadable_annotations_are_one_error_line(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"^error: .*bad.json"):
        region_convert.main(["coco", "--annotations", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")])
