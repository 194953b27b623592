"""The linear CCA retrieval baseline: features against per-pixel loops, CCA against the textbook eigenproblem,
and retrieval on generated two-colour images whose captions name the colours."""
import numpy as np
import pytest

from benchmarks import linear_baseline as baselines
from cclm_jax.data.retrieval_sets import RetrievalImage, RetrievalSet


def test_image_statistics_equal_per_pixel_loops():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    out = baselines.image_statistics(images)
    assert out.shape == (3, 256) and out.dtype == np.float32
    for n, image in enumerate(images):
        thumb = np.zeros((8, 8, 3))
        hist = np.zeros(64)
        for y in range(16):
            for x in range(16):
                thumb[y // 2, x // 2] += image[y, x] / 255.0 / 4
                r, g, b = (min(int(v / 255.0 * 4), 3) for v in image[y, x])
                hist[r * 16 + g * 4 + b] += 1 / 256
        np.testing.assert_allclose(out[n, :192], thumb.reshape(-1), rtol=3e-7)  # float32: measured 1.3e-7
        np.testing.assert_allclose(out[n, 192:], hist, rtol=3e-7)  # measured 0
    with pytest.raises(ValueError, match="divisible by 8"):
        baselines.image_statistics(np.zeros((1, 12, 12, 3), np.uint8))


def test_cca_correlations_and_whitening_match_the_eigenproblem():
    rng = np.random.default_rng(1)
    shared = rng.normal(size=(2000, 2))
    a = np.concatenate([shared, rng.normal(size=(2000, 3))], 1) @ rng.normal(size=(5, 5))
    b = np.concatenate([shared * [1.0, 0.5] + rng.normal(size=(2000, 2)) * 0.3, rng.normal(size=(2000, 2))], 1)
    a, b = a - a.mean(0), b - b.mean(0)
    proj_a, proj_b, corr = baselines.fit_cca(a, b, dims=3, reg=0.0)
    cov_aa, cov_bb, cov_ab = a.T @ a / len(a), b.T @ b / len(b), a.T @ b / len(a)
    eig = np.sort(np.linalg.eigvals(np.linalg.solve(cov_aa, cov_ab) @ np.linalg.solve(cov_bb, cov_ab.T)).real)[::-1]
    # float64 linear algebra, measured 9e-14, 4e-13, 2e-15, 2e-13: 1e-12 leaves room for another LAPACK
    np.testing.assert_allclose(corr, np.sqrt(eig[:3]), rtol=1e-12)
    np.testing.assert_allclose(proj_a.T @ cov_aa @ proj_a, np.eye(3), rtol=0, atol=1e-12)
    np.testing.assert_allclose(proj_b.T @ cov_bb @ proj_b, np.eye(3), rtol=0, atol=1e-12)
    projected = np.corrcoef((a @ proj_a).T, (b @ proj_b).T)[:3, 3:]
    np.testing.assert_allclose(np.abs(np.diag(projected)), corr, rtol=1e-12)
    assert corr[0] > 0.9 and corr[2] < 0.1  # two shared directions, the third is noise


def _colour_set(rng, n, palette):
    """Images with a left and a right half in palette colours; each caption names both (ids: left c, right 10+c)."""
    left, right = rng.integers(0, len(palette), n), rng.integers(0, len(palette), n)
    images = np.empty((n, 16, 16, 3), np.uint8)
    images[:, :, :8] = palette[left][:, None, None]
    images[:, :, 8:] = palette[right][:, None, None]
    noise = rng.integers(-20, 21, images.shape)
    images = np.clip(images.astype(int) + noise, 0, 255).astype(np.uint8)
    captions = [(f"{a} {10 + b}",) for a, b in zip(left, right)]
    records = tuple(RetrievalImage(str(i), f"{i}.jpg", c) for i, c in enumerate(captions))
    return RetrievalSet(records, "xx", "generated"), images, left * 10 + right


def test_baseline_retrieves_what_colour_statistics_determine():
    rng = np.random.default_rng(2)
    palette = np.array([[230, 30, 30], [30, 200, 40], [40, 40, 220], [240, 240, 60], [20, 20, 20], [250, 250, 250]])
    train, train_images, _ = _colour_set(rng, 600, palette)
    test, test_images, combos = _colour_set(rng, 40, palette)
    encode = lambda texts: [[int(w) for w in t.split()] for t in texts]  # noqa: E731
    recalls = baselines.cca_retrieval_baseline(train, test, train_images, test_images, encode, dims=12, reg=1.0)
    # Images sharing both colours have the same caption, so each group of them counts one hit at R@1: the best
    # possible R@1 is the number of distinct colour pairs over the number of images (here 25 of 40).
    ceiling = 100.0 * len(set(combos)) / len(combos)
    assert ceiling < 100.0 and recalls["txt_r1"] == recalls["img_r1"] == pytest.approx(ceiling)
    assert recalls["txt_r5"] == recalls["img_r5"] == 100.0
    shuffled = baselines.cca_retrieval_baseline(train, test, train_images, test_images[::-1].copy(), encode, dims=12,
                                                reg=1.0)
    assert shuffled["txt_r1"] < 20.0  # the scores follow the pixels, not the order
