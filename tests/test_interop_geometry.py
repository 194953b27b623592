"""Relative-position-table resizing (window 7 -> 12) and 224-px -> 384-px checkpoint conversion."""
import jax
import numpy as np
import pytest
import torch

from cclm_jax.interop import official
from cclm_jax.interop.relpos import progression_ratio, resize_relative_position_table, source_coordinates
from cclm_jax.interop.shapes import param_shapes
from cclm_jax.models import tiny_model_config

SRC, DST = 13, 23  # table sides for windows 7 and 12


def stretched(d, q):
    """The continuous offset a destination offset d samples: the inverse of k -> (q^k - 1) / (q - 1)."""
    return np.sign(d) * np.log1p(np.abs(d) * (q - 1)) / np.log(q)


def test_ratio_places_the_last_source_offset_on_the_last_destination_offset():
    q = progression_ratio(6, 11)
    assert abs(sum(q ** i for i in range(6)) - 11) < 1e-4
    coords = source_coordinates(SRC, DST)
    assert coords.shape == (SRC,) and coords[6] == 0 and np.all(np.diff(coords) > 0)
    np.testing.assert_allclose(coords, -coords[::-1])
    np.testing.assert_allclose(coords[7:9], [1.0, 1.0 + q])
    assert abs(coords[-1] - 11) < 1e-4


def test_same_window_returns_the_input_exactly():
    table = np.random.default_rng(0).standard_normal((SRC * SRC, 3)).astype(np.float32)
    out = resize_relative_position_table(table, SRC * SRC)
    assert out.dtype == np.float32 and np.array_equal(out, table) and out is not table


def test_smooth_table_of_the_offset_is_reproduced_closely():
    def f(dy, dx):
        return np.cos(0.3 * dy) * np.exp(-0.01 * dx ** 2) + 0.05 * dy + 0.02 * dx * dy

    k = np.arange(-6, 7, dtype=np.float64)
    heads = np.stack([f(k[:, None], k[None]), -2 * f(k[None], k[:, None])], -1).reshape(-1, 2)
    out = resize_relative_position_table(heads.astype(np.float32), DST * DST).reshape(DST, DST, 2)
    u = stretched(np.arange(-11, 12, dtype=np.float64), progression_ratio(6, 11))
    expected = np.stack([f(u[:, None], u[None]), -2 * f(u[None], u[:, None])], -1)
    np.testing.assert_allclose(out, expected, atol=4e-3)  # measured 2.0e-3 on a range of 2.2
    src = heads.reshape(SRC, SRC, 2)
    np.testing.assert_allclose(out[11, 11], src[6, 6], atol=1e-6)  # offset 0 stays a data point
    np.testing.assert_allclose(out[[0, 0, -1, -1], [0, -1, 0, -1]], src[[0, 0, -1, -1], [0, -1, 0, -1]],
                               atol=1.5e-5)  # the outermost offsets map onto each other; measured 5.5e-6


def test_bicubic_polynomial_of_the_stretched_coordinates_is_exact_and_rows_are_dy():
    def p(y, x):  # cubic in each variable, not symmetric: a transposed result would fail
        return 1 + 0.5 * y - 0.1 * x ** 2 + 0.01 * x * y ** 3 + 0.002 * x ** 3

    coords = source_coordinates(SRC, DST)
    table = p(coords[:, None], coords[None]).reshape(-1, 1)
    out = resize_relative_position_table(table, DST * DST).reshape(DST, DST)
    d = np.arange(-11, 12, dtype=np.float64)
    np.testing.assert_allclose(out, p(d[:, None], d[None]), rtol=0, atol=1e-12)  # float64: measured 7.1e-14


def test_bad_tables_are_rejected():
    with pytest.raises(ValueError, match="170 rows is not"):
        resize_relative_position_table(np.zeros((170, 2)), 529)
    with pytest.raises(ValueError, match="destination relative position table: 530 rows"):
        resize_relative_position_table(np.zeros((169, 2)), 530)
    with pytest.raises(ValueError, match="at least 4 offsets"):
        resize_relative_position_table(np.zeros((9, 2)), 529)


@pytest.fixture(scope="module")
def checkpoint_224(tmp_path_factory):
    cfg = tiny_model_config()
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s, dtype=np.float32), param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    path = tmp_path_factory.mktemp("geometry") / "cclm_224.th"
    official.save(path, cfg, params)
    return path, params


def test_224_checkpoint_converts_to_384_window_12(checkpoint_224, tmp_path):
    path, params = checkpoint_224
    cfg, converted = official.load(path, vision__image_res=384, vision__window_size=12)
    assert (cfg.vision.image_res, cfg.vision.window_size) == (384, 12)
    converted = jax.device_get(converted)
    flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    n_tables = 0
    for key_path, value in jax.tree_util.tree_flatten_with_path(converted)[0]:
        if key_path[-1].key == "relative_position_bias_table":
            n_tables += 1
            assert value.shape == (529, flat[key_path].shape[1])
            np.testing.assert_array_equal(value, resize_relative_position_table(flat[key_path], 529))
        else:
            assert np.array_equal(value, flat[key_path]), jax.tree_util.keystr(key_path)
    assert n_tables == 8

    official.save(tmp_path / "cclm_384.th", cfg, converted)
    state_dict = torch.load(tmp_path / "cclm_384.th", weights_only=True)["model"]
    masks = {k: tuple(v.shape) for k, v in state_dict.items() if k.endswith("attn_mask")}
    assert masks == {f"vision_encoder.layers.{s}.blocks.1.attn_mask": (n, 144, 144)
                     for s, n in enumerate((64, 16, 4))}
    assert state_dict["vision_encoder.layers.3.blocks.0.attn.relative_position_index"].shape == (144, 144)
    again_cfg, again = official.load(tmp_path / "cclm_384.th")  # now native: no conversion, buffers checked
    assert again_cfg.to_dict() == cfg.to_dict()
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(again)),
                                                     jax.tree.leaves(converted)))


def test_inconsistent_geometry_override_is_rejected(checkpoint_224):
    with pytest.raises(ValueError, match="stage 0 resolution 56 is not divisible by model.vision.window_size 12"):
        official.load(checkpoint_224[0], vision__window_size=12)
