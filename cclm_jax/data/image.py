"""Image preprocessing: host-side tf.data ops producing uint8, device-side normalisation.

Host side (TensorFlow graph ops, usable inside ``tf.data`` maps, deterministic through
stateless seeds of shape (2,) int32/int64):

* ``decode_image(data)`` -- encoded bytes (JPEG/PNG/BMP/GIF) -> uint8 (H, W, 3).
* ``train_image(data, seed, size, scale)`` -- the reference pre-training transform:
  RandomResizedCrop(size, scale, ratio 3/4..4/3, bicubic) -> horizontal flip (p 0.5) ->
  RandomAugment(2, 7) over ``PRETRAIN_AUGMENTS``; uint8 (size, size, 3).
  Fine-tuning uses the same function with ``scale=(0.5, 1.0)`` and ``size=384``.
* ``eval_image(data, size)`` -- Resize((size, size), bicubic); uint8 (size, size, 3).
* ``random_augment(image, seed)`` and the individual ops follow the reference's cv2-based
  ``RandomAugment`` (each op is a re-derivation of its documented PIL-equivalent semantics):
  two ops drawn uniformly with replacement, each applied with probability 0.5 at level 7 of 10:
  enhance factor 1.36, shear +-0.21, translate +-7 px, rotate +-21 degrees, fill value 128.
  Affine ops use bilinear sampling with pixel centres on integer coordinates (as cv2).
  Sharpness clips to [0, 255] before the uint8 cast (the reference wraps around on overflow).

Device side (JAX): ``normalize(images)`` uint8 NHWC -> float32 NHWC, ``(x / 255 - mean) / std``
with the CLIP statistics.

``is_decodable(data)`` runs the same decoder eagerly; builders call it to skip and count
corrupt images at build time, so the training pipeline never meets an undecodable image.
"""
import math

import jax.numpy as jnp
import numpy as np
import tensorflow as tf

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FILL_VALUE = 128.0
MAX_LEVEL = 10.0
PRETRAIN_AUGMENTS = (
    "identity", "auto_contrast", "equalize", "brightness", "sharpness",
    "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
)
REGION_AUGMENTS = ("identity", "auto_contrast", "equalize", "brightness", "sharpness")


def normalize(images):
    """uint8 (N, H, W, 3) NHWC -> float32 (N, H, W, 3) normalised with the CLIP mean/std."""
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    mean = jnp.asarray(CLIP_MEAN, jnp.float32)
    std = jnp.asarray(CLIP_STD, jnp.float32)
    return (x - mean) / std


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
    """(height, width) int32 of encoded bytes; reads only the header for JPEG."""
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


def _resize_uint8(image, size):
    """Bicubic (Keys a=-0.5, antialiased like PIL) resize to (size, size); uint8 out."""
    out = tf.image.resize(tf.cast(image, tf.float32), (size, size), method="bicubic", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


# ----------------------------------------------------------------------------- crop

def random_resized_crop_window(shape_hw, seed, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """torchvision RandomResizedCrop box: [top, left, height, width] int32.

    Up to ``attempts`` draws of (area fraction ~ U(scale), log aspect ~ U(log ratio)); the first
    that fits is taken, else the centre crop clamped to ``ratio``.
    """
    height = tf.cast(shape_hw[0], tf.float32)
    width = tf.cast(shape_hw[1], tf.float32)
    seeds = tf.random.experimental.stateless_split(seed, 3)
    area = height * width * tf.random.stateless_uniform([attempts], seeds[0], scale[0], scale[1])
    log_ratio = tf.random.stateless_uniform([attempts], seeds[1], math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.exp(log_ratio)
    w = tf.round(tf.sqrt(area * aspect))
    h = tf.round(tf.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32))
    offsets = tf.random.stateless_uniform([2], seeds[2])

    def sampled():
        ch, cw = h[first], w[first]
        top = tf.floor(offsets[0] * (height - ch + 1))
        left = tf.floor(offsets[1] * (width - cw + 1))
        return tf.cast(tf.stack([top, left, ch, cw]), tf.int32)

    def centre():
        in_ratio = width / height
        cw = tf.where(in_ratio < ratio[0], width,
                      tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width))
        ch = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
        top = tf.math.floordiv(height - ch, 2.0)
        left = tf.math.floordiv(width - cw, 2.0)
        return tf.cast(tf.stack([top, left, ch, cw]), tf.int32)

    return tf.cond(tf.reduce_any(fits), sampled, centre)


# ----------------------------------------------------------------------------- RandomAugment ops
# Every op maps a uint8 (H, W, 3) image to a uint8 (H, W, 3) image.

def _apply_lut(image, lut):
    """Per-channel lookup: lut int32 (3, 256)."""
    flat = tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32)
    return tf.cast(tf.gather(tf.reshape(lut, [-1]), flat), tf.uint8)


