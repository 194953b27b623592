"""Evaluation metrics for CCLM downstream tasks (numpy only, host side).

Retrieval (Multi30K, MSCOCO, xFlickr&CO, WIT) follows the reference ``itm_eval``: recall at 1/5/10 in
both directions, in percent, from a score matrix in which the top-k candidates of every query were
re-scored by the fusion encoder and every other entry holds -100 (``topk_candidates`` and
``scatter_topk_scores`` build that matrix). Classification (XVNLI, MaRVL) and VQA (xGQA) use exact-match
accuracy in percent. ``iglue_average`` gives the headline number of a task over languages.

Tie rule for ranks: the reference sorts each row with ``np.argsort(score)[::-1]``, i.e. it reverses an
ascending sort. We rank exactly as if that sort were stable: among equal scores the candidate with the
*higher* column index ranks first. numpy's default sort is only stable for short rows (and on machines
without its SIMD sort), so on long rows with exact ties the reference itself is not deterministic; with
no ties the two agree exactly. ``topk_candidates`` instead breaks ties towards the *lower* index.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

RECALL_AT = (1, 5, 10)

# Target languages of the IGLUE test sets (English is evaluated too but, following IGLUE, left out of
# the headline average). MaRVL has no English test set (the reference evaluates NLVR2 test as "en").
IGLUE_LANGUAGES = {
    "xflickrco": ("de", "es", "id", "ja", "ru", "tr", "zh"),
    "wit": ("ar", "bg", "da", "el", "et", "id", "ja", "ko", "tr", "vi"),
    "xvnli": ("ar", "es", "fr", "ru"),
    "xgqa": ("bn", "de", "id", "ko", "pt", "ru", "zh"),
    "marvl": ("id", "sw", "ta", "tr", "zh"),
}
SOURCE_LANGUAGE = "en"

_CHUNK_ELEMENTS = 1 << 22  # rows are ranked in blocks of at most ~4M scores (32 MiB of float64)


def _check_scores(name: str, scores: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating) and not np.issubdtype(scores.dtype, np.integer):
        raise ValueError(f"{name} must be numeric, got dtype {scores.dtype}")
    if np.isnan(scores).any():
        raise ValueError(f"{name} contains NaN at (row, col) {tuple(np.argwhere(np.isnan(scores))[0])}")
    return scores


def _check_index(name: str, index: np.ndarray, upper: int) -> np.ndarray:
    if index.size and (not np.issubdtype(index.dtype, np.integer)):
        raise ValueError(f"{name} must hold integers, got dtype {index.dtype}")
    index = index.astype(np.int64)
    bad = (index < 0) | (index >= upper)
    if bad.any():
        raise ValueError(f"{name} holds {index[bad][0]} at position {np.flatnonzero(bad)[0]}; "
                         f"valid indices are 0..{upper - 1}")
    return index


def gold_ranks(scores: np.ndarray, rows: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """0-based rank of candidate ``gold[j]`` in score row ``rows[j]`` (the module's tie rule).

    Args:
      scores: (N_query, N_candidate) float scores, higher = better.
      rows: (P,) int query row of each (query, gold) pair.
      gold: (P,) int candidate column of each pair.
    Returns:
      (P,) int64 ranks: #candidates scoring strictly higher + #equal-scoring candidates with a higher
      column index.
    """
    n_cand = scores.shape[1]
    ranks = np.empty(len(rows), dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // max(n_cand, 1))
    cols = np.arange(n_cand)
    for start in range(0, len(rows), step):
        r, g = rows[start:start + step], gold[start:start + step]
        block = scores[r]
        own = block[np.arange(len(r)), g][:, None]
        higher = (block > own).sum(axis=1)
        tied_after = ((block == own) & (cols[None, :] > g[:, None])).sum(axis=1)
        ranks[start:start + step] = higher + tied_after
    return ranks


def _recalls(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    return {f"{prefix}_r{k}": 100.0 * float(np.mean(ranks < k)) for k in RECALL_AT}


def retrieval_metrics(score_i2t: np.ndarray, score_t2i: np.ndarray, txt2img: Sequence[int] | np.ndarray,
                      img2txt: Sequence[Sequence[int] | np.ndarray]) -> dict[str, float]:
    """Recall@1/5/10 in both directions, in percent, as the reference ``itm_eval``.

    Args:
      score_i2t: (N_img, N_txt) float scores of every text for every image query.
      score_t2i: (N_txt, N_img) float scores of every image for every text query.
      txt2img: (N_txt,) int, the image of each text.
      img2txt: N_img int sequences, the ground-truth texts of each image (at least one each).
    Returns:
      ``txt_r1, txt_r5, txt_r10`` (image->text: the image's rank is the best rank among its texts),
      ``img_r1, img_r5, img_r10`` (text->image), ``txt_r_mean``, ``img_r_mean`` (mean of the three) and
      ``r_mean`` (mean of the six), all floats in [0, 100].
    """
    txt2img = np.asarray(txt2img)
    if txt2img.ndim != 1:
        raise ValueError(f"txt2img must be 1-D (N_txt,), got shape {txt2img.shape}")
    n_txt, n_img = txt2img.shape[0], len(img2txt)
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"retrieval needs at least one image and one text, got {n_img} and {n_txt}")
    score_i2t = _check_scores("score_i2t", score_i2t, (n_img, n_txt))
    score_t2i = _check_scores("score_t2i", score_t2i, (n_txt, n_img))
    txt2img = _check_index("txt2img", txt2img, n_img)

    rows, gold = [], []
    for i, texts in enumerate(img2txt):
        texts = np.asarray(texts).reshape(-1)
        if texts.size == 0:
            raise ValueError(f"img2txt[{i}] is empty: image {i} has no ground-truth text")
        gold.append(_check_index(f"img2txt[{i}]", texts, n_txt))
        rows.append(np.full(texts.size, i, dtype=np.int64))
    rows, gold = np.concatenate(rows), np.concatenate(gold)
    pair_ranks = gold_ranks(score_i2t, rows, gold)
    best = np.full(n_img, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(best, rows, pair_ranks)

    text_ranks = gold_ranks(score_t2i, np.arange(n_txt), txt2img)

    out = {**_recalls(best, "txt"), **_recalls(text_ranks, "img")}
    out["txt_r_mean"] = float(np.mean([out[f"txt_r{k}"] for k in RECALL_AT]))
    out["img_r_mean"] = float(np.mean([out[f"img_r{k}"] for k in RECALL_AT]))
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def topk_candidates(sims: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest similarities of every row, best first.

    Args:
      sims: (N_query, N_candidate) float dual-encoder similarities.
      k: candidates per query (the reference's ``k_test``); clipped to N_candidate, must be >= 1.
    Returns:
      (N_query, min(k, N_candidate)) int64 column indices; equal similarities keep the lower index first.
    """
    sims = np.asarray(sims)
    if sims.ndim != 2:
        raise ValueError(f"sims must be 2-D (N_query, N_candidate), got shape {sims.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if np.isnan(sims).any():
        raise ValueError(f"sims contains NaN at (row, col) {tuple(np.argwhere(np.isnan(sims))[0])}")
    k = min(int(k), sims.shape[1])
    order = np.argsort(-sims.astype(np.float64), axis=1, kind="stable")
    return order[:, :k].astype(np.int64)


def scatter_topk_scores(idx: np.ndarray, scores: np.ndarray, shape: tuple[int, int],
                        fill: float = -100.0) -> np.ndarray:
    """The reference's re-ranked score matrix: re-scored top-k entries, ``fill`` everywhere else.

    Args:
      idx: (N_query, k) int candidate columns (from ``topk_candidates``).
      scores: (N_query, k) float re-scores of those candidates (the ITM "match" logit).
      shape: (N_query, N_candidate) of the full matrix.
      fill: value of every entry that was not re-scored (the reference uses -100).
    Returns:
      (N_query, N_candidate) float32 matrix (float64 if ``scores`` is float64).
    """
    idx, scores = np.asarray(idx), np.asarray(scores)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        raise ValueError(f"shape must be (N_query, N_candidate), got {shape}")
    if idx.ndim != 2 or idx.shape != scores.shape or idx.shape[0] != shape[0]:
        raise ValueError(f"idx {idx.shape} and scores {scores.shape} must both be (N_query={shape[0]}, k)")
    if idx.shape[1] > shape[1]:
        raise ValueError(f"k={idx.shape[1]} exceeds the {shape[1]} candidates of shape {shape}")
    idx = _check_index("idx", idx, shape[1])
    repeats = (np.diff(np.sort(idx, axis=1), axis=1) == 0).any(axis=1)
    if repeats.any():
        row = int(np.flatnonzero(repeats)[0])
        raise ValueError(f"idx row {row} repeats a candidate: {idx[row].tolist()}")
    out = np.full(shape, fill, dtype=np.result_type(scores.dtype, np.float32))
    out[np.arange(shape[0])[:, None], idx] = scores
    return out


def accuracy(pred: Sequence | np.ndarray, gold: Sequence | np.ndarray) -> float:
    """Exact-match accuracy in percent of predicted labels (ints or strings) against gold labels.

    Args:
      pred: (N,) predicted class ids (e.g. argmax of XVNLI/MaRVL logits) or answer strings.
      gold: (N,) gold labels of the same kind.
    """
    pred, gold = np.asarray(pred), np.asarray(gold)
    if pred.ndim != 1 or pred.shape != gold.shape:
        raise ValueError(f"pred {pred.shape} and gold {gold.shape} must be 1-D of equal length")
    if pred.size == 0:
        raise ValueError("accuracy of zero examples is undefined")
    return 100.0 * float(np.mean(pred == gold))


def vqa_accuracy(predictions: Mapping[str | int, str], gold: Mapping[str | int, str | None]) -> float:
    """xGQA accuracy in percent, as the reference ``get_acc``.

    A question counts when it has a gold answer (questions whose gold is ``None`` are skipped, as the
    reference skips test entries without ``answer``); it is correct when the predicted answer string
    equals the single gold answer exactly. Question ids are compared as strings.

    Args:
      predictions: question id -> predicted answer (from the ranked answer list).
      gold: question id -> gold answer or None.
    """
    preds = {str(q): a for q, a in predictions.items()}
    counted = {str(q): a for q, a in gold.items() if a is not None}
    if not counted:
        raise ValueError("no question with a gold answer: VQA accuracy is undefined")
    missing = sorted(set(counted) - set(preds))
    if missing:
        raise ValueError(f"{len(missing)} questions with a gold answer have no prediction, "
                         f"first: {missing[:5]}")
    correct = sum(preds[q] == a for q, a in counted.items())
    return 100.0 * correct / len(counted)


def accuracy_by_language(pred: Sequence | np.ndarray, gold: Sequence | np.ndarray,
                         languages: Sequence[str] | np.ndarray) -> dict[str, float]:
    """Accuracy in percent per language for examples pooled across languages.

    Args:
      pred, gold: (N,) labels as in ``accuracy``.
      languages: (N,) language code of each example.
    Returns:
      language -> accuracy over that language's examples, languages sorted.
    """
    pred, gold, languages = np.asarray(pred), np.asarray(gold), np.asarray(languages)
    if languages.shape != pred.shape:
        raise ValueError(f"languages {languages.shape} must match pred {pred.shape}")
    return {str(lang): accuracy(pred[languages == lang], gold[languages == lang])
            for lang in sorted(set(languages.tolist()))}


def language_average(per_language: Mapping[str, float], exclude: Sequence[str] = ()) -> float:
    """Unweighted mean of a metric over languages, leaving out ``exclude``.

    Args:
      per_language: language -> metric value.
      exclude: languages not averaged (e.g. ``("en",)``).
    """
    kept = [float(v) for lang, v in per_language.items() if lang not in set(exclude)]
    if not kept:
        raise ValueError(f"no language left to average: have {sorted(per_language)}, excluded {list(exclude)}")
    return float(np.mean(kept))


def task_family(task: str) -> str:
    """The dataset a task name refers to: lower case, '&' dropped, cut at the first '_', '-', '.' or space.

    ``"xFlickr&CO"`` -> ``"xflickrco"``, ``"xvnli_translate_test"`` -> ``"xvnli"``, ``"WIT-fewshot"`` -> ``"wit"``.
    """
    return re.split(r"[_\-. ]", task.lower().replace("&", ""), maxsplit=1)[0]


def average_excludes(task: str) -> tuple[str, ...]:
    """Languages left out of ``task``'s headline average: English for IGLUE tasks, none otherwise.

    The task is recognised by ``task_family`` (so translate-test and few-shot variants count as IGLUE).

    IGLUE reports the zero-shot cross-lingual average over the target languages only (English is the
    training language); the reference's xGQA script does the same ("following iglue"). Multi30K, MSCOCO
    and other retrieval sets report every language, so their average keeps English.
    """
    return (SOURCE_LANGUAGE,) if task_family(task) in IGLUE_LANGUAGES else ()


def iglue_average(task: str, per_language: Mapping[str, float]) -> float:
    """Headline average of one metric of ``task`` over its languages (see ``average_excludes``)."""
    return language_average(per_language, exclude=average_excludes(task))
