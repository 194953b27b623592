"""Test-only batch builders of the fine-tuning tasks: images read one by one, eagerly (an independent path from
the tf.data input of `cclm_jax.data.finetune_input`, which the package uses), and whole batches of examples."""
from collections.abc import Sequence

import numpy as np

from cclm_jax.data.finetune_input import encode_texts, vqa_targets
from cclm_jax.data.iglue import ImagePairExample, NLIExample, VQAExample
from cclm_jax.data.tokenizer import Tokenizer


def load_images(paths: Sequence[str], image_res: int) -> np.ndarray:
    """Image files -> uint8 (N, image_res, image_res, 3), bicubic resize (the reference's test transform)."""
    import tensorflow as tf

    from cclm_jax.data.image import eval_image

    out = np.empty((len(paths), image_res, image_res, 3), np.uint8)
    for i, path in enumerate(paths):
        try:
            data = tf.io.read_file(path)
        except tf.errors.NotFoundError:
            raise FileNotFoundError(f"image {path!r} does not exist") from None
        out[i] = eval_image(data, image_res).numpy()
    return out


def nli_batch(examples: Sequence[NLIExample], tokenizer: Tokenizer, *, image_res: int, max_tokens: int,
              max_words: int) -> dict[str, np.ndarray]:
    """XVNLI batch: image, hypothesis ids/atts, label."""
    ids, atts = encode_texts(tokenizer, [e.hypothesis for e in examples], max_tokens=max_tokens,
                             max_words=max_words)
    return {"image": load_images([e.image_path for e in examples], image_res), "text_ids": ids,
            "text_atts": atts, "label": np.array([e.label for e in examples], np.int32)}


def image_pair_batch(examples: Sequence[ImagePairExample], tokenizer: Tokenizer, *, image_res: int,
                     max_tokens: int, max_words: int) -> dict[str, np.ndarray]:
    """MaRVL / NLVR2 batch: left and right images, statement ids/atts, label."""
    ids, atts = encode_texts(tokenizer, [e.sentence for e in examples], max_tokens=max_tokens,
                             max_words=max_words)
    return {"image": load_images([e.image_paths[0] for e in examples], image_res),
            "image_2": load_images([e.image_paths[1] for e in examples], image_res),
            "text_ids": ids, "text_atts": atts, "label": np.array([e.label for e in examples], np.int32)}


def vqa_batch(examples: Sequence[VQAExample], tokenizer: Tokenizer, *, image_res: int, max_tokens: int,
              max_words: int, max_answers: int, answer_tokens: int) -> dict[str, np.ndarray]:
    """xGQA training batch: `vqa_targets` and the images."""
    targets = vqa_targets(examples, tokenizer, max_tokens=max_tokens, max_words=max_words,
                          max_answers=max_answers, answer_tokens=answer_tokens)
    return {"image": load_images([e.image_path for e in examples], image_res), **targets}