def identity(image):
    return image


def auto_contrast(image):
    """PIL ImageOps.autocontrast (cutoff 0): stretch each channel's [min, max] to [0, 255]."""
    pixels = tf.cast(tf.reshape(image, [-1, 3]), tf.float64)
    low = tf.reduce_min(pixels, axis=0)[:, None]
    high = tf.reduce_max(pixels, axis=0)[:, None]
    values = tf.range(256, dtype=tf.float64)[None, :]
    scale = 255.0 / tf.maximum(high - low, 1.0)
    stretched = tf.clip_by_value(values * scale - low * scale, 0.0, 255.0)
    lut = tf.where(high > low, stretched, values)
    return _apply_lut(image, tf.cast(lut, tf.int32))


def equalize(image):
    """PIL ImageOps.equalize: per-channel histogram equalisation with PIL's step rule."""
    flat = tf.cast(tf.reshape(image, [-1, 3]), tf.int32) + tf.constant([0, 256, 512], tf.int32)
    hist = tf.reshape(tf.math.bincount(tf.reshape(flat, [-1]), minlength=768, maxlength=768), [3, 256])
    top_value = tf.reduce_max(tf.cast(tf.reshape(image, [-1, 3]), tf.int32), axis=0)
    top_count = tf.gather(hist, top_value, batch_dims=1)
    step = (tf.reduce_sum(hist, axis=1) - top_count) // 255
    safe_step = tf.maximum(step, 1)[:, None]
    before = tf.cumsum(hist, axis=1, exclusive=True)
    lut = tf.clip_by_value((safe_step // 2 + before) // safe_step, 0, 255)
    lut = tf.where(step[:, None] > 0, lut, tf.range(256)[None, :])
    return _apply_lut(image, lut)


def brightness(image, factor):
    """Scale pixel values by ``factor`` (float32 table, clipped, truncated to uint8)."""
    lut = tf.cast(tf.clip_by_value(tf.range(256, dtype=tf.float32) * factor, 0.0, 255.0), tf.int32)
    return _apply_lut(image, tf.tile(lut[None, :], [3, 1]))


def sharpness(image, factor):
    """Blend with the 3x3 smoothing kernel [[1,1,1],[1,5,1],[1,1,1]]/13; border pixels kept."""
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    x = tf.cast(image, tf.float32)
    smooth = tf.round(tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "VALID")[0])
    inner = x[1:-1, 1:-1]
    blended = tf.clip_by_value(smooth + factor * (inner - smooth), 0.0, 255.0)
    out = tf.pad(blended, [[1, 1], [1, 1], [0, 0]]) + x - tf.pad(inner, [[1, 1], [1, 1], [0, 0]])
    return tf.cast(out, tf.uint8)


def _warp(image, transform):
    """Bilinear warp; ``transform`` [a0, a1, a2, b0, b1, b2] maps output (x, y) to input
    (a0 x + a1 y + a2, b0 x + b1 y + b2); outside pixels read FILL_VALUE."""
    transform = tf.concat([tf.cast(transform, tf.float32), tf.zeros([2], tf.float32)], 0)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[None], transforms=transform[None],
        output_shape=tf.shape(image)[:2], fill_value=FILL_VALUE,
        interpolation="BILINEAR", fill_mode="CONSTANT")[0]
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def shear_x(image, factor):
    """Output (x, y) reads input (x - factor * y, y)."""
    return _warp(image, tf.stack([1.0, -factor, 0.0, 0.0, 1.0, 0.0]))


def shear_y(image, factor):
    """Output (x, y) reads input (x, y - factor * x)."""
    return _warp(image, tf.stack([1.0, 0.0, 0.0, -factor, 1.0, 0.0]))


