"""Retrieval with a trained model, for its users: embed images and texts, score pairs, index a folder and search it.

    from cclm_jax import inference
    m = inference.load("runs/small_real")                  # a run directory (pre-training or retrieval
                                                           # fine-tuning), or an official / exported checkpoint
    img = inference.embed_images(m, ["a.jpg", "b.jpg"])    # (2, E) float32, L2-normalised
    txt = inference.embed_texts(m, ["ein Hund", "a cat"])  # (2, E)
    s = inference.score(m, ["a.jpg", "b.jpg"], ["ein Hund", "a cat"], rerank=True)   # (2 images, 2 texts)

`score` is retrieval as the evaluation does it (`evaluation.retrieval`): ITC similarities (cosine of the
projected features, in [-1, 1]) for every pair; with `rerank=True` the top `k` texts of every image are re-scored
by the fusion encoder's ITM "match" logit, and every other pair gets -100 (ranks, not probabilities).

Index and search (`cclm-jax index` / `cclm-jax search`):

- `build_index(model, image_dir, out, texts=None, batch_size=32)`: the features of every image under
  `image_dir` (recursively; .jpg .jpeg .png .bmp .gif .webp) and of the lines of `texts`, in `out/`:
  `index.json` (the model source, image size, embedding width) and one `part-NNNNN.npz` per batch (`paths`,
  `features` (n, E) float16). A rerun skips the files already indexed (resumable; a part is written atomically);
  progress goes to stderr.
- `search(index, query, top=10, image=False, model=None)`: text -> images (the query is a sentence), or with
  `image=True` image -> texts (the query is an image file; the index needs `texts`). Returns [(path or text,
  score)] best first; ITC scores, re-ranked by ITM on the top `top` when a model is given (`rerank`).
- `write_html(path, query, results, image=False)`: a self-contained page (thumbnails inlined as base64 PNG,
  scores, no external files).

Images are decoded and resized (bicubic, squashed to the model's square size) as the evaluation pipeline does
(`data.image.eval_image`), normalised on device; texts are cleaned (`pre_caption`) and tokenised with the run's
tokenizer (`data.tokenizer`, or `tokenizer=` for a checkpoint).
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os
import pathlib
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cclm_jax.data.finetune_input import encode_texts
from cclm_jax.data.normalize import normalize
from cclm_jax.data.tokenizer import Tokenizer
from cclm_jax.evaluation.retrieval import RetrievalEvaluator
from cclm_jax.models import build_model

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
INDEX_FILE = "index.json"
THUMBNAIL_PX = 160


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded retrieval model: `module` (CCLM), `params`, `config` (model section), `tokenizer`, `source`."""

    module: object
    params: dict
    config: ml_collections.ConfigDict
    tokenizer: Tokenizer
    source: str
    max_tokens: int = 40

    @property
    def image_res(self) -> int:
        return int(self.config.vision.image_res)


def load(source: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None, step: int | None = None,
         text_num_heads: int | None = None, max_tokens: int | None = None) -> Model:
    """A model from a run directory (its checkpoint `step`, default the latest; the run's tokenizer unless
    `tokenizer` is given) or an official / exported checkpoint file (`tokenizer` required). `max_tokens`: text
    length (default the run's `data.max_tokens`, else 40), at most the model's positions.

    Raises FileNotFoundError / ValueError (one line naming the path) for a missing source, a run of a task
    without image-text matching, or a missing tokenizer."""
    source = os.path.expanduser(os.fspath(source))
    if os.path.isdir(source):
        from cclm_jax.interop.workdir import read_run_config, restore_params

        run = read_run_config(source)
        task = run.get("task")
        if task not in (None, "retrieval"):
            raise ValueError(f"{source}: a {task!r} fine-tuning run has no image-text retrieval head; use a "
                             "pre-training or retrieval run")
        _, params = restore_params(source, step)
        config = run.model
        tokenizer = tokenizer or run.get("data", {}).get("tokenizer") or ""
        max_tokens = max_tokens or run.get("data", {}).get("max_tokens")
    elif os.path.isfile(source):
        from cclm_jax.interop import official

        config, params = official.load(source, text_num_heads=text_num_heads)
    else:
        raise FileNotFoundError(f"{source}: neither a run directory nor a checkpoint file")
    if not tokenizer:
        raise ValueError(f"{source}: no tokenizer recorded; pass the SentencePiece model (--tokenizer)")
    if tokenizer == "demo":
        raise ValueError(f"{source}: the run used the generated demo tokenizer; pass its .model file (--tokenizer)")
    tok = Tokenizer(os.path.expanduser(os.fspath(tokenizer)), key="tokenizer")
    if tok.vocab_size != config.text.vocab_size:
        raise ValueError(f"tokenizer {str(tok.model_path)!r} has {tok.vocab_size} ids, the model's vocabulary "
                         f"{config.text.vocab_size}")
    max_tokens = min(int(max_tokens or 40), int(config.text.max_position_embeddings))
    return Model(build_model(config), params, config, tok, source, max_tokens)


# --------------------------------------------------------------------------------------------------- inputs

