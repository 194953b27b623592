"""Test setup: 8 fake CPU devices (must happen before jax is imported anywhere)."""
import os

# 8 fake CPU devices; LLVM optimisation level 0 compiles the tiny models ~4x faster (tests are
# dominated by compile time, not run time).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Compiled executables are shared between tests and xdist workers through JAX's persistent cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/cclm_jax_test_compile_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ (not part of the package) is imported as `benchmarks.*`
    sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
GOLDEN = SHARED / "reference" / "golden"
DATA = SHARED / "data"


INTEGRATION = os.environ.get("CCLM_INTEGRATION", "") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "libtpu: compiles for a TPU topology from this CPU; needs libtpu "
                            "(pip install 'jax[tpu]'), skipped without it")
    config.addinivalue_line("markers", "integration: a long end-to-end run (minutes: whole CLI programs, several "
                            "processes, real data); run with CCLM_INTEGRATION=1, skipped otherwise")


def pytest_collection_modifyitems(config, items):
    """Integration tests run only with CCLM_INTEGRATION=1 (or when `-m` selects them), keeping the default suite
    within its time budget; what they cover is listed in the README."""
    if INTEGRATION or "integration" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="integration test: set CCLM_INTEGRATION=1 to run it")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def golden_dir():
    if not (GOLDEN / "ref_ckpt.th").exists():
        pytest.skip("../shared/reference/golden is absent")
    return GOLDEN


@pytest.fixture(scope="session")
def shared_data_dir():
    if not DATA.exists():
        pytest.skip("../shared/data is absent")
    return DATA


@pytest.fixture(scope="session")
def golden_model(golden_dir):
    """(model_config, params, model, reference npz) from the official golden checkpoint (4 text heads)."""
    import numpy as np

    from cclm_jax.interop import official
    from cclm_jax.models import build_model

    cfg, params = official.load(golden_dir / "ref_ckpt.th", text_num_heads=4)
    return cfg, params, build_model(cfg), dict(np.load(golden_dir / "ref_outputs.npz"))


@pytest.fixture(scope="session")
def tiny_params():
    """(model_config, params) of the tiny (golden-sized) model.

    The golden checkpoint's weights when `../shared` is present (cheap to read), else a jitted random init.
    """
    if (GOLDEN / "ref_ckpt.th").exists():
        from cclm_jax.interop import official

        return official.load(GOLDEN / "ref_ckpt.th", text_num_heads=4)
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from cclm_jax.models import build_model, tiny_model_config

    cfg = tiny_model_config()
    model = build_model(cfg)
    ids = jnp.zeros((1, 8), jnp.int32)
    init = jax.jit(lambda key: nn.meta.unbox(model.init(key, jnp.zeros((1, 224, 224, 3)), ids, ids)["params"]))
    return cfg, init(jax.random.PRNGKey(0))


@pytest.fixture(scope="session")
def micro_params():
    """(model_config, params): a CCLM smaller than the tiny one, with random weights drawn in numpy (nothing
    compiled), for task tests: 32 px, 2 Swin stages of one block (window 4), 1 text + 1 fusion layer, no
    dropout (random-number ops dominate CPU compile time)."""
    import jax
    import numpy as np

    from cclm_jax.interop.shapes import param_shapes
    from cclm_jax.models import tiny_model_config

    cfg = tiny_model_config()
    cfg.vision.update(image_res=32, window_size=4, depths=(1, 1), num_heads=(2, 4), embed_dim=64,
                      drop_path_rate=0.0)
    cfg.text.update(num_layers=2, fusion_layer=1, hidden_dropout=0.0, attention_dropout=0.0)
    rng = np.random.default_rng(0)

    def leaf(path, shape):
        name = path[-1].key
        if name == "scale":
            return np.ones(shape, np.float32)
        if name == "temp":
            return np.full(shape, cfg.temp, np.float32)
        return (0.05 * rng.normal(size=shape)).astype(np.float32)

    shapes = param_shapes(cfg)
    return cfg, jax.tree_util.tree_map_with_path(leaf, shapes, is_leaf=lambda x: isinstance(x, tuple))
