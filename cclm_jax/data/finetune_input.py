"""Fine-tuning input: the training batches of every step (exactly resumable from the step number) and the
evaluation images, both through tf.data (images decoded and transformed in parallel, in order).

Training order: epoch e visits the rows in `numpy.random.default_rng([seed, e]).permutation(N)`, in
`steps_per_epoch = ceil(N / B)` global batches of B rows; the last batch is filled up with the epoch's first
rows marked `valid = False` (left out of the losses). Step s is batch `s % steps_per_epoch` of epoch
`s // steps_per_epoch`, whatever step the run (re)started from; process p of P takes rows
[p B/P, (p+1) B/P) of every global batch.

Training images: the reference fine-tuning transform (spec §3.4): RandomResizedCrop(res, scale 0.5-1,
bicubic), horizontal flip (p 0.5), RandomAugment(2, 7); xGQA flips only questions and answers without
'left' / 'right' (as the reference's dataset); `data.augment = False` keeps only the evaluation resize. The
random numbers of a row come from the stateless seed (train.seed, row position in the run), so a resumed run
sees the same pixels. Evaluation images: Resize((res, res), bicubic).

Batches are host numpy dicts in the layout of `cclm_jax.tasks.definitions` (uint8 NHWC images), plus `valid`.
Image sources are files or, for WIT lines carrying the reference's preprocessed `image_content`, base64 text.
Texts: `encode_texts` (captions, hypotheses, statements; questions with `text.pre_question`), and for xGQA
`vqa_targets` / `answer_candidates`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from cclm_jax.data.finetune_data import RetrievalPair
from cclm_jax.data.iglue import ImagePairExample, NLIExample, VQAExample
from cclm_jax.data.retrieval_sets import RetrievalImage
from cclm_jax.data.text import pad_batch, pre_caption, pre_question
from cclm_jax.data.tokenizer import Tokenizer

FINETUNE_CROP_SCALE = (0.5, 1.0)
_NO_FLIP_WORDS = ("left", "right")


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    return math.ceil(num_rows / global_batch)


def image_source(image: RetrievalImage | str) -> tuple[str, bool]:
    """(path or base64 text, is_base64) of an image."""
    if isinstance(image, RetrievalImage):
        return (image.image_b64, True) if image.image_b64 is not None else (image.image_path, False)
    return image, False


# ------------------------------------------------------------------------------------------------ tf.data

def _read(tf, source, is_b64):
    """Encoded bytes of a file path or of base64 text (standard alphabet, padded or not)."""
    def decode_b64():
        web_safe = tf.strings.regex_replace(tf.strings.regex_replace(source, r"\+", "-"), "/", "_")
        return tf.io.decode_base64(tf.strings.regex_replace(web_safe, "=", ""))

    return tf.cond(is_b64, decode_b64, lambda: tf.io.read_file(source))


def _image_dataset(sources: Sequence[tuple[str, bool]], res: int, *, seeds: np.ndarray | None = None,
                   flips: np.ndarray | None = None):
    """tf.data of uint8 (res, res, 3) images in `sources` order: the training transform when `seeds` (N, 2)
    int64 are given (`flips` (N,) bool allows the flip), else the evaluation resize."""
    import tensorflow as tf

    from cclm_jax.data import image as image_ops

    paths = tf.constant([s for s, _ in sources], tf.string)
    is_b64 = tf.constant([b for _, b in sources], tf.bool)
    if seeds is None:
        ds = tf.data.Dataset.from_tensor_slices((paths, is_b64))
        return ds.map(lambda p, b: image_ops.eval_image(_read(tf, p, b), res),
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def train(p, b, seed, flip):
        data = _read(tf, p, b)
        crop_seed, augment_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        uniforms = tf.random.stateless_uniform([image_ops.TRAIN_UNIFORMS], crop_seed)
        uniforms = tf.where(flip, uniforms, tf.tensor_scatter_nd_update(uniforms, [[image_ops.CROP_UNIFORMS]], [1.0]))
        image = image_ops.crop_resize_flip(data, uniforms, res, FINETUNE_CROP_SCALE)
        return image_ops.random_augment(image, augment_seed)

    ds = tf.data.Dataset.from_tensor_slices((paths, is_b64, tf.constant(seeds, tf.int64), tf.constant(flips)))
    return ds.map(train, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def load_images(sources: Sequence[tuple[str, bool]], res: int, batch: int = 64) -> np.ndarray:
    """Evaluation images, uint8 (N, res, res, 3), decoded in parallel."""
    if not sources:
        return np.zeros((0, res, res, 3), np.uint8)
    parts = [np.asarray(x) for x in _image_dataset(sources, res).batch(batch).as_numpy_iterator()]
    return np.concatenate(parts)


def eval_image_batches(sources: Sequence[tuple[str, bool]], res: int, batch: int) -> Iterator[np.ndarray]:
    """Evaluation images in batches of `batch` (the last one may be shorter), in order."""
    yield from _image_dataset(sources, res).batch(batch).prefetch(2).as_numpy_iterator()


# ------------------------------------------------------------------------------------------------ texts

def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], *, max_tokens: int, max_words: int,
                 clean: Callable[[str, int], str] = pre_caption) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (ids, atts) int32 (N, max_tokens): `clean`ed, `<s> ... </s>`, padded with `<pad>`."""
    return pad_batch(tokenizer.encode_batch([clean(t, max_words) for t in texts]), max_tokens)


