"""Image transforms: RandomAugment ops against independent implementations (PIL, scipy, numpy),
random draws, crops, determinism, eval resize, normalisation."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps
from scipy import ndimage

from cclm_jax.data import image as image_lib
from cclm_jax.data import randaugment as ra


def _smooth_image(h=48, w=56, seed=0):
    """A smooth uint8 image (bilinear interpolation of it is well conditioned)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    channels = [90 + 60 * np.sin(x / 7 + c) + 50 * np.cos(y / 9 - c) + rng.uniform(-2, 2, (h, w))
                for c in range(3)]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def _noise_image(h=40, w=44, low=30, high=200, seed=1):
    return np.random.default_rng(seed).integers(low, high, (h, w, 3)).astype(np.uint8)


def _png(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- ops

def test_auto_contrast_equals_pil():
    image = _noise_image()
    image[:, :, 2] = 77  # a flat channel stays as it is
    expected = np.asarray(ImageOps.autocontrast(Image.fromarray(image)))
    np.testing.assert_array_equal(ra.auto_contrast(image), expected)
    stretched = ra.auto_contrast(image)[:, :, 0]
    assert stretched.min() == 0 and stretched.max() >= 254  # float64 truncation, as PIL


def test_equalize_equals_pil():
    for seed in range(3):
        image = np.clip(np.random.default_rng(seed).normal(100, 30, (37, 41, 3)), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(ra.equalize(image), np.asarray(ImageOps.equalize(Image.fromarray(image))))
    flat = np.full((8, 8, 3), 9, np.uint8)
    np.testing.assert_array_equal(ra.equalize(flat), flat)


def test_brightness_table():
    image = _noise_image(low=0, high=256)
    expected = np.clip(image.astype(np.float32) * np.float32(1.36), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(ra.brightness(image, 1.36), expected)


def test_sharpness_against_numpy_convolution():
    image = _noise_image(low=0, high=256)
    x = image.astype(np.float64)
    box = sum(x[1 + dy:x.shape[0] - 1 + dy, 1 + dx:x.shape[1] - 1 + dx]
              for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    smooth = np.round((box + 4 * x[1:-1, 1:-1]) / 13)
    inner = np.clip(smooth + 1.36 * (x[1:-1, 1:-1] - smooth), 0, 255).astype(np.uint8)
    out = ra.sharpness(image, 1.36)
    difference = np.abs(out[1:-1, 1:-1].astype(int) - inner)
    assert difference.max() <= 1 and (difference == 0).mean() > 0.99  # cv2's rounding of the smooth
    np.testing.assert_array_equal(out[0], image[0])
    np.testing.assert_array_equal(out[:, -1], image[:, -1])


def _scipy_warp(image, forward):
    """Bilinear warp by the inverse of the cv2-style forward matrix (x, y order), fill 128."""
    full = np.vstack([np.asarray(forward, np.float64), [0, 0, 1]])
    inverse = np.linalg.inv(full)
    # scipy works in (row, col) = (y, x): swap axes of the inverse map
    matrix = inverse[[1, 0]][:, [1, 0]]
    offset = inverse[[1, 0], 2]
    channels = [ndimage.affine_transform(image[:, :, c].astype(np.float64), matrix, offset=offset,
                                         order=1, mode="grid-constant", cval=128.0) for c in range(3)]
    return np.stack(channels, -1)


@pytest.mark.parametrize("name,sign,forward", [
    ("shear_x", 1.0, [[1, 0.21, 0], [0, 1, 0]]),
    ("shear_x", -1.0, [[1, -0.21, 0], [0, 1, 0]]),
    ("shear_y", 1.0, [[1, 0, 0], [0.21, 1, 0]]),
    ("translate_x", 1.0, [[1, 0, -7], [0, 1, 0]]),
    ("translate_y", -1.0, [[1, 0, 0], [0, 1, 7]]),
])
def test_affine_ops_against_scipy(name, sign, forward):
    image = _smooth_image()
    out = ra.apply_op(name, image, 7.0, sign).astype(np.float64)
    expected = _scipy_warp(image, forward)
    assert np.abs(out - expected).max() <= 2.5
    assert np.abs(out - expected).mean() < 0.6


def test_rotation_is_counter_clockwise_about_the_centre():
    image = _smooth_image(48, 48)
    theta = np.deg2rad(21.0)
    c, s = np.cos(theta), np.sin(theta)
    cx = cy = 24.0
    forward = [[c, s, (1 - c) * cx - s * cy], [-s, c, s * cx + (1 - c) * cy]]
    out = ra.apply_op("rotate", image, 7.0, 1.0).astype(np.float64)
    assert np.abs(out - _scipy_warp(image, forward)).max() <= 2.5
    marker = np.full((48, 48, 3), 0, np.uint8)
    marker[22:26, 40:44] = 255  # right of the centre
    turned = ra.rotate(marker, 90.0)
    ys, xs = np.nonzero(turned[:, :, 0] > 127)
    assert ys.mean() < 12 and abs(xs.mean() - 24) < 3  # now above the centre
    assert turned[0, 0, 0] == 128  # corners are filled


def test_translate_moves_content_left_and_fills():
    image = _noise_image()
    out = ra.translate_x(image, 7.0)
    np.testing.assert_array_equal(out[:, :-7], image[:, 7:])
    np.testing.assert_array_equal(out[:, -7:], 128)


def test_random_augment_numpy_applies_only_flagged_ops():
    image = _noise_image()
    np.testing.assert_array_equal(ra.random_augment_numpy(image, [3, 7], [False, False], [1, 1]), image)
    both = ra.random_augment_numpy(image, [3, 7], [True, True], [1.0, -1.0])
    np.testing.assert_array_equal(both, ra.translate_x(ra.brightness(image, 1.36), -7.0))
    with pytest.raises(ValueError, match="unknown RandomAugment op"):
        ra.apply_op("solarize", image)


# ----------------------------------------------------------------------------- random draws

def _draws(fn, n, seed=(3, 4)):
    ds = tf.data.Dataset.range(n).map(
        lambda i: fn(tf.random.experimental.stateless_fold_in(tf.constant(seed, tf.int64), i)))
    return next(iter(ds.batch(n)))


def test_random_augment_draw_frequencies():
    op_ids, apply, signs = (t.numpy() for t in _draws(image_lib.random_augment_draws, 4000))
    counts = np.bincount(op_ids.ravel(), minlength=10) / op_ids.size
    np.testing.assert_allclose(counts, 0.1, atol=0.015)
    assert abs(apply.mean() - 0.5) < 0.02
    assert abs((signs > 0).mean() - 0.5) < 0.02
    assert set(np.unique(signs)) == {-1.0, 1.0}


def _torchvision_crop_areas(height, width, n, rng, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """Area fractions of torchvision's RandomResizedCrop.get_params (numpy port)."""
    areas = []
    for _ in range(n):
        for _ in range(10):
            target = height * width * rng.uniform(*scale)
            aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
            w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                break
        else:
            h, w = height, min(width, int(round(height * ratio[1])))
        areas.append(h * w / (height * width))
    return np.array(areas)


def test_numpy_draws_for_batches():
    op_ids, apply, signs = ra.draw_ops(np.random.default_rng(0), 4000)
    assert op_ids.shape == apply.shape == signs.shape == (4000, 2)
    np.testing.assert_allclose(np.bincount(op_ids.ravel(), minlength=10) / op_ids.size, 0.1, atol=0.015)
    assert abs(apply.mean() - 0.5) < 0.02 and abs((signs > 0).mean() - 0.5) < 0.02


def test_random_resized_crop_window_bounds_and_distribution():
    boxes = _draws(lambda s: image_lib.random_resized_crop_window(tf.constant([120, 200]), s), 2000).numpy()
    top, left, h, w = boxes.T
    assert np.all(top >= 0) and np.all(left >= 0)
    assert np.all(top + h <= 120) and np.all(left + w <= 200)
    area = h * w / (120 * 200)
    assert area.min() >= 0.19 and area.max() <= 1.0
    assert np.all((w / h > 0.74) & (w / h < 1.35))
    reference = _torchvision_crop_areas(120, 200, 4000, np.random.default_rng(0))
    np.testing.assert_allclose(np.quantile(area, [0.1, 0.25, 0.5, 0.75, 0.9]),
                               np.quantile(reference, [0.1, 0.25, 0.5, 0.75, 0.9]), atol=0.03)
    assert abs(left.mean() / (200 - w).mean() - 0.5) < 0.05  # offsets uniform over the slack
    fine = _draws(lambda s: image_lib.random_resized_crop_window(tf.constant([120, 200]), s, (0.5, 1.0)), 500)
    assert (fine.numpy()[:, 2] * fine.numpy()[:, 3] / 24000).min() >= 0.49


def test_crop_falls_back_to_the_centre_for_extreme_shapes():
    boxes = _draws(lambda s: image_lib.random_resized_crop_window(tf.constant([10, 400]), s, (0.9, 1.0)), 50)
    np.testing.assert_array_equal(boxes.numpy(), np.tile([[0, 193, 10, 13]], (50, 1)))


# ----------------------------------------------------------------------------- transforms

def _train_transform(data, seed, size, scale=(0.2, 1.0)):
    """The reference training transform as the pipelines run it: crop_resize_flip, then random_augment."""
    crop_seed, augment_seed = tf.random.experimental.stateless_split(tf.constant(seed, tf.int64), 2)
    uniforms = tf.random.stateless_uniform([image_lib.TRAIN_UNIFORMS], crop_seed)
    return image_lib.random_augment(image_lib.crop_resize_flip(data, uniforms, size, scale), augment_seed).numpy()


@pytest.mark.parametrize("encode", [_png, _jpeg])
def test_training_transform_is_deterministic_per_seed(encode):
    data = tf.constant(encode(_smooth_image(90, 120)))
    first, again, other = (_train_transform(data, seed, 32) for seed in ([1, 2], [1, 2], [1, 3]))
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_full_area_crop_is_a_resize_flipped_by_the_last_uniform():
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)  # left half red, right half black
    data = tf.constant(_png(pixels))
    uniforms = np.full(image_lib.TRAIN_UNIFORMS, 0.5, np.float32)  # aspect 1: the whole image
    for flip, red, black in ((0.7, slice(0, 6), slice(-6, None)), (0.3, slice(-6, None), slice(0, 6))):
        uniforms[-1] = flip  # < 0.5 flips
        out = image_lib.crop_resize_flip(data, tf.constant(uniforms), 16, (1.0, 1.0)).numpy()
        assert out.shape == (16, 16, 3) and out[:, red, 0].mean() > 240 and out[:, black, 0].mean() < 15


def test_eval_image_matches_pil_bicubic():
    pixels = _smooth_image(100, 140)
    for size in (40, 160):
        ours = image_lib.eval_image(tf.constant(_png(pixels)), size).numpy().astype(int)
        pil = np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)).astype(int)
        assert np.abs(ours - pil).max() <= 3
        assert np.abs(ours - pil).mean() < 0.5


def test_is_decodable():
    good = _jpeg(_smooth_image())
    assert image_lib.is_decodable(good)
    assert image_lib.is_decodable(_png(_smooth_image()))
    assert not image_lib.is_decodable(good[: len(good) // 2])
    assert not image_lib.is_decodable(b"not an image")
    assert not image_lib.is_decodable(b"")


def test_normalize_uses_clip_statistics():
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 4, 3)).astype(np.uint8)
    out = np.asarray(image_lib.normalize(images))
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    np.testing.assert_allclose(out, (images / 255.0 - mean) / std, rtol=0, atol=8e-7)  # measured 3.9e-7
    assert out.dtype == np.float32 and out.shape == images.shape


def test_fine_tuning_variant_is_384_pixels():
    data = tf.constant(_jpeg(_smooth_image(200, 260)))
    out = _train_transform(data, [5, 6], 384, (0.5, 1.0))
    assert out.shape == (384, 384, 3) and out.dtype == np.uint8 and out.std() > 10
