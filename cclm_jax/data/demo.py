"""Generated multilingual demo data: the embedded default, no download.

Each image shows one shape (circle, square, triangle, star, cross, diamond, hexagon, ring) in one of nine
colours and three sizes (216 combinations) at a random place on a light background, with small random
jitter of size and mild pixel noise. Its caption describes exactly these attributes in English, German,
French and Spanish, with gender and case agreement, e.g.
``a small red star`` / ``ein kleiner roter Stern`` / ``une petite étoile rouge`` / ``una estrella roja pequeña``.
Parallel sentences are pairs of two different languages describing the same random attributes.

Why no background colours or position words (version 1 had both): the Swin "CLS" is the mean of the patch
tokens, so a varying background dominates the image feature and contrastive training first learns only the
background (ITC plateaus near log(batch / backgrounds)); Swin has no absolute position embedding and random
flips swap left and right, so position words cannot be grounded. Without them a 2-core CPU run reaches
image–text retrieval far above chance within minutes.

``prepare_demo(data_dir, spec)`` writes, once per spec, under ``data_dir/<spec hash>/``:
``train.jsonl`` and ``val.jsonl`` (CCLM layout: base64 PNG in ``binary``, ``caption`` =
``{lang: text}``), ``parallel.jsonl`` (``source_text``/``target_text``/``source_lang``/
``target_lang``) and ``spm.model`` (a BPE SentencePiece model trained on the cleaned
captions, XLM-R id layout), ``region_train.jsonl`` and ``region_val.jsonl`` (region grounding, the 4M
setting: ``num_train`` / ``num_val`` pictures of 2-3 different shapes at non-overlapping places, each shape an
elem with its pixel box and its caption in the four languages; ``cclm_jax.data.region`` records; from their own
random stream, so the other files are what they were before region files existed), and returns their paths.
The pipeline then builds them into TFDS datasets with the ordinary json-lines builders. Everything is a
deterministic function of the spec.
"""
import base64
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from cclm_jax.data.text import pre_caption
from cclm_jax.data.tokenizer import Tokenizer

GENERATOR_VERSION = 2  # part of every spec's hash: changing the pictures or captions must not reuse old files
LANGUAGES = ("en", "de", "fr", "es")
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220), "yellow": (235, 200, 20),
    "purple": (140, 40, 170), "black": (15, 15, 15), "orange": (245, 130, 20), "pink": (240, 120, 190),
    "brown": (120, 70, 30),
}
BACKGROUND = (240, 240, 240)
SIZES = {"small": 0.13, "medium": 0.2, "large": 0.28}  # radius / image side
REGION_SCALE = 0.7  # shapes of the region pictures (2-3 per picture) are this much smaller
REGION_SHAPES = (2, 3)  # shapes per region picture (uniform)
_AND = {"en": "and", "de": "und", "fr": "et", "es": "y"}
_WORD_LIMIT = 64  # demo captions have at most 5 words

