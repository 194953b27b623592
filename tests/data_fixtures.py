"""Small generated inputs for the data preparation tests: img2dataset webdataset shards (with broken
samples), CC3M-layout translation TSVs and WikiMatrix TSVs."""
import gzip
import io
import json
import pathlib
import tarfile

from PIL import Image


def jpeg(colour, size=(20, 14)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(root: pathlib.Path, shards: int = 2, per_shard: int = 6) -> dict:
    """img2dataset-style tar shards ``root/0000N.tar``; sample i of shard s has key ``sssssiiii`` and url
    ``http://img/<key>.jpg``. Broken samples, by design: shard 0 sample 1 has a corrupt image, sample 2 no
    caption member, sample 3 no image member; shard 1 sample 0 an invalid json member.

    Returns {"paths", "images": {key: jpeg bytes of the good samples}, "captions": {key: caption},
    "skips": expected {reason: count}}."""
    root.mkdir(parents=True, exist_ok=True)
    paths, images, captions = [], {}, {}
    for s in range(shards):
        path = root / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                image = jpeg((40 * i % 256, 90 * s % 256, 200))
                caption = f"a photo number {i} of shard {s}"
                meta = json.dumps({"url": f"http://img/{key}.jpg", "key": key, "status": "success"}).encode()
                broken = (s, i)
                if broken != (0, 3):
                    _add(tar, f"{key}.jpg", b"\xff\xd8\xff\xe0 not a jpeg" if broken == (0, 1) else image)
                if broken != (0, 2):
                    _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", b"{not json" if broken == (1, 0) else meta)
                if broken not in ((0, 1), (0, 2), (0, 3), (1, 0)):
                    images[key], captions[key] = image, caption
        paths.append(str(path))
    skips = {"corrupt_image": 1, "no_caption": 1, "missing_image": 1, "invalid_json": 1}
    return {"paths": paths, "images": images, "captions": captions, "skips": skips}


def write_translations(path: pathlib.Path, keys, language: str) -> str:
    """A CC3M-layout ``caption<TAB>url`` TSV (gzip) translating the samples ``keys``."""
    lines = [f"{language} caption of {key}\thttp://img/{key}.jpg" for key in keys]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def write_wikimatrix(path: pathlib.Path, rows) -> str:
    """A WikiMatrix TSV (gzip when the name ends in .gz) of ``(score, sentence_1, sentence_2)`` rows
    (a row given as a str is written as that raw line)."""
    lines = [row if isinstance(row, str) else f"{row[0]}\t{row[1]}\t{row[2]}" for row in rows]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return str(path)
