"""Evaluation metrics against brute-force references written here and hand-worked examples."""
import numpy as np
import pytest

from cclm_jax.evaluation import metrics


def brute_force_itm_eval(score_i2t, score_t2i, txt2img, img2txt):
    """Loop-per-query recalls; ranking by reversing a stable ascending sort (the documented tie rule)."""
    def rank_of(row, target):
        order = list(np.argsort(row, kind="stable")[::-1])
        return order.index(target)

    i2t = [min(rank_of(score_i2t[i], t) for t in img2txt[i]) for i in range(len(img2txt))]
    t2i = [rank_of(score_t2i[t], txt2img[t]) for t in range(len(txt2img))]
    out = {}
    for prefix, ranks in (("txt", i2t), ("img", t2i)):
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
        out[f"{prefix}_r_mean"] = (out[f"{prefix}_r1"] + out[f"{prefix}_r5"] + out[f"{prefix}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def random_retrieval(rng, n_img, max_captions, tie_levels=None):
    counts = rng.integers(1, max_captions + 1, size=n_img)
    txt2img = np.repeat(np.arange(n_img), counts)
    perm = rng.permutation(len(txt2img))  # texts of one image need not be contiguous
    txt2img = txt2img[perm]
    img2txt = [np.flatnonzero(txt2img == i) for i in range(n_img)]
    shape = (n_img, len(txt2img))
    if tie_levels:
        score_i2t = rng.integers(0, tie_levels, size=shape).astype(np.float32)
        score_t2i = rng.integers(0, tie_levels, size=shape[::-1]).astype(np.float32)
    else:
        score_i2t, score_t2i = rng.normal(size=shape), rng.normal(size=shape[::-1])
    return score_i2t, score_t2i, txt2img, img2txt


@pytest.mark.parametrize("seed,tie_levels", [(0, None), (1, 3), (2, 2), (3, 6)])
def test_retrieval_metrics_match_brute_force(seed, tie_levels):
    rng = np.random.default_rng(seed)
    score_i2t, score_t2i, txt2img, img2txt = random_retrieval(rng, n_img=23, max_captions=5,
                                                              tie_levels=tie_levels)
    got = metrics.retrieval_metrics(score_i2t, score_t2i, txt2img, img2txt)
    want = brute_force_itm_eval(score_i2t, score_t2i, txt2img, img2txt)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key


def test_retrieval_metrics_hand_worked_small():
    # image 0 owns texts 0,1; image 1 owns text 2.
    img2txt = [[0, 1], [2]]
    txt2img = [0, 0, 1]
    score_i2t = np.array([[0.1, 0.9, 0.5],    # best own text (1) is first -> hit@1
                          [0.8, 0.2, 0.3]])   # own text 2 is second -> miss@1
    score_t2i = np.array([[0.2, 0.7],         # text 0: own image 0 second -> miss@1
                          [0.6, 0.1],         # text 1: hit@1
                          [0.4, 0.4]])        # text 2: tie, the higher index (own image 1) ranks first
    got = metrics.retrieval_metrics(score_i2t, score_t2i, txt2img, img2txt)
    assert got["txt_r1"] == 50.0 and got["txt_r5"] == 100.0 and got["txt_r10"] == 100.0
    assert got["img_r1"] == pytest.approx(200 / 3) and got["img_r5"] == 100.0
    assert got["txt_r_mean"] == pytest.approx(250 / 3)
    assert got["img_r_mean"] == pytest.approx((200 / 3 + 200) / 3)
    assert got["r_mean"] == pytest.approx((250 / 3 + (200 / 3 + 200) / 3) / 2)


def test_retrieval_metrics_known_ranks():
    # 12 images, one text each; query j's own candidate is beaten by exactly j others -> rank j.
    n = 12
    scores = np.zeros((n, n))
    for j in range(n):
        others = [c for c in range(n) if c != j][:j]
        scores[j, others] = 1.0
        scores[j, j] = 0.5
    ident = np.arange(n)
    got = metrics.retrieval_metrics(scores, scores, ident, [[i] for i in ident])
    for prefix in ("txt", "img"):
        assert got[f"{prefix}_r1"] == pytest.approx(100 * 1 / 12)
        assert got[f"{prefix}_r5"] == pytest.approx(100 * 5 / 12)
        assert got[f"{prefix}_r10"] == pytest.approx(100 * 10 / 12)
    assert got["r_mean"] == pytest.approx(100 * 16 / 36)


def test_gold_ranks_tie_rule_on_constant_row():
    scores = np.zeros((1, 6))
    ranks = metrics.gold_ranks(scores, np.zeros(6, np.int64), np.arange(6))
    assert ranks.tolist() == [5, 4, 3, 2, 1, 0]


def test_gold_ranks_chunked_equals_unchunked(monkeypatch):
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 4, size=(9, 30)).astype(np.float64)
    rows, gold = rng.integers(0, 9, size=40), rng.integers(0, 30, size=40)
    whole = metrics.gold_ranks(scores, rows, gold)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 31)  # one row per block
    assert metrics.gold_ranks(scores, rows, gold).tolist() == whole.tolist()


@pytest.mark.parametrize("kwargs,match", [
    (dict(score_i2t=np.zeros((2, 4))), r"score_i2t must have shape \(2, 3\)"),
    (dict(score_t2i=np.full((3, 2), np.nan)), "score_t2i contains NaN"),
    (dict(txt2img=[0, 0, 2]), "txt2img holds 2 at position 2"),
    (dict(img2txt=[[0, 1], []]), r"img2txt\[1\] is empty"),
    (dict(img2txt=[[0, 1], [3]]), r"img2txt\[1\] holds 3"),
    (dict(txt2img=[0.0, 0.0, 1.0]), "txt2img must hold integers"),
])
def test_retrieval_metrics_rejects_bad_input(kwargs, match):
    args = dict(score_i2t=np.zeros((2, 3)), score_t2i=np.zeros((3, 2)), txt2img=[0, 0, 1], img2txt=[[0, 1], [2]])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        metrics.retrieval_metrics(**args)


