"""Objectives against the official golden losses, across shardings, and the negative sampler's law."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cclm_jax import objectives as O
from cclm_jax import parallel
from cclm_jax.train_state import global_norm


def _golden_batches(ref):
    mm = {k[3:]: ref[k] for k in ref if k.startswith("mm_") and "negs" not in k}
    mm["image"] = ref["image"]
    para = {k[4:]: ref[k] for k in ref if k.startswith("pt1_")}
    para.update({k[4:] + "_2": ref[k] for k in ref if k.startswith("pt2_")})
    mm2 = dict(mm, **{k[4:] + "_2": ref[k] for k in ref if k.startswith("mm2_")})
    return mm, para, mm2


@pytest.fixture(scope="module")
def golden_losses(golden_model):
    _, params, model, ref = golden_model
    mm, para, mm2 = _golden_batches(ref)
    two_captions = O.default_objectives_config()
    two_captions.sample_2_captions = True
    key = jax.random.PRNGKey(0)

    def all_losses(p):
        def mm_total(q):
            out = O.image_text_losses(model, q, mm, key, ref["mm_negs_t2i_then_i2t"])
            return out["itc"] + out["itm"] + out["mlm"], out

        (_, out_mm), grads = jax.value_and_grad(mm_total, has_aux=True)(p)
        out_para = O.parallel_text_losses(model, p, para, key, ref["para_negs_t2i_then_i2t"])
        out_2cap = O.image_text_losses(model, p, mm2, key, ref["mm_2cap_negs_t2i_then_i2t"], config=two_captions)
        return out_mm, global_norm(grads), out_para, out_2cap

    out_mm, grad_norm, out_para, out_2cap = jax.jit(all_losses)(params)
    return {"mm": out_mm, "grad_norm": grad_norm, "para": out_para, "mm_2cap": out_2cap}


def test_golden_losses(golden_losses, golden_dir):
    ref = json.loads((golden_dir / "ref_losses.json").read_text())
    for step, names in [("mm", ["itc", "itm", "mlm"]), ("para", ["ttc", "ttm", "mlm"]),
                        ("mm_2cap", ["itc", "itm", "mlm", "ttc"])]:
        for name in names:
            got = float(golden_losses[step][name])
            assert got == pytest.approx(ref[step][f"loss_{name}"], rel=8e-7), (step, name)  # measured 3.9e-7


def test_golden_gradient_norm(golden_losses, golden_dir):
    ref = json.loads((golden_dir / "ref_losses.json").read_text())
    assert float(golden_losses["grad_norm"]) == pytest.approx(ref["mm"]["grad_norm_total"],
                                                              rel=6e-7)  # measured 2.7e-7


def test_injected_negatives_are_returned(golden_losses, golden_model):
    ref = golden_model[3]
    np.testing.assert_array_equal(np.asarray(golden_losses["mm"]["negatives"]), ref["mm_negs_t2i_then_i2t"])


def test_sharded_losses_equal_single_device(golden_model):
    """On 8 data shards, ITC/ITM/MLM with the same (global) negatives equal the single-device values."""
    _, params, model, ref = golden_model
    mm, _, _ = _golden_batches(ref)
    batch = {k: np.concatenate([v, v[::-1]]) for k, v in mm.items()}  # batch 8: 4 + reversed 4
    negs = np.asarray([5, 6, 7, 4, 1, 2, 3, 0, 7, 4, 5, 6, 3, 0, 1, 2])
    key = jax.random.PRNGKey(0)
    single = jax.jit(lambda p, b: O.image_text_losses(model, p, b, key, negs))(params, batch)
    mesh = parallel.make_mesh({"data": 8})
    sharded_batch = {k: jax.device_put(v, parallel.batch_sharding(mesh)) for k, v in batch.items()}
    sharded = jax.jit(lambda p, b: O.image_text_losses(model, p, b, key, negs, mesh=mesh))(params, sharded_batch)
    for name in ("itc", "itm", "mlm"):
        assert float(sharded[name]) == pytest.approx(float(single[name]), rel=5e-7), name  # measured 2.2e-7


class _Ctx:
    def __init__(self, mesh, scope="local"):
        self.mesh, self.negatives_scope = mesh, scope

    batch_shards = O.Context.batch_shards


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_local_negatives_stay_in_their_shard_and_avoid_positives():
    rng = np.random.default_rng(0)
    b = 16
    cond, text = _unit(rng.normal(size=(b, 8))), _unit(rng.normal(size=(b, 8)))
    idx = np.repeat(np.arange(8), 2)  # pairs of examples share an id (e.g. two captions of one image)
    mesh = parallel.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
    ctx = _Ctx(mesh)
    draw = jax.jit(lambda key, ix: O.draw_negatives(ctx, jnp.asarray(cond), jnp.asarray(text), jnp.float32(0.07),
                                                     key, ix))
    for seed in range(20):
        negs = np.asarray(draw(jax.random.PRNGKey(seed), jnp.asarray(idx)))
        own = np.concatenate([np.arange(b), np.arange(b)])
        assert np.all(negs // 4 == own // 4), "a negative came from another data shard"
        assert np.all(idx[negs] != idx[own]), "a same-id example was drawn as a negative"
    plain = jax.jit(lambda key: O.draw_negatives(ctx, jnp.asarray(cond), jnp.asarray(text), jnp.float32(0.07), key))
    negs = np.asarray(plain(jax.random.PRNGKey(1)))
    assert np.all(negs != np.concatenate([np.arange(b), np.arange(b)]))


def test_negative_sampling_law_matches_numpy():
    """Empirical frequencies over 20,000 draws match softmax(sim/temp)+1e-5 with a zeroed diagonal."""
    rng = np.random.default_rng(1)
    b, temp, n = 5, 0.5, 20000
    cond, text = _unit(rng.normal(size=(b, 4))), _unit(rng.normal(size=(b, 4)))

    def numpy_weights(sim):
        e = np.exp(sim - sim.max(1, keepdims=True))
        w = e / e.sum(1, keepdims=True) + 1e-5
        np.fill_diagonal(w, 0.0)
        return w / w.sum(1, keepdims=True)

    expected_t2i = numpy_weights(text @ cond.T / temp)
    expected_i2t = numpy_weights(cond @ text.T / temp)
    keys = jax.random.split(jax.random.PRNGKey(7), n)
    neg_cond, neg_text = jax.jit(jax.vmap(lambda k: O.sample_local_negatives(
        jnp.asarray(cond, jnp.float32), jnp.asarray(text, jnp.float32), jnp.float32(temp), k)))(keys)
    for draws, expected in [(np.asarray(neg_cond), expected_t2i), (np.asarray(neg_text), expected_i2t)]:
        freq = np.stack([np.bincount(draws[:, row], minlength=b) / n for row in range(b)])
        stderr = np.sqrt(expected * (1 - expected) / n) + 1e-9
        assert np.all(np.abs(freq - expected) < 5 * stderr + 1e-4)
        assert np.all(freq[np.arange(b), np.arange(b)] == 0)


def test_contrastive_loss_matches_numpy_and_masks_invalid():
    rng = np.random.default_rng(2)
    a, c = _unit(rng.normal(size=(6, 8))), _unit(rng.normal(size=(6, 8)))
    temp = 0.1

    def ce(logits):
        logits = logits - logits.max(1, keepdims=True)
        return np.mean(-np.diag(logits) + np.log(np.exp(logits).sum(1)))

    logits = a @ c.T / temp
    expected = 0.5 * (ce(logits) + ce(logits.T))
    # float32 against float64; rel 1e-7 is about one float32 rounding (2^-23 = 1.2e-7)
    assert float(O.contrastive_loss(jnp.asarray(a), jnp.asarray(c), temp)) == pytest.approx(expected,
                                                                                           rel=2e-7)  # 7.9e-8
    valid = np.array([1, 1, 1, 1, 0, 0], bool)
    sub = a[:4] @ c[:4].T / temp
    got = float(O.contrastive_loss(jnp.asarray(a), jnp.asarray(c), temp, valid=jnp.asarray(valid)))
    assert got == pytest.approx(0.5 * (ce(sub) + ce(sub.T)), rel=1e-7)  # measured 4.2e-8


def test_contrastive_loss_with_ids_uses_soft_targets():
    rng = np.random.default_rng(3)
    a, c = _unit(rng.normal(size=(4, 8))), _unit(rng.normal(size=(4, 8)))
    idx = np.array([0, 0, 1, 2])
    logits = a @ c.T / 0.07
    targets = (idx[:, None] == idx[None, :]).astype(float)
    targets /= targets.sum(1, keepdims=True)

    def soft(lg):
        lg = lg - lg.max(1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
        return np.mean(-(logp * targets).sum(1))

    expected = 0.5 * (soft(logits) + soft(logits.T))
    got = float(O.contrastive_loss(jnp.asarray(a), jnp.asarray(c), 0.07, idx=jnp.asarray(idx)))
    assert got == pytest.approx(expected, rel=1e-7)  # measured 2.4e-10 (luck): floor at one float32 rounding


def test_tlm_concatenation_layout():
    batch = {
        "text_ids": jnp.array([[0, 5, 6, 2, 1]]), "text_atts": jnp.array([[1, 1, 1, 1, 0]]),
        "text_ids_masked": jnp.array([[0, 9, 6, 2, 1]]), "masked_pos": jnp.array([[1, 0]]),
        "masked_ids": jnp.array([[5, -100]]),
        "text_ids_2": jnp.array([[0, 7, 8, 2, 1]]), "text_atts_2": jnp.array([[1, 1, 1, 1, 0]]),
        "text_ids_masked_2": jnp.array([[0, 7, 9, 2, 1]]), "masked_pos_2": jnp.array([[2, 0]]),
        "masked_ids_2": jnp.array([[8, -100]]),
    }
    ids, atts, ids_masked, pos, labels = O.concat_pair_for_tlm(batch)
    np.testing.assert_array_equal(np.asarray(ids), [[0, 5, 6, 2, 7, 8, 2, 1, 1]])
    np.testing.assert_array_equal(np.asarray(atts), [[1, 1, 1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(ids_masked), [[0, 9, 6, 2, 7, 9, 2, 1, 1]])
    np.testing.assert_array_equal(np.asarray(pos), [[1, 0, 5, 0]])
    np.testing.assert_array_equal(np.asarray(labels), [[5, -100, 8, -100]])
    assert np.asarray(ids)[0, 5] == 8  # the label at the shifted position is the original token
