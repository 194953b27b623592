"""Image preprocessing: host-side tf.data ops producing uint8, device-side normalisation.

Host side (TensorFlow graph functions for ``tf.data`` maps; randomness from stateless seeds,
int32/int64 tensors of shape (2,), so the same seed gives the same pixels):

* ``decode_image(data)``: encoded bytes (JPEG/PNG/BMP/GIF) -> uint8 (H, W, 3).
* The reference training transform is ``crop_resize_flip(data, uniforms, size, scale)``
  (RandomResizedCrop(size, scale, ratio 3/4..4/3, bicubic) -> horizontal flip (p 0.5), driven by
  ``TRAIN_UNIFORMS`` U(0, 1) numbers) then RandomAugment(2, 7) over
  ``randaugment.PRETRAIN_AUGMENTS``; uint8 (size, size, 3). Pre-training: ``size=224,
  scale=(0.2, 1.0)``; fine-tuning: ``size=384, scale=(0.5, 1.0)``. Only the crop window of a
  JPEG is decoded. Bicubic = Keys a=-0.5, antialiased when shrinking (PIL's filter, which
  torchvision uses on PIL images).
* ``eval_image(data, size)``: Resize((size, size), bicubic); uint8 (size, size, 3).
* ``random_augment(image, seed)``: draws 2 ops uniformly with replacement, an apply flag
  (p 0.5) and a direction (+-1) for each (``random_augment_draws``), then runs them with
  OpenCV on the host (``randaugment.random_augment_numpy``). The training pipeline makes the
  draws per example and runs the ops once per batch (one host call instead of one per image).

Device side (JAX, `cclm_jax.data.normalize`, re-exported here): ``normalize(images)``: uint8 (N, H, W, 3) ->
float32 (N, H, W, 3) as ``(x / 255 - mean) / std`` with the CLIP statistics; ``prepare_batch(batch)`` normalises a
batch's uint8 images.

``is_decodable(data)`` runs the same decoder eagerly; builders use it to skip and count
undecodable images at build time, so training never meets one.
"""
import math

import numpy as np
import tensorflow as tf

from cclm_jax.data import randaugment
from cclm_jax.data.normalize import CLIP_MEAN, CLIP_STD, normalize, prepare_batch  # noqa: F401

# ----------------------------------------------------------------------------- decoding

def decode_image(data):
    """Encoded image bytes (scalar tf.string) -> uint8 (H, W, 3); grey/RGBA become RGB."""
    return tf.io.decode_image(data, channels=3, expand_animations=False)


def is_decodable(data: bytes) -> bool:
    """True when ``decode_image`` succeeds on ``data`` and yields a non-empty image (eager)."""
    if not data:
        return False
    try:
        image = decode_image(tf.constant(data, tf.string))
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
        return False
    return bool(image.shape[0] > 0 and image.shape[1] > 0)


def _image_shape(data):
    """(height, width) int32 of encoded bytes; reads only the header of a JPEG."""
    return tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.extract_jpeg_shape(data)[:2],
        lambda: tf.shape(decode_image(data))[:2],
    )


def _decode_window(data, window):
    """Decode only ``window`` = [top, left, height, width] (int32) of the image."""
    return tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_and_crop_jpeg(data, window, channels=3),
        lambda: tf.image.crop_to_bounding_box(
            decode_image(data), window[0], window[1], window[2], window[3]),
    )


def resize_bicubic(image, size):
    """uint8 (H, W, 3) -> uint8 (size, size, 3); Keys a=-0.5 bicubic, antialiased when shrinking."""
    shrinks = tf.reduce_any(tf.shape(image)[:2] > size)
    out = tf.cond(
        shrinks,
        lambda: tf.image.resize(image, (size, size), method="bicubic", antialias=True),
        lambda: tf.image.resize(image, (size, size), method="bicubic", antialias=False),
    )
    return tf.saturate_cast(tf.round(out), tf.uint8)


# ----------------------------------------------------------------------------- random ops

CROP_ATTEMPTS = 10
CROP_UNIFORMS = 2 * CROP_ATTEMPTS + 2  # area and aspect per attempt, then top and left
TRAIN_UNIFORMS = CROP_UNIFORMS + 1  # ... then the flip