def test_topk_candidates_order_and_ties():
    sims = np.array([[0.1, 0.5, 0.5, 0.9, 0.0],
                     [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert metrics.topk_candidates(sims, 3).tolist() == [[3, 1, 2], [0, 1, 2]]
    assert metrics.topk_candidates(sims, 99).shape == (2, 5)  # k clipped to the candidates
    with pytest.raises(ValueError, match="k must be a positive int"):
        metrics.topk_candidates(sims, 0)
    with pytest.raises(ValueError, match="sims must be 2-D"):
        metrics.topk_candidates(sims[0], 2)


def test_topk_candidates_match_brute_force():
    rng = np.random.default_rng(5)
    sims = rng.normal(size=(7, 40)).astype(np.float32)
    idx = metrics.topk_candidates(sims, 6)
    for row in range(7):
        want = sorted(range(40), key=lambda c: (-float(sims[row, c]), c))[:6]
        assert idx[row].tolist() == want


def test_scatter_topk_scores_builds_reference_matrix():
    rng = np.random.default_rng(6)
    sims = rng.normal(size=(5, 9))
    idx = metrics.topk_candidates(sims, 3)
    rescored = sims[np.arange(5)[:, None], idx] * 10.0
    full = metrics.scatter_topk_scores(idx, rescored.astype(np.float32), sims.shape)
    assert full.dtype == np.float32 and full.shape == (5, 9)
    for row in range(5):
        for col in range(9):
            if col in idx[row]:
                assert full[row, col] == pytest.approx(sims[row, col] * 10.0, rel=1e-6)
            else:
                assert full[row, col] == -100.0
    other_fill = metrics.scatter_topk_scores(idx, rescored, sims.shape, fill=-1.0)
    assert other_fill.dtype == np.float64 and int((other_fill == -1.0).sum()) == 5 * (9 - 3)


def test_rerank_pipeline_recalls_equal_brute_force():
    rng = np.random.default_rng(7)
    score_i2t, score_t2i, txt2img, img2txt = random_retrieval(rng, n_img=15, max_captions=3)
    k = 4  # smaller than 10: gold outside the top-k ties at -100 and the tie rule decides R@5/R@10
    i2t = metrics.scatter_topk_scores(metrics.topk_candidates(score_i2t, k),
                                      np.take_along_axis(score_i2t, metrics.topk_candidates(score_i2t, k), 1),
                                      score_i2t.shape)
    t2i = metrics.scatter_topk_scores(metrics.topk_candidates(score_t2i, k),
                                      np.take_along_axis(score_t2i, metrics.topk_candidates(score_t2i, k), 1),
                                      score_t2i.shape)
    got = metrics.retrieval_metrics(i2t, t2i, txt2img, img2txt)
    want = brute_force_itm_eval(i2t, t2i, txt2img, img2txt)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key


def test_scatter_topk_scores_rejects_bad_input():
    idx = np.array([[0, 1], [2, 2]])
    with pytest.raises(ValueError, match="idx row 1 repeats a candidate"):
        metrics.scatter_topk_scores(idx, np.zeros((2, 2)), (2, 3))
    with pytest.raises(ValueError, match="idx holds 5"):
        metrics.scatter_topk_scores(np.array([[0, 5]]), np.zeros((1, 2)), (1, 3))
    with pytest.raises(ValueError, match="must both be"):
        metrics.scatter_topk_scores(np.array([[0, 1]]), np.zeros((1, 3)), (1, 3))


def test_accuracy_and_per_language():
    assert metrics.accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 75.0
    assert metrics.accuracy(["yes", "no"], ["yes", "yes"]) == 50.0
    per = metrics.accuracy_by_language([1, 0, 1, 1, 0], [1, 1, 1, 0, 0], ["id", "id", "zh", "zh", "zh"])
    assert per == {"id": 50.0, "zh": pytest.approx(200 / 3)}
    with pytest.raises(ValueError, match="equal length"):
        metrics.accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="zero examples"):
        metrics.accuracy([], [])


def test_vqa_accuracy_exact_match_skips_unanswered():
    gold = {"1": "yes", 2: "red", "3": None, "4": "two"}
    preds = {1: "yes", "2": "Red", "4": "two", "3": "anything"}
    assert metrics.vqa_accuracy(preds, gold) == pytest.approx(200 / 3)  # "Red" != "red"
    with pytest.raises(ValueError, match=r"1 questions with a gold answer have no prediction, first: \['4'\]"):
        metrics.vqa_accuracy({"1": "yes", "2": "red"}, gold)
    with pytest.raises(ValueError, match="no question with a gold answer"):
        metrics.vqa_accuracy({}, {"1": None})


def test_language_averages_follow_iglue_protocol():
    per = {"en": 90.0, "de": 60.0, "ja": 40.0}
    assert metrics.language_average(per) == pytest.approx(190 / 3)
    assert metrics.iglue_average("xGQA", per) == 50.0
    assert metrics.iglue_average("xFlickr&CO", per) == 50.0
    assert metrics.iglue_average("xvnli_translate_test", per) == 50.0
    assert metrics.iglue_average("multi30k", per) == pytest.approx(190 / 3)
    assert metrics.task_family("WIT-fewshot") == "wit"
    with pytest.raises(ValueError, match="no language left to average"):
        metrics.iglue_average("marvl", {"en": 1.0})