def answer_candidates(answers: Sequence[str], tokenizer: Tokenizer,
                      answer_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Answers -> `<s> answer </s>` (ids, atts) int32 (A, answer_tokens); an answer that does not fit is an
    error (it would be scored on a truncated sequence)."""
    pieces = tokenizer.encode_batch(list(answers))
    for answer, ids in zip(answers, pieces):
        if len(ids) + 2 > answer_tokens:
            raise ValueError(f"answer {answer!r} needs {len(ids) + 2} tokens with <s> </s>; "
                             f"answer_tokens is {answer_tokens}")
    return pad_batch(pieces, answer_tokens)


def vqa_targets(examples: Sequence[VQAExample], tokenizer: Tokenizer, *, max_tokens: int, max_words: int,
                max_answers: int, answer_tokens: int) -> dict[str, np.ndarray]:
    """xGQA training fields without the image: question ids/atts, up to `max_answers` answers per question,
    each weighted 1 / (number of answers of the question) as the reference; padding answers get weight 0."""
    ids, atts = encode_texts(tokenizer, [e.question for e in examples], max_tokens=max_tokens,
                             max_words=max_words, clean=pre_question)
    b = len(examples)
    answer_ids = np.zeros((b, max_answers, answer_tokens), np.int32)
    answer_atts = np.zeros((b, max_answers, answer_tokens), np.int32)
    weights = np.zeros((b, max_answers), np.float32)
    for i, example in enumerate(examples):
        if not example.answers:
            raise ValueError(f"question {example.question_id!r} has no answer to train on")
        if len(example.answers) > max_answers:
            raise ValueError(f"question {example.question_id!r} has {len(example.answers)} answers; "
                             f"max_answers is {max_answers}")
        n = len(example.answers)
        answer_ids[i, :n], answer_atts[i, :n] = answer_candidates(example.answers, tokenizer, answer_tokens)
        weights[i, :n] = 1.0 / n
    return {"text_ids": ids, "text_atts": atts, "answer_ids": answer_ids, "answer_atts": answer_atts,
            "answer_weights": weights}


# ------------------------------------------------------------------------------------------------ rows

def _allows_flip(example: VQAExample) -> bool:
    words = " ".join((example.question,) + example.answers)
    return not any(w in words for w in _NO_FLIP_WORDS)


def row_images(task: str, row) -> list[tuple[str, bool]]:
    """The image sources of one training row (two for MaRVL / NLVR2)."""
    if isinstance(row, RetrievalPair):
        return [image_source(row.image)]
    if isinstance(row, ImagePairExample):
        return [image_source(p) for p in row.image_paths]
    if isinstance(row, (NLIExample, VQAExample)):
        return [image_source(row.image_path)]
    raise TypeError(f"{task}: unexpected training row {type(row).__name__}")


def text_fields(task: str, rows: Sequence, tokenizer: Tokenizer, *, max_tokens: int, max_words: int,
                max_answers: int = 0, answer_tokens: int = 0) -> dict[str, np.ndarray]:
    """The non-image fields of a batch of training rows (see `cclm_jax.tasks.definitions` for the layout)."""
    if task == "retrieval":
        ids, atts = encode_texts(tokenizer, [r.caption for r in rows], max_tokens=max_tokens, max_words=max_words)
        return {"text_ids": ids, "text_atts": atts, "idx": np.array([r.image_index for r in rows], np.int32)}
    if task == "xgqa":
        return vqa_targets(rows, tokenizer, max_tokens=max_tokens, max_words=max_words, max_answers=max_answers,
                           answer_tokens=answer_tokens)
    texts = [r.hypothesis if isinstance(r, NLIExample) else r.sentence for r in rows]
    ids, atts = encode_texts(tokenizer, texts, max_tokens=max_tokens, max_words=max_words)
    return {"text_ids": ids, "text_atts": atts, "label": np.array([r.label for r in rows], np.int32)}


# ------------------------------------------------------------------------------------------------ training

class TrainBatches:
    """The training batches of a run: `batches(start_step)` yields host batches from `start_step` on.

    rows: the training rows; global_batch: B (divisible by `process_count`); seed: `train.seed`;
    text: keyword arguments of `text_fields` (max_tokens, max_words, and for xGQA max_answers, answer_tokens).
    image_features: an object whose `lookup(sources)` gives the (N, T, D) image-tower outputs of image sources
    (`tasks.locked_tower.ImageFeatures`): batches then carry `image_embeds` instead of `image` pixels (one image
    per row, no augmentation).
    """

    def __init__(self, task: str, rows: Sequence, tokenizer: Tokenizer, *, global_batch: int, image_res: int,
                 seed: int, augment: bool = True, process_index: int = 0, process_count: int = 1,
                 image_features=None, **text):
        if global_batch % process_count:
            raise ValueError(f"config.train.batch_size {global_batch} is not divisible by the {process_count} "
                             "processes")
        if image_features is not None and (augment or task == "marvl"):
            raise ValueError("cached image-tower features need one image per row and data.augment = False")
        self.image_features = image_features
        self.task, self.rows, self.tokenizer = task, list(rows), tokenizer
        self.global_batch, self.image_res, self.seed, self.augment = global_batch, image_res, seed, augment
        self.host_batch = global_batch // process_count
        self.process_index, self.text = process_index, text
        self.steps_per_epoch = steps_per_epoch(len(self.rows), global_batch)
        self.images_per_row = 2 if task == "marvl" else 1

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, valid) of an epoch, steps_per_epoch x B of them (the tail refilled, invalid)."""
        n = len(self.rows)
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        total = self.steps_per_epoch * self.global_batch
        padded = np.concatenate([order, np.resize(order, total - n)]) if total > n else order
        return padded, np.arange(total) < n

    def _host_rows(self, epoch: int, first_batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This host's (row indices, valid, global row positions) from batch `first_batch` to the epoch end."""
        order, valid = self.epoch_order(epoch)
        b, h = self.global_batch, self.host_batch
        batches = np.arange(first_batch, self.steps_per_epoch)
        local = (batches[:, None] * b + self.process_index * h + np.arange(h)[None, :]).reshape(-1)
        positions = epoch * self.steps_per_epoch * b + local
        return order[local], valid[local], positions

    def batches(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
        """Host batches of steps start_step, start_step + 1, ... (endless; the loop stops)."""
        epoch, first = divmod(start_step, self.steps_per_epoch)
        while True:
            yield from self._epoch_batches(epoch, first)
            epoch, first = epoch + 1, 0

    def _epoch_batches(self, epoch: int, first_batch: int) -> Iterator[dict[str, np.ndarray]]:
        index, valid, positions = self._host_rows(epoch, first_batch)
        rows = [self.rows[i] for i in index]
        sources = [s for r in rows for s in row_images(self.task, r)]
        k = self.images_per_row
        if self.image_features is not None:
            yield from self._feature_batches(rows, sources, valid)
            return
        if self.augment:
            seeds = np.stack([np.full(len(sources), self.seed, np.int64),
                              np.repeat(positions * k, k) + np.tile(np.arange(k), len(rows))], axis=1)
            flips = np.array([_allows_flip(r) if self.task == "xgqa" else True for r in rows for _ in range(k)])
            images = _image_dataset(sources, self.image_res, seeds=seeds, flips=flips)
        else:
            images = _image_dataset(sources, self.image_res)
        images = images.batch(self.host_batch * k).prefetch(2).as_numpy_iterator()
        for j, pixels in enumerate(images):
            chunk = slice(j * self.host_batch, (j + 1) * self.host_batch)
            batch = text_fields(self.task, rows[chunk], self.tokenizer, **self.text)
            if k == 2:
                batch.update(image=pixels[0::2], image_2=pixels[1::2])
            else:
                batch["image"] = pixels
            batch["valid"] = valid[chunk]
            yield batch

    def _feature_batches(self, rows: list, sources: list, valid: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(rows), self.host_batch):
            chunk = slice(start, start + self.host_batch)
            batch = text_fields(self.task, rows[chunk], self.tokenizer, **self.text)
            batch["image_embeds"] = self.image_features.lookup(sources[chunk])
            batch["valid"] = valid[chunk]
            yield batch
