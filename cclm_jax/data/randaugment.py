"""RandomAugment ops of the reference (numpy + OpenCV, uint8 (H, W, 3) in and out).

The reference (X-VLM/CCLM ``dataset/randaugment.py``) runs these ops with OpenCV on the
RGB uint8 array; this module re-implements the same semantics:

* ``auto_contrast`` -- PIL ``ImageOps.autocontrast`` with cutoff 0: per channel
  ``v -> clip(v * 255 / (hi - lo) - lo * 255 / (hi - lo))`` truncated (float64); flat channel kept.
* ``equalize`` -- PIL ``ImageOps.equalize``: ``step = (count - count of the top value) // 255``;
  ``lut[v] = (step // 2 + #pixels below v) // step``; channel kept when ``step == 0``.
* ``brightness(f)`` -- ``v -> clip(v * f, 0, 255)`` truncated (float32 table).
* ``sharpness(f)`` -- 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13 (cv2 ``filter2D``, rounded),
  interior pixels ``s + f * (v - s)`` truncated; the 1-pixel border is kept. The result is
  clipped to [0, 255] (the reference casts without clipping, which wraps around).
* ``shear_x(s)``, ``shear_y(s)``, ``translate_x(t)``, ``translate_y(t)``, ``rotate(deg)`` --
  ``cv2.warpAffine`` bilinear with the forward matrices [[1, s, 0], [0, 1, 0]],
  [[1, 0, 0], [s, 1, 0]], [[1, 0, -t], [0, 1, 0]], [[1, 0, 0], [0, 1, -t]] and
  ``getRotationMatrix2D((W / 2, H / 2), deg, 1)`` (counter-clockwise), border value 128.

``random_augment_numpy(image, op_ids, apply, signs)`` applies the ops ``PRETRAIN_AUGMENTS[i]``
in order at level 7 of 10 (enhance factor 1.36, shear 0.21, translate 7 px, rotate 21 degrees),
each only where ``apply`` is true, geometric ones multiplied by ``signs`` (+-1).
``draw_ops(rng, count)`` makes those draws for ``count`` images (2 ops each, uniform with
replacement, applied with p 0.5, direction +-1 with p 0.5).

Importing this module limits OpenCV to one thread: tf.data already runs images in parallel.
"""
import cv2
import numpy as np

cv2.setNumThreads(1)

FILL = (128, 128, 128)
MAX_LEVEL = 10.0
PRETRAIN_AUGMENTS = (
    "identity", "auto_contrast", "equalize", "brightness", "sharpness",
    "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
)
REGION_AUGMENTS = ("identity", "auto_contrast", "equalize", "brightness", "sharpness")
_SHARPNESS_KERNEL = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0


def _apply_luts(image, luts):
    """Per-channel lookup; luts uint8 (3, 256)."""
    return cv2.LUT(image, np.ascontiguousarray(luts.T).reshape(1, 256, 3))


def identity(image):
    return image


def auto_contrast(image):
    luts = np.empty((3, 256), np.uint8)
    values = np.arange(256, dtype=np.float64)
    for c in range(3):
        low, high, _, _ = cv2.minMaxLoc(np.ascontiguousarray(image[:, :, c]))
        if high <= low:
            luts[c] = values
            continue
        scale = 255.0 / (high - low)
        luts[c] = np.clip(values * scale - low * scale, 0, 255).astype(np.uint8)
    return _apply_luts(image, luts)


def equalize(image):
    luts = np.empty((3, 256), np.uint8)
    for c in range(3):
        hist = cv2.calcHist([image], [c], None, [256], [0, 256])[:, 0].astype(np.int64)
        nonzero = hist[hist > 0]
        step = int(nonzero[:-1].sum()) // 255
        if step == 0:
            luts[c] = np.arange(256)
            continue
        below = np.concatenate([[0], np.cumsum(hist)[:-1]])
        luts[c] = np.clip((step // 2 + below) // step, 0, 255)
    return _apply_luts(image, luts)


def brightness(image, factor):
    table = np.clip(np.arange(256, dtype=np.float32) * np.float32(factor), 0, 255).astype(np.uint8)
    return cv2.LUT(image, table)


def sharpness(image, factor):
    smooth = cv2.filter2D(image, -1, _SHARPNESS_KERNEL)
    # saturate(round(x - 0.499)) = clip(floor(x)) away from float32 rounding at x.999
    out = cv2.addWeighted(image, float(factor), smooth, 1.0 - float(factor), -0.499)
    out[0], out[-1], out[:, 0], out[:, -1] = image[0], image[-1], image[:, 0], image[:, -1]
    return out


def _warp(image, matrix):
    height, width = image.shape[:2]
    return cv2.warpAffine(image, np.asarray(matrix, np.float32), (width, height),
                          flags=cv2.INTER_LINEAR, borderValue=FILL)


def shear_x(image, factor):
    return _warp(image, [[1, factor, 0], [0, 1, 0]])


def shear_y(image, factor):
    return _warp(image, [[1, 0, 0], [factor, 1, 0]])


def translate_x(image, offset):
    return _warp(image, [[1, 0, -offset], [0, 1, 0]])


def translate_y(image, offset):
    return _warp(image, [[1, 0, 0], [0, 1, -offset]])


def rotate(image, degrees):
    height, width = image.shape[:2]
    return _warp(image, cv2.getRotationMatrix2D((width / 2, height / 2), float(degrees), 1.0))


def apply_op(name, image, magnitude=7.0, sign=1.0):
    """One op at ``magnitude`` (0..10); ``sign`` (+-1) sets the direction of geometric ops."""
    level = magnitude / MAX_LEVEL
    enhance = level * 1.8 + 0.1
    ops = {
        "identity": lambda: identity(image),
        "auto_contrast": lambda: auto_contrast(image),
        "equalize": lambda: equalize(image),
        "brightness": lambda: brightness(image, enhance),
        "sharpness": lambda: sharpness(image, enhance),
        "shear_x": lambda: shear_x(image, sign * level * 0.3),
        "shear_y": lambda: shear_y(image, sign * level * 0.3),
        "translate_x": lambda: translate_x(image, sign * level * 10.0),
        "translate_y": lambda: translate_y(image, sign * level * 10.0),
        "rotate": lambda: rotate(image, sign * level * 30.0),
    }
    if name not in ops:
        raise ValueError(f"unknown RandomAugment op {name!r}; expected one of {tuple(ops)}")
    return ops[name]()


def draw_ops(rng: np.random.Generator, count: int, num_ops: int = 2, num_choices: int = len(PRETRAIN_AUGMENTS)):
    """(op_ids int64 (count, num_ops), apply bool (count, num_ops), signs float (count, num_ops))."""
    op_ids = rng.integers(0, num_choices, (count, num_ops))
    apply = rng.random((count, num_ops)) < 0.5
    signs = np.where(rng.random((count, num_ops)) < 0.5, -1.0, 1.0)
    return op_ids, apply, signs


def random_augment_numpy(image, op_ids, apply, signs, magnitude=7.0, ops=PRETRAIN_AUGMENTS):
    """Apply ``ops[op_ids[k]]`` for each k with ``apply[k]``; uint8 (H, W, 3) -> same."""
    image = np.ascontiguousarray(image)
    for op_id, applied, sign in zip(op_ids, apply, signs):
        if applied:
            image = apply_op(ops[int(op_id)], image, float(magnitude), float(sign))
    return image
