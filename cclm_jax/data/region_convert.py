"""COCO and Visual Genome annotations -> region json-lines records (``cclm_jax/data/region.py``).

    python -m cclm_jax.data.region_convert coco --annotations instances_train2017.json --out coco_object.jsonl
    python -m cclm_jax.data.region_convert vg_objects --annotations attributes.json --out vg_object.jsonl
    python -m cclm_jax.data.region_convert vg_regions --annotations region_descriptions.json --out vg_region.jsonl

Records name their image by path (``"binary"``: COCO's ``file_name``, VG's ``--image_pattern``, default
``{image_id}.jpg``); train with ``--config.data.region.image_root=`` the image folder. Captions are English:
COCO objects are captioned with their category name (crowd annotations are left out), VG objects with their first
name and their attributes (``attributes.json``; ``objects.json`` has none), VG regions with their phrase. For
CCLM's multilingual version use the translated "object and region annotations" the CCLM README links, whose
records are already in this format (``{lang: text}`` captions). Boxes are copied as [x, y, w, h]; the data
builder drops (and counts) boxes outside their image or of zero area. Images without any box are not written.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterator


def coco_records(instances: dict) -> Iterator[dict]:
    """Records of a COCO ``instances_*.json`` (objects captioned with their category name), by image id."""
    names = {c["id"]: c["name"] for c in instances.get("categories", [])}
    elems: dict[int, list] = {}
    for ann in instances.get("annotations", []):
        if ann.get("iscrowd", 0) or ann.get("category_id") not in names:
            continue
        elems.setdefault(ann["image_id"], []).append({"bb": list(ann["bbox"]),
                                                      "caption": names[ann["category_id"]]})
    for image in sorted(instances.get("images", []), key=lambda i: i["id"]):
        if image["id"] in elems:
            yield {"binary": image["file_name"], "elems": elems[image["id"]]}


def _vg_box(item: dict) -> list:
    return [item["x"], item["y"], item.get("w", item.get("width")), item.get("h", item.get("height"))]


def vg_object_records(images: list, image_pattern: str) -> Iterator[dict]:
    """Records of Visual Genome ``objects.json`` / ``attributes.json`` (first name; attributes when present)."""
    for image in images:
        elems = []
        for obj in image.get("objects", image.get("attributes", [])):
            names = [n.strip() for n in obj.get("names", []) if n.strip()]
            if not names:
                continue
            elem = {"bb": _vg_box(obj), "caption": names[0]}
            attributes = [a.strip() for a in obj.get("attributes") or [] if a.strip()]
            if attributes:
                elem["attributes"] = attributes
            elems.append(elem)
        if elems:
            yield {"binary": image_pattern.format(image_id=image["image_id"]), "elems": elems}


def vg_region_records(images: list, image_pattern: str) -> Iterator[dict]:
    """Records of Visual Genome ``region_descriptions.json`` (each region captioned with its phrase)."""
    for image in images:
        elems = [{"bb": _vg_box(r), "caption": r["phrase"].strip()} for r in image.get("regions", [])
                 if r.get("phrase", "").strip()]
        if elems:
            yield {"binary": image_pattern.format(image_id=image.get("id", image.get("image_id"))), "elems": elems}


def convert(kind: str, annotations: str, out: str, image_pattern: str = "{image_id}.jpg") -> int:
    """Write the records of an annotation file as json-lines; returns how many."""
    with open(annotations) as f:
        data = json.load(f)
    if kind == "coco":
        records = coco_records(data)
    elif kind == "vg_objects":
        records = vg_object_records(data, image_pattern)
    elif kind == "vg_regions":
        records = vg_region_records(data, image_pattern)
    else:
        raise ValueError(f"kind must be coco, vg_objects or vg_regions, got {kind!r}")
    count = 0
    with open(out, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=("coco", "vg_objects", "vg_regions"))
    parser.add_argument("--annotations", required=True, help="COCO instances json or Visual Genome json")
    parser.add_argument("--out", required=True, help="region json-lines to write")
    parser.add_argument("--image_pattern", default="{image_id}.jpg", help="Visual Genome image path")
    args = parser.parse_args(argv)
    try:
        count = convert(args.kind, args.annotations, args.out, args.image_pattern)
    except (OSError, ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise SystemExit(f"error: {args.annotations}: {type(e).__name__}: {e}") from None
    print(f"wrote {count} records to {args.out}")


if __name__ == "__main__":
    main()
