"""Generated multilingual demo data: the embedded default, no download.

Each image shows one shape (circle, square, triangle, star, cross) in one of six colours, of
two sizes, at one of five places, on one of three backgrounds (900 combinations, with small
random jitter of place and size and mild pixel noise). Its caption describes exactly these
attributes in English, German, French and Spanish, with gender and case agreement, e.g.
``a small red star on the left against a white background`` /
``ein kleiner roter Stern links vor weißem Hintergrund`` /
``une petite étoile rouge à gauche sur fond blanc`` /
``una estrella roja pequeña a la izquierda sobre fondo blanco``.
Parallel sentences are pairs of two different languages describing the same random attributes.

``prepare_demo(data_dir, spec)`` writes, once per spec, under ``data_dir/<spec hash>/``:
``train.jsonl`` and ``val.jsonl`` (CCLM layout: base64 PNG in ``binary``, ``caption`` =
``{lang: text}``), ``parallel.jsonl`` (``source_text``/``target_text``/``source_lang``/
``target_lang``) and ``spm.model`` (a BPE SentencePiece model trained on the cleaned
captions, XLM-R id layout), and returns their paths. The pipeline then builds them into TFDS datasets with the
ordinary json-lines builders. Everything is a deterministic function of the spec.
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
from typing import Dict

import numpy as np
from PIL import Image, ImageDraw

from cclm_jax.data.text import pre_caption
from cclm_jax.data.tokenizer import Tokenizer

LANGUAGES = ("en", "de", "fr", "es")
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220),
    "yellow": (235, 210, 20), "purple": (140, 40, 170), "black": (15, 15, 15),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (150, 150, 150), "brown": (130, 85, 45)}
PLACES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
          "middle": (0.5, 0.5)}
SIZES = {"small": 0.12, "large": 0.21}
_WORD_LIMIT = 64  # demo captions have at most 14 words

# Nouns with grammatical gender (m/f/n).
_NOUNS = {
    "de": {"circle": ("Kreis", "m"), "square": ("Quadrat", "n"), "triangle": ("Dreieck", "n"),
           "star": ("Stern", "m"), "cross": ("Kreuz", "n")},
    "fr": {"circle": ("cercle", "m"), "square": ("carré", "m"), "triangle": ("triangle", "m"),
           "star": ("étoile", "f"), "cross": ("croix", "f")},
    "es": {"circle": ("círculo", "m"), "square": ("cuadrado", "m"), "triangle": ("triángulo", "m"),
           "star": ("estrella", "f"), "cross": ("cruz", "f")},
}
# Adjectives: (masculine, feminine) forms; German stems take the mixed-declension endings.
_ADJECTIVES = {
    "de": {"red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb", "purple": "violett",
           "black": "schwarz", "small": "klein", "large": "groß"},
    "fr": {"red": ("rouge", "rouge"), "green": ("vert", "verte"), "blue": ("bleu", "bleue"),
           "yellow": ("jaune", "jaune"), "purple": ("violet", "violette"), "black": ("noir", "noire"),
           "small": ("petit", "petite"), "large": ("grand", "grande")},
    "es": {"red": ("rojo", "roja"), "green": ("verde", "verde"), "blue": ("azul", "azul"),
           "yellow": ("amarillo", "amarilla"), "purple": ("morado", "morada"),
           "black": ("negro", "negra"), "small": ("pequeño", "pequeña"), "large": ("grande", "grande")},
}
_PLACES = {
    "en": {"left": "on the left", "right": "on the right", "top": "at the top",
           "bottom": "at the bottom", "middle": "in the middle"},
    "de": {"left": "links", "right": "rechts", "top": "oben", "bottom": "unten", "middle": "in der Mitte"},
    "fr": {"left": "à gauche", "right": "à droite", "top": "en haut", "bottom": "en bas", "middle": "au centre"},
    "es": {"left": "a la izquierda", "right": "a la derecha", "top": "arriba", "bottom": "abajo",
           "middle": "en el centro"},
}
_BACKGROUNDS = {
    "de": {"white": "weißem", "gray": "grauem", "brown": "braunem"},
    "fr": {"white": "blanc", "gray": "gris", "brown": "marron"},
    "es": {"white": "blanco", "gray": "gris", "brown": "marrón"},
}


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
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    place: str
    background: str


def caption(scene: Scene, language: str) -> str:
    """The description of ``scene`` in ``language`` (one of ``LANGUAGES``)."""
    if language not in LANGUAGES:
        raise ValueError(f"demo captions exist for {LANGUAGES}, not {language!r}")
    if language == "en":
        article = "an" if scene.size[0] in "aeiou" else "a"
        return (f"{article} {scene.size} {scene.colour} {scene.shape} {_PLACES['en'][scene.place]} "
                f"against a {scene.background} background")
    noun, gender = _NOUNS[language][scene.shape]
    adjectives = _ADJECTIVES[language]
    place = _PLACES[language][scene.place]
    background = _BACKGROUNDS[language][scene.background]
    if language == "de":
        article = "eine" if gender == "f" else "ein"
        ending = {"m": "er", "f": "e", "n": "es"}[gender]
        size, colour = adjectives[scene.size] + ending, adjectives[scene.colour] + ending
        return f"{article} {size} {colour} {noun} {place} vor {background} Hintergrund"
    form = 1 if gender == "f" else 0
    size, colour = adjectives[scene.size][form], adjectives[scene.colour][form]
    if language == "fr":
        article = "une" if gender == "f" else "un"
        return f"{article} {size} {noun} {colour} {place} sur fond {background}"
    article = "una" if gender == "f" else "un"
    return f"{article} {noun} {colour} {size} {place} sobre fondo {background}"


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))], colour=list(COLOURS)[rng.integers(len(COLOURS))],
        size=list(SIZES)[rng.integers(len(SIZES))], place=list(PLACES)[rng.integers(len(PLACES))],
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))])


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
    raise ValueError(f"unknown polygon shape {shape!r}")


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (image_size, image_size, 3) picture of ``scene`` (drawn at 4x, then downscaled)."""
    big = image_size * 4
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(canvas)
    fx, fy = PLACES[scene.place]
    cx = (fx + rng.uniform(-0.04, 0.04)) * big
    cy = (fy + rng.uniform(-0.04, 0.04)) * big
    r = SIZES[scene.size] * rng.uniform(0.9, 1.1) * big
    colour = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif scene.shape == "square":
        side = 0.85 * r
        draw.rectangle([cx - side, cy - side, cx + side, cy + side], fill=colour)
    else:
        draw.polygon(_shape_points(scene.shape, cx, cy, r), fill=colour)
    pixels = np.asarray(canvas.resize((image_size, image_size), Image.Resampling.BOX), np.float32)
    pixels = pixels + rng.normal(0.0, 4.0, pixels.shape)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


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


