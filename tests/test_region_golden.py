"""Region grounding (CCLM-4M) against the official golden region step (`../shared/reference/golden_region`)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cclm_jax import objectives as O
from cclm_jax.models.regions import pool_regions
from cclm_jax.train_state import global_norm

INPUTS = ("image", "idx_to_group_img", "text_ids", "text_atts", "text_ids_masked", "masked_pos", "masked_ids",
          "image_atts", "target_bbox", "is_image")
# Max |Flax - official PyTorch| per output, float32 on CPU: about twice the measured error (in the comment).
ATOL = {
    "image_embeds_full": 5e-6,  # measured 2.3e-6 (|x| <= 3.8)
    "image_embeds": 5e-6,  # 2.3e-6
    "text_embeds": 4e-6,  # 1.9e-6 (|x| <= 4.3)
    "image_feat": 6e-7,  # 2.8e-7
    "text_feat": 4e-7,  # 1.8e-7
    "cross_embeds_pos": 6e-6,  # 3.1e-6 (|x| <= 4.3)
    "itm_logits_pos": 1e-6,  # 4.6e-7
    "itm_logits_all": 1e-6,  # 4.7e-7
    "mlm_logits_at_masked_pos": 1.3e-6,  # 6.3e-7
    "bbox_cross_cls": 3e-6,  # 1.4e-6
    "output_coord": 2.5e-7,  # 1.2e-7
    "giou_rows": 1.2e-7,  # 6.0e-8
    "l1_rows": 2.5e-7,  # 1.2e-7
}


@pytest.fixture(scope="module")
def region_ref(golden_dir):
    root = golden_dir.parent / "golden_region"
    if not (root / "ref_region.npz").exists():
        pytest.skip("../shared/reference/golden_region is absent")
    return dict(np.load(root / "ref_region.npz")), json.loads((root / "ref_region_losses.json").read_text())


def _outputs(model, params, batch, negs):
    def call(method, *args):
        return model.apply({"params": params}, *args, method=getattr(model, method))

    full, _ = call("encode_image", batch["image"])
    region, full_rows = pool_regions(full, batch["idx_to_group_img"], batch["image_atts"])
    text = call("encode_text", batch["text_ids"], batch["text_atts"])
    image_feat, text_feat = call("features", region, text)
    cross = call("fuse", region, batch["image_atts"], text, batch["text_atts"])
    r = text.shape[0]
    neg_img, neg_txt = negs[:r], negs[r:]
    cross_neg1 = call("fuse", region[neg_img], batch["image_atts"][neg_img], text, batch["text_atts"])
    cross_neg2 = call("fuse", region, batch["image_atts"], text[neg_txt], batch["text_atts"][neg_txt])
    cls_all = jnp.concatenate([cross[:, 0], cross_neg1[:, 0], cross_neg2[:, 0]])
    box_cls = call("fuse", full_rows, jnp.ones(full_rows.shape[:2], jnp.int32), text, batch["text_atts"])[:, 0]
    coord = call("bbox", box_cls)
    giou = O.paired_giou(O.box_cxcywh_to_xyxy(coord), O.box_cxcywh_to_xyxy(batch["target_bbox"]))
    return {
        "image_embeds_full": full, "image_embeds": region, "text_embeds": text, "image_feat": image_feat,
        "text_feat": text_feat, "cross_embeds_pos": cross, "itm_logits_pos": call("itm_logits", cross[:, 0]),
        "itm_logits_all": call("itm_logits", cls_all),
        "mlm_logits_at_masked_pos": call("mlm_logits", batch["text_ids_masked"], batch["text_atts"], region,
                                         batch["image_atts"], batch["masked_pos"]),
        "bbox_cross_cls": box_cls, "output_coord": coord, "giou_rows": giou,
        "l1_rows": jnp.abs(coord - batch["target_bbox"]),
    }


@pytest.fixture(scope="module")
def region_run(golden_model, region_ref):
    _, params, model, _ = golden_model
    ref, _ = region_ref
    batch = {k: ref[k] for k in INPUTS}
    negs = ref["region_negs_t2i_then_i2t"]

    def run(p):
        def total(q):
            out = O.region_losses(model, q, batch, jax.random.PRNGKey(0), negs)
            return sum(out[k] for k in ("itc", "itm", "mlm", "bbox", "giou")), out

        (_, losses), grads = jax.value_and_grad(total, has_aux=True)(p)
        return losses, global_norm(grads), _outputs(model, p, batch, negs)

    return jax.jit(run)(params)


@pytest.mark.parametrize("name", list(ATOL))
def test_region_outputs_match_official(region_run, region_ref, name):
    ref = region_ref[0]
    got = np.asarray(region_run[2][name])
    assert got.shape == ref[name].shape
    np.testing.assert_allclose(got, ref[name], rtol=0, atol=ATOL[name])


def test_region_losses_match_official(region_run, region_ref):
    ref = region_ref[1]["region"]
    for name in ("itc", "itm", "mlm", "bbox", "giou"):
        assert float(region_run[0][name]) == pytest.approx(ref[f"loss_{name}"], rel=3e-7), name  # measured <= 1.5e-7


def test_region_gradient_norm_matches_official(region_run, region_ref):
    ref = region_ref[1]["region"]
    assert float(region_run[1]) == pytest.approx(ref["grad_norm_total_f64acc"], rel=6e-7)  # measured 3.0e-7


def test_region_negatives_are_returned(region_run, region_ref):
    np.testing.assert_array_equal(np.asarray(region_run[0]["negatives"]), region_ref[0]["region_negs_t2i_then_i2t"])