def translate_x(image, offset):
    """Output (x, y) reads input (x + offset, y): content moves left by ``offset`` px."""
    return _warp(image, tf.stack([1.0, 0.0, offset, 0.0, 1.0, 0.0]))


def translate_y(image, offset):
    """Output (x, y) reads input (x, y + offset): content moves up by ``offset`` px."""
    return _warp(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, offset]))


def rotate(image, degrees):
    """Rotate counter-clockwise by ``degrees`` about (W / 2, H / 2), like cv2.getRotationMatrix2D."""
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    cx, cy = w / 2.0, h / 2.0
    theta = degrees * (math.pi / 180.0)
    c, s = tf.cos(theta), tf.sin(theta)
    return _warp(image, tf.stack([c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy]))


def _augment_op(name, image, magnitude, sign):
    """Apply op ``name`` at ``magnitude`` (0..10); ``sign`` (+-1.0) flips geometric ops."""
    level = magnitude / MAX_LEVEL
    if name == "identity":
        return identity(image)
    if name == "auto_contrast":
        return auto_contrast(image)
    if name == "equalize":
        return equalize(image)
    if name == "brightness":
        return brightness(image, level * 1.8 + 0.1)
    if name == "sharpness":
        return sharpness(image, level * 1.8 + 0.1)
    if name == "shear_x":
        return shear_x(image, sign * level * 0.3)
    if name == "shear_y":
        return shear_y(image, sign * level * 0.3)
    if name == "translate_x":
        return translate_x(image, sign * level * 10.0)
    if name == "translate_y":
        return translate_y(image, sign * level * 10.0)
    if name == "rotate":
        return rotate(image, sign * level * 30.0)
    raise ValueError(f"unknown RandomAugment op {name!r}; expected one of {PRETRAIN_AUGMENTS}")


def random_augment(image, seed, num_ops=2, magnitude=7, ops=PRETRAIN_AUGMENTS):
    """RandomAugment(N=num_ops, M=magnitude): ``num_ops`` ops drawn uniformly with replacement
    from ``ops``, each applied with probability 0.5, geometric ones with a random sign.
    uint8 (H, W, 3) -> uint8 (H, W, 3)."""
    seeds = tf.random.experimental.stateless_split(seed, 3)
    choice = tf.random.stateless_uniform([num_ops], seeds[0], 0, len(ops), dtype=tf.int32)
    apply = tf.random.stateless_uniform([num_ops], seeds[1]) < 0.5
    sign = tf.where(tf.random.stateless_uniform([num_ops], seeds[2]) < 0.5, -1.0, 1.0)
    for k in range(num_ops):
        branches = [
            (lambda name=name, k=k, img=image: _augment_op(name, img, float(magnitude), sign[k]))
            for name in ops
        ]
        skipped = lambda img=image: img  # noqa: E731
        index = tf.where(apply[k], choice[k], len(ops))
        image = tf.ensure_shape(tf.switch_case(index, branches + [skipped]), image.shape)
    return image


# ----------------------------------------------------------------------------- transforms

def train_image(data, seed, size=224, scale=(0.2, 1.0), augment=True):
    """Reference training transform of encoded bytes -> uint8 (size, size, 3).

    RandomResizedCrop(size, scale) -> horizontal flip p 0.5 -> RandomAugment(2, 7) when
    ``augment``. Only the crop window of a JPEG is decoded.
    """
    seeds = tf.random.experimental.stateless_split(seed, 3)
    window = random_resized_crop_window(_image_shape(data), seeds[0], scale)
    image = _resize_uint8(_decode_window(data, window), size)
    image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    image = tf.ensure_shape(image, (size, size, 3))
    if augment:
        image = random_augment(image, seeds[2])
    return image


def eval_image(data, size=224):
    """Evaluation transform: Resize((size, size), bicubic) of encoded bytes -> uint8 (size, size, 3)."""
    return tf.ensure_shape(_resize_uint8(decode_image(data), size), (size, size, 3))


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) numpy -> PNG bytes (used by generated datasets and tests)."""
    return tf.io.encode_png(tf.constant(image, tf.uint8)).numpy()