def demo_paths(data_dir, spec: DemoSpec) -> Dict[str, str]:
    """Where ``prepare_demo`` puts the files of ``spec`` (keys train, val, parallel, spm)."""
    root = pathlib.Path(os.path.expanduser(str(data_dir))) / spec.key()
    return {"train": str(root / "train.jsonl"), "val": str(root / "val.jsonl"),
            "parallel": str(root / "parallel.jsonl"), "spm": str(root / "spm.model")}


def prepare_demo(data_dir, spec: DemoSpec = DemoSpec()) -> Dict[str, str]:
    """Generate the demo files once (atomically) and return ``demo_paths(data_dir, spec)``."""
    paths = demo_paths(data_dir, spec)
    root = pathlib.Path(paths["train"]).parent
    if (root / "spec.json").exists():
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{spec.key()}-", dir=root.parent))
    try:
        rng = np.random.default_rng(spec.seed)
        texts = _write_image_split(staging / "train.jsonl", spec.num_train, spec, rng)
        _write_image_split(staging / "val.jsonl", spec.num_val, spec, rng)
        _write_parallel(staging / "parallel.jsonl", spec.num_parallel, rng)
        Tokenizer.train(texts, staging / "spm", vocab_size=spec.vocab_size)
        (staging / "spec.json").write_text(json.dumps(dataclasses.asdict(spec), sort_keys=True))
        try:
            staging.rename(root)
        except OSError:
            if not (root / "spec.json").exists():  # not a concurrent writer's finished copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths
