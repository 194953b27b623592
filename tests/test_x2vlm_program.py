"""CCLM-X2VLM as a program: parameter counts and key layout of the full sizes (abstract, nothing allocated),
config validation, per-tower learning rates, and `cclm-jax train` (joint updates) -> `export` -> `import`."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import linen as nn

from cclm_jax.interop import official
from cclm_jax.interop.shapes import abstract_params, official_shapes, param_shapes
from cclm_jax.models import build_model, x2vlm_model_config
from cclm_jax.models.cclm import vision_stride
from cclm_jax.optimizer import param_multipliers
from cclm_jax.run_config import load_config_file
from tests.conftest import REPO


def _count(tree) -> int:
    return sum(int(np.prod(s)) for s in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, tuple)))


def test_full_size_parameter_counts():
    base = param_shapes(x2vlm_model_config("base"))
    decoder = int(np.prod(base["mlm_head"]["decoder"]))
    assert _count(base) == 615_540_825 and _count(base) - decoder == 423_539_289
    assert _count(param_shapes(x2vlm_model_config("large"))) == 1_225_073_817


def test_base_key_layout_is_the_official_shapes():
    """The state_dict the base config implies: X2-VLM's module structure at BEiT-v2-B / XLM-R base sizes."""
    shapes = {key: (shape, dtype) for key, shape, dtype in official_shapes(x2vlm_model_config("base"))}
    assert len(shapes) == 1 + (2 + 1 + 12 * 17 + 2) + (6 + 12 * 16) + 6 * 26 + 4 + 12 + 7
    assert shapes["vision_encoder.blocks.11.attn.relative_position_bias_table"] == ((732, 12), "float32")
    assert shapes["vision_encoder.blocks.0.attn.relative_position_index"] == ((197, 197), "int64")
    assert shapes["vision_encoder.blocks.0.attn.qkv.weight"] == ((2304, 768), "float32")
    assert shapes["text_encoder.embeddings.word_embeddings.weight"] == ((250002, 768), "float32")
    assert shapes["text_encoder.embeddings.position_ids"] == ((1, 514), "int64")
    assert "text_encoder.encoder.layer.11.output.dense.weight" in shapes
    assert not any(k.startswith("text_encoder.encoder.layer.12.") or ".crossattention." in k and
                   k.startswith("text_encoder.") for k in shapes)
    assert shapes["cross_encoder.encoder.layer.5.crossattention.self.key.weight"] == ((768, 768), "float32")
    assert shapes["mlm_head.predictions.decoder.weight"] == ((250002, 768), "float32")
    assert shapes["mlm_head.predictions.decoder.bias"] == ((250002,), "float32")


@pytest.mark.parametrize("field,value,message", [
    ("cross.num_heads", 5, "not divisible by model.cross.num_heads"),
    ("text.fusion_layer", 2, "must equal num_layers"),
    ("vision.embed_dim", 64, "must equal model.text.hidden_size"),
    ("vision.pool", "max", "model.vision.pool"),
    ("vision.image_res", 200, "divisible by patch_size"),
])
def test_invalid_x2vlm_config_is_rejected(field, value, message):
    cfg = x2vlm_model_config("tiny")
    section, name = field.split(".")
    cfg[section][name] = value
    if field == "vision.embed_dim":
        cfg.vision.num_heads = 2
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


def test_per_tower_learning_rates():
    """cross 4e-5 (the base lr), vision x0.5 = 2e-5, text x2 = 8e-5, projections / heads / temp x2."""
    config = load_config_file(REPO / "configs" / "cclm_x2vlm_base.py", "runlocal")
    config.model.text.update(vocab_size=1000, mask_token_id=999)
    o = config.optimizer
    assert o.lr == 4e-5 and o.clip_grad_norm == 1.0 and config.train.mode == "joint"
    mult = param_multipliers(nn.meta.unbox(abstract_params(config.model)), o.lr_mults)
    assert mult["vision_encoder"]["blocks_0"]["attn"]["qkv"]["kernel"] == 0.5
    assert mult["text_encoder"]["embeddings"]["word_embeddings"] == 2.0
    assert mult["text_encoder"]["layer_3"]["output"]["dense"]["kernel"] == 2.0
    assert mult["cross_encoder"]["layer_0"]["crossattention"]["self"]["key"]["kernel"] == 1.0
    assert mult["mlm_head"]["decoder"] == 1.0
    assert mult["itm_head"]["fc1"]["kernel"] == mult["temp"] == mult["vision_proj"]["kernel"] == 2.0


def _env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
    return env


@pytest.mark.integration
def test_cli_trains_exports_and_imports(tmp_path):
    """`cclm-jax train` of the runlocal recipe shrunk further (2 joint updates), `export` to the X2-VLM layout,
    `import` back: the parameters survive bit for bit."""
    small = ["--config.model.vision.image_res=32", "--config.data.image_caption.image_res=32",
             "--config.data.eval.image_res=32", "--config.model.vision.depth=1", "--config.model.text.num_layers=1",
             "--config.model.text.fusion_layer=1", "--config.model.cross.num_layers=1", "--config.train.dropout=False",
             "--config.train.num_steps=2", "--config.train.checkpoint_every=2", "--config.evals.dev.every=-1",
             f"--config.data.data_dir={os.environ.get('CCLM_TEST_DATA_DIR', '/tmp/cclm_jax_test_data')}"]
    cli = [sys.executable, "-m", "cclm_jax"]

    def run(*args):
        proc = subprocess.run([*cli, *args], env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run("train", "--config=configs/cclm_x2vlm_base.py:runlocal", f"--workdir={tmp_path / 'run'}", *small)
    run("export", f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'run.th'}")
    exported = torch.load(tmp_path / "run.th", map_location="cpu", weights_only=True)["model"]
    assert "cross_encoder.encoder.layer.0.crossattention.self.query.weight" in exported
    assert exported["mlm_head.predictions.decoder.bias"].data_ptr() == exported["mlm_head.predictions.bias"].data_ptr()
    cfg, params = official.load(tmp_path / "run.th")
    assert cfg.cross.num_layers == 1 and cfg.vision.image_res == 32
    run("import", f"--checkpoint={tmp_path / 'run.th'}", f"--workdir={tmp_path / 'imported'}")
    sys.path.insert(0, str(REPO / "tests"))
    from run_checks import assert_bitwise_equal, workdir_params

    assert_bitwise_equal(workdir_params(tmp_path / "run"), jax.tree.map(np.asarray, params))
    assert_bitwise_equal(workdir_params(tmp_path / "imported"), jax.tree.map(np.asarray, params))


@pytest.mark.integration
def test_cli_trains_with_region_batches(tmp_path):
    """`cclm-jax train` of the runlocal recipe at 32 px with region batches (ViT patch 16): two joint updates, each
    logging the five region losses with the image-caption and parallel-text ones, and the total their sum."""
    import json

    from tests.test_data_region import _region_file

    _region_file(tmp_path / "regions.jsonl", n_images=16)
    args = ["--config.model.vision.image_res=32", "--config.data.image_caption.image_res=32",
            "--config.data.eval.image_res=32", "--config.model.vision.depth=1", "--config.model.text.num_layers=1",
            "--config.model.text.fusion_layer=1", "--config.model.cross.num_layers=1", "--config.train.dropout=False",
            "--config.train.num_steps=2", "--config.train.log_every=1", "--config.evals.dev.every=-1",
            f"--config.data.data_dir={os.environ.get('CCLM_TEST_DATA_DIR', '/tmp/cclm_jax_test_data')}",
            "--config.data.mix={'parallel_text': 2, 'image_caption': 1, 'region': 1}",
            f"--config.data.region.paths=('{tmp_path / 'regions.jsonl'}',)", "--config.data.region.image_res=32",
            "--config.data.region.patch_size=16", "--config.data.region.batch_size=8",
            "--config.data.region.max_images=4"]
    proc = subprocess.run([sys.executable, "-m", "cclm_jax", "train", "--config=configs/cclm_x2vlm_base.py:runlocal",
                           f"--workdir={tmp_path / 'run'}", *args], env=_env(), capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/joint/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    names = {"region": ("itc", "itm", "mlm", "bbox", "giou"), "image_caption": ("itc", "itm", "mlm"),
             "parallel_text": ("ttc", "ttm", "mlm")}
    for row in steps:
        values = [row[f"train/joint/{kind}/{n}"] for kind, ns in names.items() for n in ns]
        assert all(np.isfinite(v) and v > 0 for v in values)
        assert row["train/joint/loss"] == pytest.approx(sum(values), rel=1e-5)


def test_tower_init_keys_are_checked_against_the_model_family(tmp_path):
    from cclm_jax.run_config import validate_run_config

    config = load_config_file(REPO / "configs" / "cclm_base.py", "runlocal")
    config.init.vision_path = str(tmp_path)
    with pytest.raises(ValueError, match="config.init.vision_path: tower checkpoints initialise a CCLM-X2VLM"):
        validate_run_config(config, num_devices=1)
    config = load_config_file(REPO / "configs" / "cclm_x2vlm_base.py", "runlocal")
    config.init.text_path = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="config.init.text_path"):
        validate_run_config(config, num_devices=1)


def test_x2vlm_region_batches_need_the_vit_patch_grid(tmp_path):
    """Region batches are accepted for CCLM-X2VLM when `data.region.patch_size` is the ViT's patch size (16: the
    14x14 grid of its tokens), refused in one line naming both keys otherwise."""
    from cclm_jax.run_config import validate_run_config
    from tests.test_data_region import _region_file

    _region_file(tmp_path / "regions.jsonl", n_images=2)
    config = load_config_file(REPO / "configs" / "cclm_x2vlm_base.py", "runlocal")
    config.data.mix = {"parallel_text": 2, "image_caption": 1, "region": 1}  # joint: one batch of each per update
    config.data.region.paths = (str(tmp_path / "regions.jsonl"),)
    with pytest.raises(ValueError, match=r"config.data.region.patch_size 32 must equal the image tower's total "
                                         r"stride 16 \(model.vision.patch_size\)"):
        validate_run_config(config, num_devices=1)  # the default region grid is Swin-B's (patch 32)
    config.data.region.patch_size = 16
    validate_run_config(config, num_devices=1)
    cclm = load_config_file(REPO / "configs" / "tiny.py", "micro,4m")
    cclm.data.region.update(paths=config.data.region.paths, patch_size=16)
    stride = vision_stride(cclm.model)
    assert stride == cclm.model.vision.patch_size * 2 == 8  # 2 Swin stages
    with pytest.raises(ValueError, match=rf"stride {stride} \(model.vision.patch_size x 2\^\(stages - 1\)\)"):
        validate_run_config(cclm, num_devices=1)


def test_x2vlm_joint_update_on_pipeline_region_batches(tmp_path):
    """A region batch from the training pipeline (32 px, ViT patch 16: 1 + 2x2 tokens) through the pre-training
    loss (`train.steps.pretraining_losses`, 'joint') of a micro CCLM-X2VLM: the five losses, finite and positive,
    and gradients reaching the ViT, the cross encoder and the box head."""
    from cclm_jax.data import pipeline
    from cclm_jax.data.config import default_data_config, validate_data_config
    from cclm_jax.data.tokenizer import Tokenizer
    from cclm_jax.objectives import default_objectives_config
    from cclm_jax.train.steps import StepConfig, pretraining_losses
    from cclm_jax.train_state import global_norm
    from tests.test_data_region import WORDS, _region_file

    _region_file(tmp_path / "regions.jsonl", n_images=6)
    tok = Tokenizer.train([" ".join(WORDS)] * 20 + ["a picture", "ein bild de"], tmp_path / "spm", vocab_size=60)
    data = default_data_config()
    data.data_dir, data.shuffle_buffer, data.mix = str(tmp_path / "cache"), 8, {"region": 1}
    data.region.update(paths=(str(tmp_path / "regions.jsonl"),), image_res=32, patch_size=16, batch_size=6,
                       max_images=3, max_tokens=12, max_words=12, max_masks=4)
    validate_data_config(data)
    batch = next(pipeline.build_train_pipelines(data, tok)["region"])
    assert batch["image_atts"].shape == (6, 1 + 2 * 2)
    cfg = x2vlm_model_config("tiny")
    cfg.vision.update(image_res=32, depth=1)
    cfg.text.update(vocab_size=tok.vocab_size, mask_token_id=tok.mask_id, num_layers=1, fusion_layer=1)
    cfg.cross.num_layers = 1
    params = jax.jit(build_model(cfg).init)(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32),
                                            np.zeros((1, 4), np.int32), np.ones((1, 4), np.int32))["params"]
    loss_fn = pretraining_losses(StepConfig(cfg, default_objectives_config(), dropout=False), "joint",
                                 ("region",))["joint"]
    (total, measured), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        nn.meta.unbox(params), {"region": batch}, jax.random.PRNGKey(1))
    names = ("itc", "itm", "mlm", "bbox", "giou")
    assert sorted(measured) == sorted(names)
    for name in names:
        assert np.isfinite(float(measured[name])) and float(measured[name]) > 0, name
    assert float(total) == pytest.approx(sum(float(measured[n]) for n in names), rel=1e-6)
    for module in ("vision_encoder", "cross_encoder", "bbox_head", "text_encoder"):
        norm = float(global_norm(grads[module]))
        assert np.isfinite(norm) and norm > 0, module


def test_only_retrieval_fine_tunes_x2vlm():
    from cclm_jax.tasks.definitions import build_task_model

    cfg = x2vlm_model_config("tiny")
    assert type(build_task_model("retrieval", cfg)).__name__ == "X2VLM"
    with pytest.raises(ValueError, match="'xvnli' has no CCLM-X2VLM model"):
        build_task_model("xvnli", cfg)
