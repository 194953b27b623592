"""Dev-set retrieval of a training run: image->text and text->image per language, and cross-lingual
text->text between the captions of the same images (`config.data.eval` names the set).

The `dev_retrieval` evaluator of pre-training runs (`config.evals`) and `cclm-jax evaluate`
(`train.pretraining.evaluate`), which also writes `results.json`, `results.md` and a recall chart under
`workdir/eval/step_<N>/`.
"""
from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from cclm_jax.data.pipeline import build_retrieval_eval
from cclm_jax.evaluation import metrics
from cclm_jax.evaluation.retrieval import RetrievalEvaluator, parallel_text_metrics
from cclm_jax.models import build_model

PIVOT_LANGUAGE = "en"


def _dev_images(data) -> np.ndarray:
    """All dev images in image-index order, (N, R, R, 3) uint8."""
    images = np.zeros((data.num_images,), object)
    for batch in data.image_batches():
        for image, index, valid in zip(batch["image"], batch["image_index"], batch["valid"]):
            if valid:
                images[index] = image
    return np.stack(list(images))


def _first_caption_per_image(texts: dict) -> dict[int, int]:
    """image index -> row of its first caption in one language."""
    rows: dict[int, int] = {}
    for row, image in enumerate(texts["image_index"]):
        rows.setdefault(int(image), row)
    return rows


def dev_retrieval(config: ml_collections.ConfigDict, params: Any, mesh, tokenizer, k_test: int) -> dict[str, float]:
    """Recalls in percent: `<lang>/i2t_r1`, `<lang>/t2i_r1`, `<lang>/r_mean`, `en-<lang>/t2t_r1`
    (cross-lingual, both directions averaged) and `chance_r1` (100 / number of images). k_test: candidates
    re-ranked by the ITM head (0: ITC scores only)."""
    data = build_retrieval_eval(config.data, tokenizer)
    model = build_model(config.model)
    evaluator = RetrievalEvaluator(model, batch_size=config.data.eval.batch_size, mesh=mesh)
    images = _dev_images(data)
    n = data.num_images
    results: dict[str, float] = {"chance_r1": 100.0 / n}
    for lang, texts in data.texts.items():
        txt2img = texts["image_index"]
        img2txt = [np.flatnonzero(txt2img == i) for i in range(n)]
        scores = evaluator.image_text_scores(params, images, texts["text_ids"], texts["text_atts"],
                                             k_test=max(k_test, 1), rerank=k_test > 0)
        r = metrics.retrieval_metrics(scores.score_i2t, scores.score_t2i, txt2img, img2txt)
        results.update({f"{lang}/i2t_r1": r["txt_r1"], f"{lang}/t2i_r1": r["img_r1"], f"{lang}/r_mean": r["r_mean"]})
    pivot = data.texts.get(PIVOT_LANGUAGE)
    if pivot is not None:
        pivot_rows = _first_caption_per_image(pivot)
        for lang, texts in data.texts.items():
            if lang == PIVOT_LANGUAGE:
                continue
            rows = _first_caption_per_image(texts)
            shared = sorted(set(pivot_rows) & set(rows))
            a = [pivot_rows[i] for i in shared]
            b = [rows[i] for i in shared]
            scores = evaluator.text_text_scores(params, pivot["text_ids"][a], pivot["text_atts"][a],
                                                texts["text_ids"][b], texts["text_atts"][b],
                                                k_test=max(k_test, 1), rerank=k_test > 0)
            r = parallel_text_metrics(scores)
            results[f"{PIVOT_LANGUAGE}-{lang}/t2t_r1"] = 0.5 * (r["a2b_r1"] + r["b2a_r1"])
    return results
