"""A retrieval baseline without learned visual features: linear CCA between colour-layout image statistics and
bag-of-subwords captions (numpy only).

What it is for: a from-scratch model trained on a few thousand photos can only pick up global colour and layout
statistics; when its recalls equal this baseline's, that is what it has learned, and more needs more images or a
pre-trained start (benchmarks/RESULTS.md, "Fine-tuning"; `benchmarks/flickr8k_linear_baseline.py` runs it).
Not part of the package: import it as `benchmarks.linear_baseline` from the repository root.

Image features: an 8x8 RGB thumbnail (192 values) and a 64-bin RGB colour histogram (4 levels per channel),
standardised on the training images. Text features: binary bag of tokenizer pieces seen at least twice in the
training captions. Regularised CCA (ridge `reg` x 1e-2 on the image covariance, x 1e-3 on the text covariance),
`dims` canonical directions, the image side weighted by the canonical correlations; cosine scores.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

from cclm_jax.evaluation import metrics
from cclm_jax.data.retrieval_sets import RetrievalSet


def image_statistics(images: np.ndarray) -> np.ndarray:
    """uint8 (N, R, R, 3) with R divisible by 8 -> float32 (N, 256): 8x8 RGB thumbnail in [0, 1] (192) and the
    fraction of pixels in each of 64 RGB colour bins (64)."""
    n, res = images.shape[0], images.shape[1]
    if images.ndim != 4 or images.shape[2] != res or images.shape[3] != 3 or res % 8:
        raise ValueError(f"images must be (N, R, R, 3) with R divisible by 8, got {images.shape}")
    x = images.astype(np.float32) / 255.0
    thumb = x.reshape(n, 8, res // 8, 8, res // 8, 3).mean(axis=(2, 4)).reshape(n, -1)
    q = np.minimum((x * 4).astype(np.int64), 3)
    code = (q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).reshape(n, -1)
    hist = np.stack([np.bincount(row, minlength=64) for row in code]).astype(np.float32) / code.shape[1]
    return np.concatenate([thumb, hist], axis=1)


def bag_of_pieces(pieces: Sequence[Sequence[int]], vocab: dict[int, int]) -> np.ndarray:
    """Piece-id lists -> binary float32 (N, len(vocab)); ids outside `vocab` (id -> column) are dropped."""
    out = np.zeros((len(pieces), len(vocab)), np.float32)
    for row, ids in enumerate(pieces):
        out[row, [vocab[i] for i in ids if i in vocab]] = 1.0
    return out


def _inverse_sqrt(cov: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(cov)
    return (vectors * values ** -0.5) @ vectors.T


def fit_cca(a: np.ndarray, b: np.ndarray, dims: int, reg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Regularised CCA of centred paired rows a (N, Da), b (N, Db).

    Returns projections (Da, dims) and (Db, dims) and the canonical correlations (dims,), largest first: the
    projected columns have unit (regularised) variance, and column j of `a @ pa` correlates with column j of
    `b @ pb` by `corr[j]` (without regularisation).
    """
    cov_aa = a.T @ a / len(a) + reg * 1e-2 * np.eye(a.shape[1])
    cov_bb = b.T @ b / len(b) + reg * 1e-3 * np.eye(b.shape[1])
    white_a, white_b = _inverse_sqrt(cov_aa), _inverse_sqrt(cov_bb)
    u, corr, vt = np.linalg.svd(white_a @ (a.T @ b / len(a)) @ white_b)
    return white_a @ u[:, :dims], white_b @ vt[:dims].T, corr[:dims]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-9)


@dataclasses.dataclass(frozen=True)
class CCABaseline:
    """A fitted baseline: `scores(images, pieces)` -> (N_img, N_txt) cosine similarities."""
    image_mean: np.ndarray
    image_std: np.ndarray
    text_mean: np.ndarray
    vocab: dict[int, int]
    image_projection: np.ndarray
    text_projection: np.ndarray
    correlations: np.ndarray

    @classmethod
    def fit(cls, images: np.ndarray, pieces: Sequence[Sequence[int]], txt2img: np.ndarray, dims: int = 32,
            reg: float = 10.0) -> CCABaseline:
        """images: uint8 (N_img, R, R, 3); pieces: token ids of each caption; txt2img: (N_txt,) image of each."""
        counts = collections.Counter(i for ids in pieces for i in set(ids))
        vocab = {piece: col for col, piece in enumerate(sorted(p for p, c in counts.items() if c >= 2))}
        img = image_statistics(images)[np.asarray(txt2img)]
        mean, std = img.mean(0), img.std(0) + 1e-6
        txt = bag_of_pieces(pieces, vocab)
        txt_mean = txt.mean(0)
        dims = min(dims, img.shape[1], txt.shape[1])
        proj_img, proj_txt, corr = fit_cca((img - mean) / std, txt - txt_mean, dims, reg)
        return cls(mean, std, txt_mean, vocab, proj_img, proj_txt, corr)

    def scores(self, images: np.ndarray, pieces: Sequence[Sequence[int]]) -> np.ndarray:
        feat_img = _unit((image_statistics(images) - self.image_mean) / self.image_std @ self.image_projection
                         * self.correlations)
        feat_txt = _unit((bag_of_pieces(pieces, self.vocab) - self.text_mean) @ self.text_projection)
        return feat_img @ feat_txt.T


def cca_retrieval_baseline(train: RetrievalSet, test: RetrievalSet, train_images: np.ndarray,
                           test_images: np.ndarray, encode_batch, dims: int = 32,
                           reg: float = 10.0) -> dict[str, float]:
    """Recalls in percent (`metrics.retrieval_metrics`) of the baseline fitted on `train`, scored on `test`.

    train_images, test_images: uint8 (N, R, R, 3) in the sets' image order; encode_batch: texts -> id lists
    (e.g. `Tokenizer.encode_batch`).
    """
    baseline = CCABaseline.fit(train_images, encode_batch(train.texts), train.txt2img, dims, reg)
    scores = baseline.scores(test_images, encode_batch(test.texts))
    return metrics.retrieval_metrics(scores, np.ascontiguousarray(scores.T), test.txt2img, test.img2txt)
