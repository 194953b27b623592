"""Region pieces against independent float64 numpy transcriptions: GIoU, box losses, region pooling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cclm_jax import objectives as O
from cclm_jax.models.regions import pool_regions


def _giou_f64(a, b):
    """GIoU of xyxy box pairs from its definition (Rezatofighi et al. 2019), float64, one pair at a time."""
    out = []
    for (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) in zip(a, b):
        area_a, area_b = (ax1 - ax0) * (ay1 - ay0), (bx1 - bx0) * (by1 - by0)
        iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
        ih = max(0.0, min(ay1, by1) - max(ay0, by0))
        inter = iw * ih
        union = area_a + area_b - inter
        hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
        out.append(inter / union - (hull - union) / hull)
    return np.array(out)


def _xyxy(b):
    return np.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)


def _box_losses_f64(pred, target, is_image):
    """The reference's get_bbox_loss, float64: the giou term is 0 when any box is degenerate."""
    w = 1.0 - is_image
    a, b = _xyxy(pred), _xyxy(target)
    degenerate = (a[:, 2:] < a[:, :2]).any() or (b[:, 2:] < b[:, :2]).any()
    giou = np.zeros(len(pred)) if degenerate else 1.0 - _giou_f64(a, b)
    return (np.abs(pred - target).sum(1) * w).sum() / w.sum(), (giou * w).sum() / w.sum()


def _random_boxes(rng, n):
    centre = rng.uniform(0.1, 0.9, (n, 2))
    size = rng.uniform(0.01, 0.8, (n, 2))
    return np.concatenate([centre, size], 1)


def test_giou_matches_definition_on_random_boxes():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 64), _random_boxes(rng, 64)
    b[:8] = a[:8]  # identical: GIoU 1
    b[8:16, :2] = a[8:16, :2] + 3.0  # far apart: GIoU near -1
    got = np.asarray(O.paired_giou(O.box_cxcywh_to_xyxy(jnp.asarray(a, jnp.float32)),
                                   O.box_cxcywh_to_xyxy(jnp.asarray(b, jnp.float32))))
    want = _giou_f64(_xyxy(a), _xyxy(b))
    np.testing.assert_allclose(got, want, atol=4e-7)  # float32 vs float64: measured 2.0e-7
    np.testing.assert_allclose(got[:8], 1.0, atol=1e-6)
    assert (got[8:16] < -0.5).all()


def test_box_losses_match_reference_formula():
    rng = np.random.default_rng(1)
    pred, target = _random_boxes(rng, 12), _random_boxes(rng, 12)
    is_image = np.array([1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0], np.float64)
    target[is_image == 1] = [0.5, 0.5, 1.0, 1.0]
    bbox, giou = O.box_losses(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                              jnp.asarray(is_image, jnp.int32))
    want_bbox, want_giou = _box_losses_f64(pred, target, is_image)
    assert float(bbox) == pytest.approx(want_bbox, rel=1e-6)
    assert float(giou) == pytest.approx(want_giou, rel=1e-6)


def test_degenerate_box_zeroes_giou_without_nan_gradient():
    rng = np.random.default_rng(2)
    pred, target = _random_boxes(rng, 4), _random_boxes(rng, 4)
    target[2, 2] = -0.1  # negative width: degenerate target
    is_image = np.zeros(4)
    want_bbox, want_giou = _box_losses_f64(pred, target, is_image)
    assert want_giou == 0.0

    def total(p):
        bbox, giou = O.box_losses(p, jnp.asarray(target, jnp.float32), jnp.zeros(4, jnp.int32))
        return bbox + giou, (bbox, giou)

    grads, (bbox, giou) = jax.grad(total, has_aux=True)(jnp.asarray(pred, jnp.float32))
    assert float(giou) == 0.0 and float(bbox) == pytest.approx(want_bbox, rel=1e-6)
    # the gradient is the L1 term's alone: sign(pred - target) / number of region rows
    np.testing.assert_allclose(np.asarray(grads), np.sign(pred - target) / 4, atol=1e-7)


def test_box_losses_skip_invalid_rows_and_survive_no_region_rows():
    pred = jnp.full((3, 4), 0.5)
    target = jnp.asarray([[0.5, 0.5, 1.0, 1.0], [0.2, 0.2, 0.1, 0.1], [0.9, 0.9, -1.0, 0.1]])
    # the degenerate row 2 is padding (valid False): it neither counts nor triggers the fallback
    bbox, giou = O.box_losses(pred, target, jnp.asarray([1, 0, 0]), jnp.asarray([True, True, False]))
    want_bbox, want_giou = _box_losses_f64(np.full((2, 4), 0.5), np.asarray(target[:2], np.float64),
                                           np.array([1.0, 0.0]))
    assert float(bbox) == pytest.approx(want_bbox, rel=1e-6) and float(giou) == pytest.approx(want_giou, rel=1e-6)
    bbox, giou = O.box_losses(pred, target, jnp.ones(3, jnp.int32))
    assert float(bbox) == 0.0 and float(giou) == 0.0  # the reference: 0/0 = NaN


def test_pool_regions_is_the_masked_patch_mean_of_the_rows_image():
    rng = np.random.default_rng(3)
    embeds = rng.normal(size=(3, 1 + 9, 5)).astype(np.float32)
    idx = np.array([2, 0, 2, 1])
    atts = np.zeros((4, 10), np.int32)
    atts[:, 0] = 1
    atts[0, 1:] = 1
    atts[1, [1, 2, 4, 5]] = 1
    atts[2, [9]] = 1
    atts[3, [3, 6, 9]] = 1
    region, full = pool_regions(jnp.asarray(embeds), jnp.asarray(idx), jnp.asarray(atts))
    region, full = np.asarray(region), np.asarray(full)
    for r in range(4):
        patches = embeds[idx[r], 1:].astype(np.float64)
        w = atts[r, 1:].astype(np.float64)
        np.testing.assert_allclose(region[r, 0], (w[:, None] * patches).sum(0) / w.sum(), atol=1e-6)
        np.testing.assert_array_equal(region[r, 1:], embeds[idx[r], 1:])
        np.testing.assert_array_equal(full[r], embeds[idx[r]])


def _micro_region_batch(rng, images=8, rows=8, length=8, masks=3, vocab=1000):
    atts = np.zeros((rows, 17), np.int32)
    atts[:, 0] = 1
    for r in range(rows):
        x0, y0 = rng.integers(0, 3, 2)
        atts[r, 1:].reshape(4, 4)[y0:y0 + 2, x0:x0 + 2] = 1
    atts[0, 1:] = 1
    ids = rng.integers(4, vocab, (rows, length)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 0, 2
    masked_pos = np.tile(np.arange(1, 1 + masks, dtype=np.int32), (rows, 1))
    ids_masked = ids.copy()
    ids_masked[:, 1:1 + masks] = 999
    return {"image": rng.normal(size=(images, 32, 32, 3)).astype(np.float32),
            "idx_to_group_img": rng.permutation(rows).astype(np.int32) % images, "image_atts": atts,
            "target_bbox": rng.uniform(0.2, 0.6, (rows, 4)).astype(np.float32),
            "is_image": (np.arange(rows) == 0).astype(np.int32), "text_ids": ids,
            "text_atts": np.ones((rows, length), np.int32), "text_ids_masked": ids_masked, "masked_pos": masked_pos,
            "masked_ids": np.take_along_axis(ids, masked_pos, 1)}


def test_sharded_region_losses_equal_single_device(micro_params):
    """On 8 data shards (images and rows sharded) with the same negatives, the five losses equal one device's."""
    from cclm_jax import parallel
    from cclm_jax.models import build_model

    cfg, params = micro_params
    model = build_model(cfg)
    batch = _micro_region_batch(np.random.default_rng(4))
    negs = np.array([1, 0, 3, 2, 5, 4, 7, 6, 1, 0, 3, 2, 5, 4, 7, 6])
    key = jax.random.PRNGKey(0)
    single = jax.jit(lambda p, b: O.region_losses(model, p, b, key, negs))(params, batch)
    mesh = parallel.make_mesh({"data": 8})
    sharded_batch = {k: jax.device_put(v, parallel.batch_sharding(mesh)) for k, v in batch.items()}
    sharded = jax.jit(lambda p, b: O.region_losses(model, p, b, key, negs, mesh=mesh))(params, sharded_batch)
    for name in ("itc", "itm", "mlm", "bbox", "giou"):
        assert np.isfinite(float(single[name])) and float(single[name]) > 0, name
        # measured <= 1.6e-7 (itc); bbox/giou bit-equal
        assert float(sharded[name]) == pytest.approx(float(single[name]), rel=3e-7), name
