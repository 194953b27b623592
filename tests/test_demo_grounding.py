"""The demo's region pictures, the grounding metric and the `grounding` evaluator kind (issue 17, the demo 4M run).

The full demo 4M run is recorded in benchmarks/RESULTS.md; the CLI run of `configs/demo.py:4m` here is an
integration test (CCLM_INTEGRATION=1).
"""
import base64
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cclm_jax.data import demo
from cclm_jax.data.normalize import normalize
from cclm_jax.data.pipeline import load_tokenizer
from cclm_jax.data.text import pad_batch, pre_caption
from cclm_jax.evaluation import grounding
from cclm_jax.models import build_model
from cclm_jax.run_config import load_config_file, resolve_vocab, validate_run_config
from cclm_jax.train import trainer
from cclm_jax.train.pretraining import eval_makers

REPO = pathlib.Path(__file__).resolve().parents[1]
SPEC = demo.DemoSpec(image_size=48, num_train=24, num_val=30, num_parallel=50, vocab_size=500, seed=3)
# sha256[:16] of the files of SPEC as the generator wrote them before region files existed (main f743261): the
# demo's image-caption and parallel data, hence its recorded numbers, are unchanged (spm.model bytes are not
# reproducible between runs, so not pinned).
BEFORE_REGIONS = {"train": "ffff271320fbb5f8", "val": "2b8348ce0765bff0", "parallel": "4fa367aae35584b5"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_data")


@pytest.fixture(scope="module")
def paths(data_dir):
    return demo.prepare_demo(data_dir / "demo", SPEC)


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_other_demo_files_are_unchanged(paths):
    for key, digest in BEFORE_REGIONS.items():
        assert hashlib.sha256(pathlib.Path(paths[key]).read_bytes()).hexdigest()[:16] == digest, key


def test_region_records_are_valid_and_boxes_enclose_their_shapes(paths):
    train, val = _records(paths["region_train"]), _records(paths["region_val"])
    assert (len(train), len(val)) == (SPEC.num_train, SPEC.num_val)
    counts = set()
    for record in val:
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(record["binary"]))), np.float64)
        assert pixels.shape == (48, 48, 3)
        counts.add(len(record["elems"]))
        scenes = []
        for elem in record["elems"]:
            x, y, w, h = elem["bb"]
            assert all(isinstance(v, int) for v in elem["bb"]) and w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= 48 and y + h <= 48
            assert sorted(elem["caption"]) == sorted(demo.LANGUAGES)
            _, size, colour, shape = elem["caption"]["en"].split()
            scene = demo.Scene(shape=shape, colour=colour, size=size)
            assert {lang: demo.caption(scene, lang) for lang in demo.LANGUAGES} == elem["caption"]
            scenes.append(scene)
            # the shape's colour lies inside its box, and most of its pixels do
            near = np.linalg.norm(pixels - np.array(demo.COLOURS[colour]), axis=-1) < 40
            inside = near[y:y + h, x:x + w].sum()
            assert inside > 0.02 * w * h, elem
        assert len(set(scenes)) == len(scenes)  # each caption names one shape of the picture
        boxes = [e["bb"] for e in record["elems"]]
        for i, a in enumerate(boxes):  # no two boxes overlap
            for b in boxes[i + 1:]:
                assert a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1]
        assert record["caption"]["en"] == " and ".join(e["caption"]["en"] for e in record["elems"])
    assert counts == {2, 3}


def test_region_files_are_deterministic_and_added_to_older_directories(paths, tmp_path):
    again = demo.prepare_demo(tmp_path, SPEC)
    for key in ("region_train", "region_val"):
        assert pathlib.Path(again[key]).read_bytes() == pathlib.Path(paths[key]).read_bytes()
        os.remove(again[key])  # as a directory generated before region files existed
    assert demo.prepare_demo(tmp_path, SPEC) == again
    for key in ("region_train", "region_val"):
        assert pathlib.Path(again[key]).read_bytes() == pathlib.Path(paths[key]).read_bytes()


