"""Retrieval evaluation: jitted, padded, sharded blocks against a brute-force loop over single items and pairs."""
import jax
import numpy as np
import pytest

from cclm_jax import parallel
from cclm_jax.data.image import normalize
from cclm_jax.evaluation import metrics
from cclm_jax.evaluation.retrieval import RetrievalEvaluator, RetrievalScores, parallel_text_metrics
from cclm_jax.models import build_model

CAPTIONS_PER_IMAGE = (3, 1, 2, 4, 1)  # 5 images, 11 texts: several captions per image, unevenly
K = 3


def _texts(rng, n, length=12, vocab=999):
    ids = rng.integers(4, vocab, (n, length)).astype(np.int32)
    lengths = rng.integers(4, length + 1, n)
    atts = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids[:, 0] = 0
    ids[np.arange(n), lengths - 1] = 2
    return np.where(atts == 1, ids, 1).astype(np.int32), atts


@pytest.fixture(scope="module")
def example(micro_params):
    cfg, params = micro_params
    rng = np.random.default_rng(0)
    res = cfg.vision.image_res
    images = rng.integers(0, 256, (len(CAPTIONS_PER_IMAGE), res, res, 3), dtype=np.uint8)
    ids, atts = _texts(rng, sum(CAPTIONS_PER_IMAGE))
    txt2img = np.repeat(np.arange(len(CAPTIONS_PER_IMAGE)), CAPTIONS_PER_IMAGE)
    img2txt = [np.flatnonzero(txt2img == i) for i in range(len(CAPTIONS_PER_IMAGE))]
    return build_model(cfg), params, images, ids, atts, txt2img, img2txt


def _brute_force(model, params, cond_inputs, text_ids, text_atts, k, image_side):
    """Every item encoded alone, numpy similarities and top-k, every candidate pair fused alone."""
    def apply(method, *args):
        return model.apply({"params": params}, *args, method=getattr(model, method))

    @jax.jit
    def encode_image(x):
        embeds, atts = apply("encode_image", normalize(x))
        return embeds, atts, apply("image_features", embeds)

    @jax.jit
    def encode_text(x, a):
        embeds = apply("encode_text", x, a)
        return embeds, apply("text_features", embeds)

    @jax.jit
    def match(ce, ca, te, ta):
        return apply("itm_logits", apply("fuse", ce, ca, te, ta)[:, 0])[0, 1]

    if image_side:
        conds = [encode_image(x[None]) for x in cond_inputs[0]]
    else:
        conds = [(encode_text(i[None], a[None])[0], a[None], encode_text(i[None], a[None])[1])
                 for i, a in zip(*cond_inputs)]
    texts = [encode_text(i[None], a[None]) for i, a in zip(text_ids, text_atts)]
    sims = np.concatenate([np.asarray(c[2]) for c in conds]) @ np.concatenate([np.asarray(t[1]) for t in texts]).T
    i2t = metrics.topk_candidates(sims, k)
    t2i = metrics.topk_candidates(sims.T, k)
    score_i2t = np.full(sims.shape, -100.0, np.float32)
    score_t2i = np.full(sims.T.shape, -100.0, np.float32)
    for q, cands in enumerate(i2t):
        for t in cands:
            score_i2t[q, t] = match(conds[q][0], conds[q][1], texts[t][0], text_atts[t][None])
    for t, cands in enumerate(t2i):
        for q in cands:
            score_t2i[t, q] = match(conds[q][0], conds[q][1], texts[t][0], text_atts[t][None])
    return sims, score_i2t, score_t2i


def _assert_clear_topk(sims, k):
    """Guard: the k-th and (k+1)-th similarities of every row differ, so float rounding cannot swap them."""
    for matrix in (sims, sims.T):
        ordered = -np.sort(-matrix, axis=1)
        assert np.all(ordered[:, k - 1] - ordered[:, k] > 1e-5)


@pytest.fixture(scope="module")
def single_device_scores(example):
    model, params, images, ids, atts, _, _ = example
    evaluator = RetrievalEvaluator(model, batch_size=4, pairs_per_block=12)  # 2 image, 3 text, 4 pair blocks
    return evaluator, evaluator.image_text_scores(params, images, ids, atts, k_test=K)


def test_jitted_scores_equal_brute_force(example, single_device_scores):
    model, params, images, ids, atts, txt2img, img2txt = example
    _, scores = single_device_scores
    sims, score_i2t, score_t2i = _brute_force(model, params, (images,), ids, atts, K, image_side=True)
    _assert_clear_topk(sims, K)
    np.testing.assert_allclose(scores.sims, sims, rtol=0, atol=4e-7)  # measured 1.8e-7
    np.testing.assert_allclose(scores.score_i2t, score_i2t, rtol=0, atol=1.5e-6)  # measured 3.0e-7
    np.testing.assert_allclose(scores.score_t2i, score_t2i, rtol=0, atol=1.5e-6)  # measured 7.2e-7
    assert (scores.score_i2t > -100).sum(axis=1).tolist() == [K] * len(images)
    assert (metrics.retrieval_metrics(scores.score_i2t, scores.score_t2i, txt2img, img2txt)
            == metrics.retrieval_metrics(score_i2t, score_t2i, txt2img, img2txt))


