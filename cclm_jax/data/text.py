"""Text preprocessing: ``pre_caption`` / ``pre_question``, ``<s> ... </s>`` padding and the reference masking.

All batch functions are numpy, vectorised over the batch, with static output shapes:

* ``pre_caption(text, max_words)`` -- the reference caption cleaning (lowercase, punctuation
  ``, . ' ! ? " ( ) * # : ; ~ - /`` to spaces, ``<person>`` -> ``person``, runs of 2+ whitespace
  characters -> one space, strip, keep the first ``max_words`` space-separated words). Raises
  ``ValueError`` when nothing is left. ``pre_question(question, max_words)`` -- the reference VQA
  question cleaning (fine-tuning on xGQA).
* ``pad_batch(id_lists, max_tokens)`` -> ``text_ids``, ``text_atts`` int32 (B, max_tokens): each
  row is ``<s> ids </s>`` cut to ``max_tokens`` (``</s>`` kept), padded with ``<pad>`` = 1.
* ``mask_batch(text_ids, text_atts, rng, ...)`` -> ``text_ids_masked`` int32 (B, max_tokens),
  ``masked_pos`` int32 (B, max_masks) padded 0, ``masked_ids`` int32 (B, max_masks) padded -100.
  It follows the reference ``TextMaskingGenerator`` (``mask_whole_word=False``):
  ``n_pred = min(max_masks, max(1, round(length * mask_prob)))`` with ``length`` counting
  ``<s>`` and ``</s>``; candidate positions 1..length-1 (``</s>`` maskable, ``<s>`` never) in
  random order; a candidate not yet masked starts a span of 2..``skipgram_max`` tokens with
  probability ``skipgram_prob`` (else 1 token), cut at the sequence end; stop once ``n_pred``
  positions are masked and subsample ``n_pred`` of them when spans overshoot. Each chosen
  position becomes ``<mask>`` (p 0.8), a uniform id in [0, vocab_size) (p 0.1) or stays (p 0.1).
  Masked positions are listed in increasing order. Same ``rng`` state -> same output.
"""
import re
from typing import Sequence

import numpy as np

from cclm_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

_PUNCTUATION = re.compile(r"[,.'!?\"()*#:;~\-/]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")
_QUESTION_PUNCTUATION = re.compile(r"[,.'!?\"()*#:;~]")
IGNORE_ID = -100


def pre_caption(text: str, max_words: int) -> str:
    """Reference caption cleaning (see the module docstring); ValueError when empty."""
    cleaned = _PUNCTUATION.sub(" ", text.lower()).replace("<person>", "person")
    cleaned = _WHITESPACE_RUN.sub(" ", cleaned).rstrip("\n").strip(" ")
    words = cleaned.split(" ")
    if len(words) > max_words:
        cleaned = " ".join(words[:max_words])
    if not cleaned:
        raise ValueError(f"caption is empty after cleaning: {text!r}")
    return cleaned