def test_box_iou_hand_computed():
    a = np.array([[0.25, 0.25, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 0.0, 0.0]])
    b = np.array([[0.375, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5], [0.5, 0.5, 0.0, 0.0]])
    # row 0: overlap 0.375 x 0.5 = 0.1875, union 0.25 + 0.25 - 0.1875 = 0.3125
    np.testing.assert_allclose(grounding.box_iou(a, b), [0.6, 0.0, 0.0], atol=1e-12)


def test_grounding_metrics_hand_computed():
    box_a, box_b = [0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]
    data = grounding.GroundingSet(
        images=np.zeros((1, 8, 8, 3), np.uint8), image_index=np.zeros(3, np.int32),
        language=np.array(["en", "de", "en"]), text=np.array(["a", "b", "c"]),
        box=np.array([box_a, box_a, box_b]), image_boxes=[np.array([box_a, box_b])])
    pred = np.array([box_a, [0.375, 0.25, 0.5, 0.5], [0.75, 0.75, 0.25, 0.25]])  # IoU 1, 0.6, 0.25
    out = grounding.grounding_metrics(data, pred)
    assert out["en/grounding_acc"] == pytest.approx(50.0)
    assert out["de/grounding_acc"] == pytest.approx(100.0)
    assert out["grounding_acc"] == pytest.approx(200.0 / 3)
    assert out["en/mean_iou"] == pytest.approx(0.625) and out["de/mean_iou"] == pytest.approx(0.6)
    assert out["chance_random_shape"] == pytest.approx(50.0)  # one of the picture's two boxes is right
    # mean box (5/12, 5/12, 0.5, 0.5): IoU 1/9 / (1/2 - 1/9) = 2/7 with box a, less with box b
    assert out["chance_mean_box"] == pytest.approx(0.0)


@pytest.fixture(scope="module")
def config(data_dir, paths):
    cfg = load_config_file(REPO / "configs/demo.py", "4m,4")
    cfg.data.data_dir = str(data_dir)
    cfg.data.demo = dataclasses.asdict(SPEC)
    return cfg


def test_demo_4m_config_is_valid(config):
    validate_run_config(config, num_devices=1)
    assert dict(config.data.mix) == {"parallel_text": 2, "image_caption": 1, "region": 1}
    assert config.data.region.kind == "demo" and config.evals.grounding.kind == "grounding"
    config.data.region.kind = "coco"
    with pytest.raises(ValueError, match="config.data.region.kind: must be 'jsonl' or 'demo', got 'coco'"):
        validate_run_config(config, num_devices=1)
    config.data.region.kind = "demo"
    with pytest.raises(ValueError, match="'N', '4m' or '4m,N'"):
        load_config_file(REPO / "configs/demo.py", "4m,x")


@pytest.mark.parametrize("spec, error", [
    ({"kind": "grounding", "every": 0, "paths": ("/nonexistent/regions.jsonl",)},
     r"config.evals.ground.paths\[0\]: file '/nonexistent/regions.jsonl' does not exist"),
    ({"kind": "grounding", "every": 0, "k_test": 4}, r"config.evals.ground: unknown option\(s\) \['k_test'\]"),
    ({"kind": "grounding", "every": 0, "paths": "regions.jsonl"}, r"config.evals.ground.paths must be a list"),
    ({"kind": "grounded", "every": 0}, r"config.evals.ground.kind must be one of \('dev_retrieval', 'grounding'\)"),
])
def test_grounding_evaluator_spec_is_checked(config, spec, error):
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        trainer.evaluators_from_config({"ground": spec}, eval_makers(config, tokenizer=None))