def crop_window(shape_hw, uniforms, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop box [top, left, height, width] (int32) for an image of
    ``shape_hw`` from ``CROP_UNIFORMS`` U(0, 1) numbers: the first of ``CROP_ATTEMPTS`` draws
    (area fraction ~ U(scale), log aspect ~ U(log ratio), rounded sides) that fits, with a
    uniform offset, else the centre crop clamped to ``ratio``."""
    height = tf.cast(shape_hw[0], tf.float32)
    width = tf.cast(shape_hw[1], tf.float32)
    n = CROP_ATTEMPTS
    area = height * width * (scale[0] + (scale[1] - scale[0]) * uniforms[:n])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_low + (log_high - log_low) * uniforms[n:2 * n])
    w = tf.round(tf.sqrt(area * aspect))
    h = tf.round(tf.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32))
    offsets = uniforms[2 * n:2 * n + 2]

    def sampled():
        ch, cw = h[first], w[first]
        top = tf.floor(offsets[0] * (height - ch + 1))
        left = tf.floor(offsets[1] * (width - cw + 1))
        return tf.cast(tf.stack([top, left, ch, cw]), tf.int32)

    def centre():
        in_ratio = width / height
        cw = tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
        ch = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
        top = tf.math.floordiv(height - ch, 2.0)
        left = tf.math.floordiv(width - cw, 2.0)
        return tf.cast(tf.stack([top, left, ch, cw]), tf.int32)

    return tf.cond(tf.reduce_any(fits), sampled, centre)


def random_resized_crop_window(shape_hw, seed, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """``crop_window`` with its uniforms drawn from the stateless ``seed``."""
    return crop_window(shape_hw, tf.random.stateless_uniform([CROP_UNIFORMS], seed), scale, ratio)


def random_augment_draws(seed, num_ops=2, num_choices=len(randaugment.PRETRAIN_AUGMENTS)):  # noqa: B008 (an int)
    """(op_ids int32 (num_ops,), apply bool (num_ops,), signs float32 (num_ops,)): ops drawn
    uniformly with replacement, each applied with p 0.5, direction +-1 with p 0.5."""
    seeds = tf.random.experimental.stateless_split(seed, 3)
    op_ids = tf.random.stateless_uniform([num_ops], seeds[0], 0, num_choices, dtype=tf.int32)
    apply = tf.random.stateless_uniform([num_ops], seeds[1]) < 0.5
    signs = tf.where(tf.random.stateless_uniform([num_ops], seeds[2]) < 0.5, -1.0, 1.0)
    return op_ids, apply, signs


def random_augment(image, seed, num_ops=2, magnitude=7, ops=randaugment.PRETRAIN_AUGMENTS):
    """RandomAugment(num_ops, magnitude) of a uint8 (H, W, 3) tensor -> uint8 (H, W, 3)."""
    op_ids, apply, signs = random_augment_draws(seed, num_ops, len(ops))

    def run(img, ids, flags, directions):
        return randaugment.random_augment_numpy(img, ids, flags, directions, float(magnitude), ops)

    out = tf.numpy_function(run, [image, op_ids, apply, signs], tf.uint8, stateful=False)
    return tf.ensure_shape(out, image.shape)


# ----------------------------------------------------------------------------- transforms

def crop_resize_flip(data, uniforms, size=224, scale=(0.2, 1.0)):
    """RandomResizedCrop(size, scale) then horizontal flip of encoded bytes, driven by
    ``TRAIN_UNIFORMS`` U(0, 1) numbers (crop, then flip when the last one is < 0.5);
    uint8 (size, size, 3). Only the crop window of a JPEG is decoded."""
    window = crop_window(_image_shape(data), uniforms[:CROP_UNIFORMS], scale)
    image = resize_bicubic(_decode_window(data, window), size)
    image = tf.cond(uniforms[CROP_UNIFORMS] < 0.5, lambda: tf.reverse(image, [1]), lambda: image)
    return tf.ensure_shape(image, (size, size, 3))


def eval_image(data, size=224):
    """Evaluation transform: Resize((size, size), bicubic) of encoded bytes -> uint8 (size, size, 3)."""
    return tf.ensure_shape(resize_bicubic(decode_image(data), size), (size, size, 3))


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) numpy -> PNG bytes."""
    return tf.io.encode_png(tf.constant(image, tf.uint8)).numpy()