# Nouns with grammatical gender (m/f/n).
_NOUNS = {
    "de": {"circle": ("Kreis", "m"), "square": ("Quadrat", "n"), "triangle": ("Dreieck", "n"),
           "star": ("Stern", "m"), "cross": ("Kreuz", "n"), "diamond": ("Raute", "f"),
           "hexagon": ("Sechseck", "n"), "ring": ("Ring", "m")},
    "fr": {"circle": ("cercle", "m"), "square": ("carré", "m"), "triangle": ("triangle", "m"),
           "star": ("étoile", "f"), "cross": ("croix", "f"), "diamond": ("losange", "m"),
           "hexagon": ("hexagone", "m"), "ring": ("anneau", "m")},
    "es": {"circle": ("círculo", "m"), "square": ("cuadrado", "m"), "triangle": ("triángulo", "m"),
           "star": ("estrella", "f"), "cross": ("cruz", "f"), "diamond": ("rombo", "m"),
           "hexagon": ("hexágono", "m"), "ring": ("anillo", "m")},
}
# Adjectives: German stems take the mixed-declension endings; French and Spanish give (masculine, feminine).
_ADJECTIVES = {
    "de": {"red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb", "purple": "violett",
           "black": "schwarz", "orange": "orangefarben", "pink": "rosafarben", "brown": "braun",
           "small": "klein", "medium": "mittelgroß", "large": "groß"},
    "fr": {"red": ("rouge", "rouge"), "green": ("vert", "verte"), "blue": ("bleu", "bleue"),
           "yellow": ("jaune", "jaune"), "purple": ("violet", "violette"), "black": ("noir", "noire"),
           "orange": ("orange", "orange"), "pink": ("rose", "rose"), "brown": ("marron", "marron"),
           "small": ("petit", "petite"), "medium": ("moyen", "moyenne"), "large": ("grand", "grande")},
    "es": {"red": ("rojo", "roja"), "green": ("verde", "verde"), "blue": ("azul", "azul"),
           "yellow": ("amarillo", "amarilla"), "purple": ("morado", "morada"), "black": ("negro", "negra"),
           "orange": ("naranja", "naranja"), "pink": ("rosa", "rosa"), "brown": ("marrón", "marrón"),
           "small": ("pequeño", "pequeña"), "medium": ("mediano", "mediana"), "large": ("grande", "grande")},
}
_FRENCH_SIZE_AFTER_NOUN = {"medium"}  # "une étoile rouge moyenne", but "une petite étoile rouge"


@dataclasses.dataclass(frozen=True)
class DemoSpec:
    """What to generate. ``image_size`` in pixels (square); counts in images / sentence pairs."""

    image_size: int = 64
    num_train: int = 3000
    num_val: int = 150
    num_parallel: int = 20000
    vocab_size: int = 1000
    seed: int = 0

    def key(self) -> str:
        fields = {**dataclasses.asdict(self), "generator_version": GENERATOR_VERSION}
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str


def caption(scene: Scene, language: str) -> str:
    """The description of ``scene`` in ``language`` (one of ``LANGUAGES``)."""
    if language not in LANGUAGES:
        raise ValueError(f"demo captions exist for {LANGUAGES}, not {language!r}")
    if language == "en":
        return f"a {scene.size} {scene.colour} {scene.shape}"
    noun, gender = _NOUNS[language][scene.shape]
    adjectives = _ADJECTIVES[language]
    if language == "de":
        article = "eine" if gender == "f" else "ein"
        ending = {"m": "er", "f": "e", "n": "es"}[gender]
        return f"{article} {adjectives[scene.size] + ending} {adjectives[scene.colour] + ending} {noun}"
    form = 1 if gender == "f" else 0
    size, colour = adjectives[scene.size][form], adjectives[scene.colour][form]
    if language == "fr":
        article = "une" if gender == "f" else "un"
        if scene.size in _FRENCH_SIZE_AFTER_NOUN:
            return f"{article} {noun} {colour} {size}"
        return f"{article} {size} {noun} {colour}"
    article = "una" if gender == "f" else "un"
    return f"{article} {noun} {colour} {size}"


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(shape=SHAPES[rng.integers(len(SHAPES))], colour=list(COLOURS)[rng.integers(len(COLOURS))],
                 size=list(SIZES)[rng.integers(len(SIZES))])


def _shape_points(shape: str, cx: float, cy: float, r: float):
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    if shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return list(zip(cx + radii * np.cos(angles), cy - radii * np.sin(angles)))
    if shape == "cross":
        a, b = r, 0.35 * r
        offsets = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b),
                   (-a, b), (-a, -b), (-b, -b)]
        return [(cx + dx, cy + dy) for dx, dy in offsets]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "hexagon":
        angles = np.arange(6) * np.pi / 3
        return list(zip(cx + r * np.cos(angles), cy - r * np.sin(angles)))
    raise ValueError(f"unknown polygon shape {shape!r}")


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (image_size, image_size, 3) picture of ``scene`` (drawn at 4x, then downscaled). The shape's
    centre is uniform over the places where it fits inside the picture."""
    big = image_size * 4
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    r = SIZES[scene.size] * rng.uniform(0.92, 1.08) * big
    cx, cy = rng.uniform(1.02 * r, big - 1.02 * r, size=2)
    _draw_shape(draw, scene, cx, cy, r)
    return _downscale_with_noise(canvas, image_size, rng)


def _draw_shape(draw: ImageDraw.ImageDraw, scene: Scene, cx: float, cy: float, r: float) -> None:
    """Draw ``scene``'s shape centred at (cx, cy) with radius ``r`` (canvas pixels)."""
    colour = COLOURS[scene.colour]
    if scene.shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        if scene.shape == "ring":
            hole = 0.55 * r
            draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=BACKGROUND)
    elif scene.shape == "square":
        side = 0.85 * r
        draw.rectangle([cx - side, cy - side, cx + side, cy + side], fill=colour)
    else:
        draw.polygon(_shape_points(scene.shape, cx, cy, r), fill=colour)