def read_images(images: Sequence, size: int) -> np.ndarray:
    """Image files (paths), encoded bytes or uint8 (H, W, 3) arrays -> uint8 (N, size, size, 3), resized as in
    evaluation. A file that cannot be decoded raises ValueError naming it."""
    from cclm_jax.data.image import eval_image

    out = []
    for item in images:
        if isinstance(item, np.ndarray):
            data, name = _png(item), "array"
        elif isinstance(item, bytes):
            data, name = item, "bytes"
        else:
            name = os.fspath(item)
            data = pathlib.Path(name).read_bytes()
        try:
            out.append(np.asarray(eval_image(data, size)).astype(np.uint8))
        except Exception as e:  # tf raises InvalidArgumentError for undecodable files
            raise ValueError(f"{name}: not a decodable image ({type(e).__name__})") from e
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _texts(model: Model, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_texts(model.tokenizer, list(texts), max_tokens=model.max_tokens, max_words=model.max_tokens)


# ---------------------------------------------------------------------------------------------- embeddings

def _batched(fn, arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """fn over row blocks of `batch_size` (the last padded by repeating its last row, so one shape compiles)."""
    n = arrays[0].shape[0]
    outs = []
    for s in range(0, n, batch_size):
        block = [a[s:s + batch_size] for a in arrays]
        real = block[0].shape[0]
        if real < batch_size:
            block = [np.concatenate([b, np.repeat(b[-1:], batch_size - real, axis=0)]) for b in block]
        outs.append(np.asarray(fn(*block))[:real])
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def embed_images(model: Model, images: Sequence, batch_size: int = 32) -> np.ndarray:
    """(N, embed_dim) float32 L2-normalised image features (`read_images` inputs)."""
    pixels = read_images(images, model.image_res)
    return _batched(_image_fn(model), [pixels], min(batch_size, max(1, len(pixels))))


def embed_texts(model: Model, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """(N, embed_dim) float32 L2-normalised text features."""
    ids, atts = _texts(model, texts)
    return _batched(_text_fn(model), [ids, atts], min(batch_size, max(1, len(texts))))


def _image_fn(model: Model):
    m = model.module

    @jax.jit
    def fn(params, pixels):
        embeds, _ = m.apply({"params": params}, normalize(pixels), method=m.encode_image)
        return m.apply({"params": params}, embeds, method=m.image_features)

    return lambda pixels: fn(model.params, pixels)


def _text_fn(model: Model):
    m = model.module

    @jax.jit
    def fn(params, ids, atts):
        embeds = m.apply({"params": params}, ids, atts, method=m.encode_text)
        return m.apply({"params": params}, embeds, method=m.text_features)

    return lambda ids, atts: fn(model.params, jnp.asarray(ids), jnp.asarray(atts))


def score(model: Model, images: Sequence, texts: Sequence[str], rerank: bool = True, k: int = 16,
          batch_size: int = 32) -> np.ndarray:
    """(N_images, N_texts) scores: ITC similarities, or with `rerank` ITM match logits on each image's top `k`
    texts (and each text's top `k` images; -100 elsewhere, module docstring)."""
    pixels = read_images(images, model.image_res)
    ids, atts = _texts(model, texts)
    evaluator = RetrievalEvaluator(model.module, batch_size=batch_size)
    scores = evaluator.image_text_scores(model.params, pixels, ids, atts, k_test=k, rerank=rerank)
    return scores.score_i2t


# ----------------------------------------------------------------------------------------- index and search

def image_files(image_dir: str | os.PathLike) -> list[str]:
    """Every image file under `image_dir` (recursive, sorted); FileNotFoundError when it holds none."""
    root = pathlib.Path(os.path.expanduser(os.fspath(image_dir)))
    if not root.is_dir():
        raise FileNotFoundError(f"--images {str(root)!r} is not a directory")
    files = sorted(str(p.resolve()) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"--images {str(root)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _progress(done: int, total: int, what: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r{what} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _parts(out: pathlib.Path) -> list[pathlib.Path]:
    return sorted(out.glob("part-*.npz"))


def build_index(model: Model, image_dir: str | os.PathLike, out: str | os.PathLike,
                texts: str | os.PathLike | None = None, batch_size: int = 32) -> dict:
    """Index the images under `image_dir` (and the lines of the text file `texts`) into `out` (module
    docstring); returns {'images': n, 'texts': n, 'new': embedded now}. An index of another model is refused."""
    out = pathlib.Path(os.path.expanduser(os.fspath(out)))
    files = image_files(image_dir)
    meta = {"version": 1, "model": os.path.abspath(model.source), "image_res": model.image_res,
            "embed_dim": int(model.config.embed_dim), "tokenizer": str(model.tokenizer.model_path)}
    if (out / INDEX_FILE).is_file():
        old = json.loads((out / INDEX_FILE).read_text())
        if {k: old.get(k) for k in meta} != meta:
            raise ValueError(f"{out / INDEX_FILE}: an index of another model ({old.get('model')!r}); use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    done = {str(p) for part in _parts(out) for p in np.load(part)["paths"]}
    todo = [f for f in files if f not in done]
    image_fn = _image_fn(model)
    part_id = len(_parts(out))
    _progress(len(files) - len(todo), len(files), "indexing images")
    for s in range(0, len(todo), batch_size):
        chunk = todo[s:s + batch_size]
        feats = _batched(image_fn, [read_images(chunk, model.image_res)], batch_size)
        _save_part(out, part_id, paths=np.array(chunk), features=feats.astype(np.float16))
        part_id += 1
        _progress(len(files) - len(todo) + s + len(chunk), len(files), "indexing images")
    n_texts = 0
    if texts is not None:
        lines = [t.strip() for t in pathlib.Path(os.path.expanduser(os.fspath(texts))).read_text().splitlines()]
        lines = [t for t in lines if t]
        feats = embed_texts(model, lines) if lines else np.zeros((0, meta["embed_dim"]), np.float32)
        np.savez(out / "texts.npz", texts=np.array(lines), features=feats.astype(np.float16))
        n_texts = len(lines)
    return {"images": len(files), "texts": n_texts, "new": len(todo)}


def _save_part(out: pathlib.Path, part_id: int, **arrays) -> None:
    tmp = out / f".part-{part_id:05d}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, out / f"part-{part_id:05d}.npz")


def read_index(index: str | os.PathLike) -> tuple[dict, list[str], np.ndarray]:
    """(index.json, image paths, (N, E) float32 features) of an index directory."""
    root = pathlib.Path(os.path.expanduser(os.fspath(index)))
    if not (root / INDEX_FILE).is_file():
        raise FileNotFoundError(f"--index {str(root)!r} is not an index (no {INDEX_FILE}; build it with "
                                "`cclm-jax index`)")
    meta = json.loads((root / INDEX_FILE).read_text())
    parts = [np.load(p) for p in _parts(root)]
    paths = [str(p) for part in parts for p in part["paths"]]
    feats = (np.concatenate([part["features"] for part in parts]).astype(np.float32) if parts
             else np.zeros((0, meta["embed_dim"]), np.float32))
    return meta, paths, feats


def search(index: str | os.PathLike, query: str, top: int = 10, image: bool = False,
           model: Model | None = None, rerank: bool = True) -> list[tuple[str, float]]:
    """Rank the index's images for a sentence (or with `image=True` its texts for an image file); module
    docstring. `model`: the index's model (loaded from `index.json` when None)."""
    meta, paths, feats = read_index(index)
    model = model or load(meta["model"], tokenizer=meta["tokenizer"])
    if image:
        texts_file = pathlib.Path(os.path.expanduser(os.fspath(index))) / "texts.npz"
        if not texts_file.is_file():
            raise FileNotFoundError(f"{texts_file}: the index has no texts (`cclm-jax index --texts FILE`)")
        stored = np.load(texts_file)
        candidates, feats = [str(t) for t in stored["texts"]], stored["features"].astype(np.float32)
        query_feat = embed_images(model, [query])[0]
    else:
        candidates = paths
        query_feat = embed_texts(model, [query])[0]
    if not candidates:
        raise ValueError(f"--index {index}: nothing to search (empty index)")
    sims = feats @ query_feat
    order = np.argsort(-sims, kind="stable")[:top]
    if not rerank:
        return [(candidates[i], float(sims[i])) for i in order]
    chosen = [candidates[i] for i in order]
    if image:
        logits = score(model, [query], chosen, rerank=True, k=len(chosen))[0]
    else:
        logits = score(model, chosen, [query], rerank=True, k=len(chosen))[:, 0]
    reranked = np.argsort(-logits, kind="stable")
    return [(chosen[i], float(logits[i])) for i in reranked]


# ------------------------------------------------------------------------------------------------------ HTML

def _thumbnail(path: str) -> str:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        im.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_html(path: str | os.PathLike, query: str, results: Sequence[tuple[str, float]], image: bool = False) -> None:
    """A self-contained HTML page of the ranked results (thumbnails inlined, scores); module docstring."""
    if image:
        head = (f'<figure><img src="{_thumbnail(query)}" alt="query">'
                f'<figcaption>{html.escape(query)}</figcaption></figure>')
        rows = "\n".join(f'<li><span class="score">{s:.4f}</span> {html.escape(t)}</li>' for t, s in results)
        body = f"<h1>image &rarr; text</h1>{head}<ol>{rows}</ol>"
    else:
        cards = "\n".join(
            f'<figure class="result"><img src="{_thumbnail(p)}" alt="{html.escape(os.path.basename(p))}">'
            f'<figcaption><span class="rank">{r}</span> <span class="score">{s:.4f}</span><br>'
            f'{html.escape(os.path.basename(p))}</figcaption></figure>' for r, (p, s) in enumerate(results, 1))
        body = f"<h1>text &rarr; image</h1><p class=\"query\">{html.escape(query)}</p><div>{cards}</div>"
    page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>cclm-jax search</title><style>"
            "body{font-family:sans-serif} figure.result{display:inline-block;margin:6px;text-align:center}"
            ".score{color:#555}</style></head>\n<body>" + body + "</body></html>\n")
    pathlib.Path(os.path.expanduser(os.fspath(path))).write_text(page, encoding="utf-8")