def test_grounding_evaluator_predicts_the_models_whole_image_boxes(config, paths):
    """The evaluator's batched, padded forward equals the model's own whole-image box (`CCLM.__call__`'s bbox:
    fusion over every image token, `bbox_head` on the text CLS) row by row, and its metrics add up."""
    tokenizer = load_tokenizer(config.data)
    resolve_vocab(config, tokenizer.vocab_size, tokenizer.mask_id)
    config.data.eval.batch_size = 7  # several batches, the last one padded
    data = grounding.load_grounding_set([paths["region_val"]], image_field="binary", image_root="", image_res=64)
    assert len(data.images) == SPEC.num_val and set(data.language) == set(demo.LANGUAGES)
    model = build_model(config.model)
    rows = slice(0, 9)
    ids, atts = pad_batch(tokenizer.encode_batch([pre_caption(t, 8) for t in data.text[rows]]), 8)
    images = normalize(jnp.asarray(data.images[data.image_index[rows]]))
    params = model.init(jax.random.PRNGKey(0), images[:1], ids[:1], atts[:1])["params"]
    [evaluate] = [e.fn for e in trainer.evaluators_from_config(
        {"ground": {"kind": "grounding", "every": 0, "paths": (paths["region_val"],)}}, eval_makers(config, tokenizer))]
    pred = grounding.predict_boxes(model, params, data, tokenizer, max_tokens=8, max_words=8, batch_size=7)
    expected = model.apply({"params": params}, images, ids, atts)["bbox"]
    np.testing.assert_allclose(pred[rows], np.asarray(expected), atol=1.2e-7)  # measured 6e-8
    metrics = evaluate(params, 0)
    assert metrics == grounding.grounding_metrics(data, pred)
    assert {f"{lang}/grounding_acc" for lang in demo.LANGUAGES} <= set(metrics)


@pytest.mark.integration
def test_demo_4m_cli_run_reports_grounding(data_dir, paths, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
    demo_flags = [f"--config.data.demo.{k}={v}" for k, v in dataclasses.asdict(SPEC).items()]
    cmd = [sys.executable, "-m", "cclm_jax", "train", f"--config={REPO}/configs/demo.py:4m,4",
           f"--workdir={tmp_path}", "--config.train.log_every=1", f"--config.data.data_dir={data_dir}",
           *demo_flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/region/bbox" in r] == [3]  # cycle: pt, ic, region, pt
    final = {k: v for r in rows if r["step"] == 4 for k, v in r.items()}
    for lang in demo.LANGUAGES:
        assert 0.0 <= final[f"eval/grounding/{lang}/grounding_acc"] <= 100.0
        assert f"eval/dev/{lang}/i2t_r1" in final
    assert 30.0 < final["eval/grounding/chance_random_shape"] < 50.0  # 1 / (2 or 3 shapes)


def test_swin_absolute_position_embedding_option():
    """`model.vision.ape` (the official Swin option): a (1, P, C) table added after the patch embedding, so the
    same picture shifted by a patch is no longer the same token set; off, there is no such parameter."""
    from cclm_jax.interop.export import architecture_dict
    from cclm_jax.models.swin import SwinTransformer

    kwargs = dict(image_res=32, patch_size=4, embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=4)
    image = jnp.zeros((1, 32, 32, 3)).at[:, 4:8, 4:8].set(1.0)
    plain = SwinTransformer(**kwargs).init(jax.random.PRNGKey(0), image)["params"]
    assert "absolute_pos_embed" not in plain
    model = SwinTransformer(**kwargs, ape=True)
    params = model.init(jax.random.PRNGKey(0), image)["params"]
    assert params["absolute_pos_embed"].value.shape == (1, 64, 8)
    zero = jax.tree_util.tree_map(lambda x: x, params)
    zero["absolute_pos_embed"] = zero["absolute_pos_embed"].replace_boxed(jnp.zeros((1, 64, 8)))
    with_table = model.apply({"params": params}, image)
    np.testing.assert_allclose(model.apply({"params": zero}, image),
                               SwinTransformer(**kwargs).apply({"params": plain}, image), atol=1e-6)
    assert not np.allclose(with_table, model.apply({"params": zero}, image), atol=1e-3)
    config = load_config_file(REPO / "configs/demo.py", "4m").model
    with pytest.raises(ValueError, match="model.vision.ape: a Swin with an absolute position embedding cannot"):
        architecture_dict(config)