def pre_question(question: str, max_words: int) -> str:
    """The reference VQA question cleaning: lowercase, punctuation `, . ' ! ? " ( ) * # : ; ~` removed,
    `-` and `/` to spaces, trailing spaces stripped, the first `max_words` space-separated words kept."""
    text = _QUESTION_PUNCTUATION.sub("", question.lower()).replace("-", " ").replace("/", " ").rstrip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def pad_batch(id_lists: Sequence[Sequence[int]], max_tokens: int):
    """Lists of ids (no specials) -> (text_ids, text_atts) int32 (B, max_tokens)."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 to hold <s> and </s>, got {max_tokens}")
    ids = np.full((len(id_lists), max_tokens), PAD_ID, np.int32)
    atts = np.zeros((len(id_lists), max_tokens), np.int32)
    for row, seq in enumerate(id_lists):
        body = list(seq)[: max_tokens - 2]
        n = len(body) + 2
        ids[row, 0] = BOS_ID
        ids[row, 1:n - 1] = body
        ids[row, n - 1] = EOS_ID
        atts[row, :n] = 1
    return ids, atts


def num_to_mask(lengths: np.ndarray, mask_prob: float, max_masks: int) -> np.ndarray:
    """``min(max_masks, max(1, round(length * mask_prob)))`` (round half to even, as Python)."""
    return np.minimum(max_masks, np.maximum(1, np.round(lengths * mask_prob))).astype(np.int64)


def select_mask_positions(lengths, rng: np.random.Generator, *, max_tokens: int, mask_prob: float,
                          max_masks: int, skipgram_prob: float = 0.2, skipgram_max: int = 3):
    """Boolean (B, max_tokens): the positions the reference span algorithm masks."""
    lengths = np.asarray(lengths, np.int64)
    batch = lengths.shape[0]
    positions = np.arange(max_tokens)
    n_pred = num_to_mask(lengths, mask_prob, max_masks)
    is_candidate = (positions >= 1) & (positions < lengths[:, None])
    order = np.argsort(np.where(is_candidate, rng.random((batch, max_tokens)), 2.0), axis=1)
    use_span = rng.random((batch, max_tokens)) < skipgram_prob
    span_len = np.where(use_span, rng.integers(2, skipgram_max + 1, (batch, max_tokens)), 1)
    masked = np.zeros((batch, max_tokens), bool)
    count = np.zeros(batch, np.int64)
    rows = np.arange(batch)
    for k in range(max_tokens - 1):
        start = order[:, k]
        active = (k < lengths - 1) & (count < n_pred) & ~masked[rows, start]
        if not active.any():
            if not ((k < lengths - 1) & (count < n_pred)).any():
                break
            continue
        end = np.minimum(start + span_len[:, k], lengths)
        masked |= active[:, None] & (positions >= start[:, None]) & (positions < end[:, None])
        count = masked.sum(axis=1)
    over = count > n_pred
    if over.any():
        keys = np.where(masked, rng.random((batch, max_tokens)), 2.0)
        rank = np.argsort(np.argsort(keys, axis=1), axis=1)
        masked = np.where(over[:, None], masked & (rank < n_pred[:, None]), masked)
    return masked


def mask_batch(text_ids, text_atts, rng: np.random.Generator, *, vocab_size: int, mask_id: int,
               mask_prob: float, max_masks: int, skipgram_prob: float = 0.2, skipgram_max: int = 3):
    """Reference masking of padded ``<s> ... </s>`` rows (see the module docstring).

    text_ids, text_atts: int (B, L). Returns text_ids_masked (B, L), masked_pos (B, max_masks),
    masked_ids (B, max_masks), all int32. Work is done on the longest row's width only.
    """
    text_ids = np.asarray(text_ids, np.int32)
    batch, max_tokens = text_ids.shape
    lengths = np.asarray(text_atts).sum(axis=1)
    width = max(int(lengths.max(initial=0)), 2)
    ids = text_ids[:, :width]
    masked = select_mask_positions(
        lengths, rng, max_tokens=width, mask_prob=mask_prob, max_masks=max_masks,
        skipgram_prob=skipgram_prob, skipgram_max=skipgram_max)
    to_mask = rng.random((batch, width)) < 0.8
    to_random = rng.random((batch, width)) < 0.5
    random_ids = rng.integers(0, vocab_size, (batch, width))
    replaced = np.where(to_mask, mask_id, np.where(to_random, random_ids, ids))
    text_ids_masked = text_ids.copy()
    text_ids_masked[:, :width] = np.where(masked, replaced, ids)

    order = np.argsort(~masked, axis=1, kind="stable")[:, :max_masks]
    valid = np.take_along_axis(masked, order, axis=1)
    masked_pos = np.where(valid, order, 0).astype(np.int32)
    masked_ids = np.where(valid, np.take_along_axis(ids, order, axis=1), IGNORE_ID).astype(np.int32)
    pad = max_masks - masked_pos.shape[1]
    masked_pos = np.pad(masked_pos, ((0, 0), (0, pad)))
    masked_ids = np.pad(masked_ids, ((0, 0), (0, pad)), constant_values=IGNORE_ID)
    return text_ids_masked, masked_pos, masked_ids