def test_sharded_evaluation_equals_single_device(example, single_device_scores):
    model, params, images, ids, atts, _, _ = example
    _, single = single_device_scores
    mesh = parallel.make_mesh({"data": 8})
    sharded = RetrievalEvaluator(model, batch_size=8, pairs_per_block=16, mesh=mesh).image_text_scores(
        params, images, ids, atts, k_test=K)
    for name in ("sims", "score_i2t", "score_t2i"):
        np.testing.assert_allclose(getattr(sharded, name), getattr(single, name), rtol=0, atol=1.5e-6,
                                   err_msg=name)  # measured 5.1e-7


def test_dual_encoder_mode_ranks_by_similarity(example, single_device_scores):
    _, params, images, ids, atts, _, _ = example
    evaluator, reranked = single_device_scores
    dual = evaluator.image_text_scores(params, images, ids, atts, k_test=K, rerank=False)
    np.testing.assert_array_equal(dual.score_i2t, reranked.sims)
    np.testing.assert_array_equal(dual.score_t2i, reranked.sims.T)


def test_text_to_text_retrieval_equals_brute_force(example):
    model, params = example[0], example[1]
    rng = np.random.default_rng(1)
    ids_a, atts_a = _texts(rng, 5)
    ids_b, atts_b = _texts(rng, 5)
    evaluator = RetrievalEvaluator(model, batch_size=4, pairs_per_block=8)
    scores = evaluator.text_text_scores(params, ids_a, atts_a, ids_b, atts_b, k_test=2)
    sims, score_a2b, score_b2a = _brute_force(model, params, (ids_a, atts_a), ids_b, atts_b, 2, image_side=False)
    _assert_clear_topk(sims, 2)
    np.testing.assert_allclose(scores.score_i2t, score_a2b, rtol=0, atol=8e-7)  # measured 3.9e-7
    np.testing.assert_allclose(scores.score_t2i, score_b2a, rtol=0, atol=8e-7)  # measured 3.4e-7
    got = parallel_text_metrics(scores)
    expected = metrics.retrieval_metrics(score_a2b, score_b2a, np.arange(5), [[i] for i in range(5)])
    assert got["a2b_r1"] == expected["txt_r1"] and got["b2a_r5"] == expected["img_r5"]
    assert got["r_mean"] == expected["r_mean"] and "txt_r1" not in got


def test_parallel_text_metrics_of_a_perfect_and_a_reversed_ranking():
    n = 4
    perfect = np.eye(n, dtype=np.float32)
    out = parallel_text_metrics(RetrievalScores(perfect, perfect, perfect))
    assert out["a2b_r1"] == out["b2a_r1"] == 100.0
    reversed_rank = np.tile(np.arange(n, dtype=np.float32), (n, 1))  # everyone ranks sentence n-1 first
    out = parallel_text_metrics(RetrievalScores(reversed_rank, reversed_rank, -reversed_rank))
    assert out["a2b_r1"] == 25.0 and out["b2a_r1"] == 25.0 and out["a2b_r10"] == 100.0
    unaligned = np.zeros((n + 1, n), np.float32)  # 5 sentences a, 4 sentences b
    with pytest.raises(ValueError, match=r"square score matrix, got \(5, 4\)"):
        parallel_text_metrics(RetrievalScores(unaligned, unaligned, unaligned.T))


def test_bad_inputs_are_named(example):
    model, params, images, ids, atts, _, _ = example
    mesh = parallel.make_mesh({"data": 8})
    with pytest.raises(ValueError, match="batch_size=4 must be a positive multiple of the mesh's 8 batch shards"):
        RetrievalEvaluator(model, batch_size=4, mesh=mesh)
    evaluator = RetrievalEvaluator(model, batch_size=4)
    with pytest.raises(ValueError, match=r"text ids \(11, 12\) and atts \(11, 11\)"):
        evaluator.image_text_scores(params, images, ids, atts[:, :11], k_test=K)
    with pytest.raises(ValueError, match="k_test must be a positive int"):
        evaluator.image_text_scores(params, images, ids, atts, k_test=0)
    with pytest.raises(ValueError, match="images must be"):
        evaluator.image_text_scores(params, images[0], ids, atts, k_test=K)


def test_official_retrieval_checkpoint_round_trip_gives_the_same_scores(example, single_device_scores, tmp_path):
    """Export the retrieval tree in the official RetrievalModel layout, import it, evaluate: same scores."""
    from cclm_jax.interop import official
    from cclm_jax.models.tasks import init_retrieval_params

    model, params, images, ids, atts, _, _ = example
    evaluator, scores = single_device_scores
    retrieval = init_retrieval_params(params)
    path = tmp_path / "checkpoint_best.pth"
    official.save(path, model.config, retrieval, layout="retrieval")
    assert official.detect_layout(official.read_state_dict(path)) == "retrieval"
    _, loaded = official.load(path, text_num_heads=model.config.text.num_heads)
    assert sorted(loaded) == sorted(retrieval)
    again = evaluator.image_text_scores(loaded, images, ids, atts, k_test=K)
    np.testing.assert_array_equal(again.score_i2t, scores.score_i2t)
    np.testing.assert_array_equal(again.score_t2i, scores.score_t2i)
