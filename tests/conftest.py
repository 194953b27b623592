"""Test setup: 8 fake CPU devices (must happen before jax is imported anywhere)."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GOLDEN = SHARED / "reference" / "golden"
DATA = SHARED / "data"


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