def _shape_extent(shape: str, r: float) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) offsets of the drawn shape from its centre, canvas pixels."""
    if shape in ("circle", "ring"):
        return -r, -r, r, r
    if shape == "square":
        return -0.85 * r, -0.85 * r, 0.85 * r, 0.85 * r
    points = np.array(_shape_points(shape, 0.0, 0.0, r))
    return (*points.min(axis=0), *points.max(axis=0))


def _downscale_with_noise(canvas: Image.Image, image_size: int, rng: np.random.Generator) -> np.ndarray:
    pixels = np.asarray(canvas.resize((image_size, image_size), Image.Resampling.BOX), np.float32)
    pixels = pixels + rng.normal(0.0, 4.0, pixels.shape)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def render_regions(scenes: list[Scene], image_size: int, rng: np.random.Generator) -> tuple[np.ndarray, list] | None:
    """A picture with every scene of ``scenes`` at a random place, no two bounding boxes within 2 pixels of each
    other, shapes ``REGION_SCALE`` times their single-shape size. Returns (uint8 (image_size, image_size, 3),
    [[x, y, w, h], ...] integer boxes in pixels enclosing each drawn shape), or None when 50 tries per shape
    found no free place."""
    big = image_size * 4
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    boxes: list[list[int]] = []
    placed = []
    for scene in scenes:
        r = SIZES[scene.size] * REGION_SCALE * rng.uniform(0.92, 1.08) * big
        left, top, right, bottom = _shape_extent(scene.shape, r)
        for _ in range(50):
            cx, cy = rng.uniform(1.02 * r, big - 1.02 * r, size=2)
            x0, y0 = int(np.floor((cx + left) / 4)), int(np.floor((cy + top) / 4))
            x1, y1 = int(np.ceil((cx + right) / 4)), int(np.ceil((cy + bottom) / 4))
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, image_size), min(y1, image_size)
            if all(x0 >= b[2] + 2 or x1 + 2 <= b[0] or y0 >= b[3] + 2 or y1 + 2 <= b[1] for b in placed):
                break
        else:
            return None
        placed.append((x0, y0, x1, y1))
        boxes.append([x0, y0, x1 - x0, y1 - y0])
        _draw_shape(draw, scene, cx, cy, r)
    return _downscale_with_noise(canvas, image_size, rng), boxes


def _png_base64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _write_image_split(path: pathlib.Path, count: int, spec: DemoSpec, rng: np.random.Generator):
    texts = []
    with path.open("w", encoding="utf-8") as f:
        for _ in range(count):
            scene = random_scene(rng)
            captions = {lang: caption(scene, lang) for lang in LANGUAGES}
            texts.extend(pre_caption(text, _WORD_LIMIT) for text in captions.values())
            record = {"binary": _png_base64(render(scene, spec.image_size, rng)), "caption": captions}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return texts


def _write_parallel(path: pathlib.Path, count: int, rng: np.random.Generator):
    with path.open("w", encoding="utf-8") as f:
        for _ in range(count):
            scene = random_scene(rng)
            first, second = rng.choice(len(LANGUAGES), size=2, replace=False)
            lang_1, lang_2 = LANGUAGES[first], LANGUAGES[second]
            record = {"source_text": caption(scene, lang_1), "target_text": caption(scene, lang_2),
                      "source_lang": lang_1, "target_lang": lang_2}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def region_record(scenes: list[Scene], image_size: int, rng: np.random.Generator) -> dict | None:
    """One region json-lines record (``cclm_jax.data.region``) of ``scenes`` drawn together, or None when they
    do not fit: ``binary`` base64 PNG, ``caption`` = {lang: the shapes' captions joined by "and"}, ``elems`` =
    [{"bb": [x, y, w, h] pixels, "caption": {lang: text}}] in the order of ``scenes``."""
    drawn = render_regions(scenes, image_size, rng)
    if drawn is None:
        return None
    pixels, boxes = drawn
    whole = {lang: f" {_AND[lang]} ".join(caption(s, lang) for s in scenes) for lang in LANGUAGES}
    elems = [{"bb": box, "caption": {lang: caption(s, lang) for lang in LANGUAGES}} for s, box in zip(scenes, boxes)]
    return {"binary": _png_base64(pixels), "caption": whole, "elems": elems}


def _write_region_split(path: pathlib.Path, count: int, spec: DemoSpec, rng: np.random.Generator) -> None:
    """``count`` pictures of 2-3 different scenes each (distinct captions, so each caption names one shape)."""
    with path.open("w", encoding="utf-8") as f:
        written = 0
        while written < count:
            n = REGION_SHAPES[rng.integers(len(REGION_SHAPES))]
            scenes = []
            while len(scenes) < n:
                scene = random_scene(rng)
                if scene not in scenes:
                    scenes.append(scene)
            record = region_record(scenes, spec.image_size, rng)
            if record is not None:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1


def _write_regions(root: pathlib.Path, spec: DemoSpec) -> None:
    """``region_train.jsonl`` (``num_train`` pictures) and ``region_val.jsonl`` (``num_val``) from their own
    random stream (seeded by (seed, 17)), so the other files stay what they were; atomic per file."""
    rng = np.random.default_rng([spec.seed, 17])
    for name, count in (("region_train", spec.num_train), ("region_val", spec.num_val)):
        staging = root / f".{name}.{os.getpid()}.tmp"
        _write_region_split(staging, count, spec, rng)
        os.replace(staging, root / f"{name}.jsonl")


def demo_paths(data_dir, spec: DemoSpec) -> dict[str, str]:
    """Where ``prepare_demo`` puts the files of ``spec`` (keys train, val, parallel, spm, region_train,
    region_val)."""
    root = pathlib.Path(os.path.expanduser(str(data_dir))) / spec.key()
    return {"train": str(root / "train.jsonl"), "val": str(root / "val.jsonl"),
            "parallel": str(root / "parallel.jsonl"), "spm": str(root / "spm.model"),
            "region_train": str(root / "region_train.jsonl"), "region_val": str(root / "region_val.jsonl")}


def prepare_demo(data_dir, spec: DemoSpec | None = None) -> dict[str, str]:
    """Generate the demo files of ``spec`` (default ``DemoSpec()``) once (atomically) and return
    ``demo_paths(data_dir, spec)``; a directory generated before region files existed gets them added."""
    spec = spec or DemoSpec()
    paths = demo_paths(data_dir, spec)
    root = pathlib.Path(paths["train"]).parent
    if (root / "spec.json").exists():
        if not os.path.exists(paths["region_val"]):  # generated before the region files existed
            _write_regions(root, spec)
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{spec.key()}-", dir=root.parent))
    try:
        rng = np.random.default_rng(spec.seed)
        texts = _write_image_split(staging / "train.jsonl", spec.num_train, spec, rng)
        _write_image_split(staging / "val.jsonl", spec.num_val, spec, rng)
        _write_parallel(staging / "parallel.jsonl", spec.num_parallel, rng)
        Tokenizer.train(texts, staging / "spm", vocab_size=spec.vocab_size)
        _write_regions(staging, spec)
        (staging / "spec.json").write_text(json.dumps(dataclasses.asdict(spec), sort_keys=True))
        try:
            staging.rename(root)
        except OSError:
            if not (root / "spec.json").exists():  # not a concurrent writer's finished copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths
