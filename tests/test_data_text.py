"""pre_caption, padding and masking against an independent implementation of the reference."""
import random

import numpy as np
import pytest

from cclm_jax.data.text import mask_batch, num_to_mask, pad_batch, pre_caption

VOCAB = 50
MASK_ID = VOCAB - 1


def test_pre_caption_cleans_like_the_reference():
    assert pre_caption("A man, in a RED shirt (with <person>) jumps!", 40) == \
        "a man in a red shirt with person jumps"
    assert pre_caption("  Hello---World//x  ", 40) == "hello world x"
    assert pre_caption("it's a dog; the dog's \"ball\" ~ *#:?", 40) == "it s a dog the dog s ball"
    assert pre_caption("one two three four five", 3) == "one two three"
    assert pre_caption("正在跨越障碍的小狗。", 1) == "正在跨越障碍的小狗。"  # unsegmented: one "word"
    assert pre_caption("a\tb", 40) == "a\tb"  # a single tab is not a run of whitespace
    assert pre_caption("a \t b\n", 40) == "a b"


@pytest.mark.parametrize("text", ["", "   ", "...", "?! - /", "( ) * # : ; ~"])
def test_pre_caption_rejects_empty_captions(text):
    with pytest.raises(ValueError, match="empty after cleaning"):
        pre_caption(text, 40)


def test_pad_batch_layout():
    ids, atts = pad_batch([[10, 11, 12], [], list(range(20, 30))], 6)
    np.testing.assert_array_equal(ids, [[0, 10, 11, 12, 2, 1], [0, 2, 1, 1, 1, 1], [0, 20, 21, 22, 23, 2]])
    np.testing.assert_array_equal(atts, [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert ids.dtype == np.int32 and atts.dtype == np.int32


# ----------------------------------------------------------------------------- independent reference

def reference_masking(tokens, rng: random.Random, mask_prob=0.4, max_masks=12):
    """Sequential port of the reference TextMaskingGenerator (mask_whole_word=False)."""
    n_pred = min(max_masks, max(1, int(round(len(tokens) * mask_prob))))
    candidates = list(range(1, len(tokens)))
    rng.shuffle(candidates)
    chosen = set()
    last = len(tokens) - 1
    for pos in candidates:
        if len(chosen) >= n_pred:
            break
        if pos in chosen:
            continue
        span = rng.randint(2, 3) if rng.random() < 0.2 else 1
        for p in range(pos, pos + span):
            if p > last:
                break
            chosen.add(p)
    chosen = list(chosen)
    if len(chosen) > n_pred:
        rng.shuffle(chosen)
        chosen = chosen[:n_pred]
    out = list(tokens)
    for p in chosen:
        if rng.random() < 0.8:
            out[p] = MASK_ID
        elif rng.random() < 0.5:
            out[p] = rng.randint(0, VOCAB - 1)
    return out, sorted(chosen)


def _sequences(lengths, rng):
    """Token rows <s> body </s> with body ids in [4, MASK_ID)."""
    return [[0] + list(rng.integers(4, MASK_ID, n - 2)) + [2] for n in lengths]


def _stats(rows, masked_rows, positions, max_tokens):
    """Per-position mask rate, run-length histogram, and replacement outcome counts."""
    rate = np.zeros(max_tokens)
    runs = np.zeros(5)
    outcome = {"mask": 0, "random": 0, "kept": 0}
    replacement_ids = []
    for row, out, pos in zip(rows, masked_rows, positions):
        flags = np.zeros(len(row), bool)
        flags[list(pos)] = True
        rate[:len(row)] += flags
        run = 0
        for f in list(flags) + [False]:
            if f:
                run += 1
            elif run:
                runs[min(run, 4)] += 1
                run = 0
        for p in pos:
            if out[p] == MASK_ID:
                outcome["mask"] += 1
            elif out[p] != row[p]:
                outcome["random"] += 1
                replacement_ids.append(out[p])
            else:
                outcome["kept"] += 1
    return rate / len(rows), runs / runs.sum(), outcome, np.array(replacement_ids)


@pytest.fixture(scope="module")
def draws():
    """10,000 draws of each implementation on identical length-12 sequences."""
    rng = np.random.default_rng(0)
    n, length = 10_000, 12
    rows = _sequences([length] * n, rng)
    ref_rng = random.Random(1)
    ref = [reference_masking(row, ref_rng) for row in rows]
    ids, atts = np.array(rows, np.int32), np.ones((n, length), np.int32)
    masked, pos, labels = mask_batch(ids, atts, np.random.default_rng(2), vocab_size=VOCAB,
                                     mask_id=MASK_ID, mask_prob=0.4, max_masks=12)
    ours_pos = [p[row != -100] for p, row in zip(pos, labels)]
    return rows, ref, (masked, pos, labels, ours_pos)


def test_masking_statistics_match_the_reference(draws):
    rows, ref, (masked, pos, labels, ours_pos) = draws
    ref_rate, ref_runs, ref_outcome, ref_random = _stats(rows, [r[0] for r in ref], [r[1] for r in ref], 12)
    rate, runs, outcome, random_ids = _stats(rows, masked.tolist(), [list(p) for p in ours_pos], 12)

    # every draw masks exactly n_pred = round(12 * 0.4) = 5 positions, like the reference
    assert all(len(r[1]) == 5 for r in ref)
    assert all(len(p) == 5 for p in ours_pos)
    # <s> never, </s> sometimes, all positions within the sequence
    assert rate[0] == 0 and ref_rate[0] == 0
    assert rate[11] > 0.3 and abs(rate[11] - ref_rate[11]) < 0.03
    np.testing.assert_allclose(rate, ref_rate, atol=0.03)
    # span structure: distribution of maximal masked runs (1, 2, 3, 4+)
    np.testing.assert_allclose(runs, ref_runs, atol=0.02)
    # 80 / 10 / 10
    total = sum(outcome.values())
    for key, expected in (("mask", 0.8), ("random", 0.1), ("kept", 0.1)):
        ours_frac = outcome[key] / total
        ref_frac = ref_outcome[key] / sum(ref_outcome.values())
        assert abs(ours_frac - ref_frac) < 0.015, key
        assert abs(ours_frac - expected) < 0.015 + (0.003 if key != "mask" else 0.0), key
    # random replacements cover the whole vocabulary, specials and <mask> included
    assert random_ids.min() == 0 and ref_random.min() == 0
    assert np.bincount(random_ids, minlength=VOCAB)[[0, 1, 2, 3]].sum() > 0
    assert len(np.unique(random_ids)) >= VOCAB - 2


def test_labels_and_padding(draws):
    rows, _, (masked, pos, labels, _) = draws
    ids = np.array(rows)
    for k in range(200):
        real = labels[k] != -100
        assert real.sum() == 5
        np.testing.assert_array_equal(labels[k][real], ids[k][pos[k][real]])
        np.testing.assert_array_equal(pos[k][~real], 0)
        assert np.all(np.diff(pos[k][real]) > 0)
        unmasked = np.setdiff1d(np.arange(12), pos[k][real])
        np.testing.assert_array_equal(masked[k][unmasked], ids[k][unmasked])
    assert masked.dtype == pos.dtype == labels.dtype == np.int32


def test_variable_lengths_padding_and_caps():
    rng = np.random.default_rng(3)
    lengths = rng.integers(2, 65, 2000)
    ids, atts = pad_batch([list(rng.integers(4, MASK_ID, n - 2)) for n in lengths], 64)
    masked, pos, labels = mask_batch(ids, atts, np.random.default_rng(4), vocab_size=VOCAB,
                                     mask_id=MASK_ID, mask_prob=0.4, max_masks=20)
    counts = (labels != -100).sum(axis=1)
    np.testing.assert_array_equal(counts, num_to_mask(lengths, 0.4, 20))
    assert counts.max() == 20 and counts.min() == 1
    real = labels != -100
    assert np.all(pos[real] < lengths[np.nonzero(real)[0]])
    assert np.all(pos[real] >= 1)
    np.testing.assert_array_equal(masked[atts == 0], 1)  # padding untouched
    assert pos.shape == (2000, 20) and labels.shape == (2000, 20)


def test_num_to_mask_rounds_like_python():
    lengths = np.arange(1, 70)
    expected = [min(12, max(1, int(round(n * 0.4)))) for n in lengths]
    np.testing.assert_array_equal(num_to_mask(lengths, 0.4, 12), expected)


def test_masking_is_deterministic_given_the_seed():
    rng = np.random.default_rng(5)
    ids, atts = pad_batch([list(rng.integers(4, MASK_ID, n)) for n in (3, 10, 30)], 40)
    kwargs = dict(vocab_size=VOCAB, mask_id=MASK_ID, mask_prob=0.4, max_masks=12)
    first = mask_batch(ids, atts, np.random.default_rng(7), **kwargs)
    again = mask_batch(ids, atts, np.random.default_rng(7), **kwargs)
    other = mask_batch(ids, atts, np.random.default_rng(8), **kwargs)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))
