"""The 4M mixture end to end through the CLI (micro config, `configs/tiny.py:micro,4m`): parallel-text,
image–caption and region updates, a checkpoint, and a resumed run that continues with the region batch.
The resumed run is compared bit for bit with an uninterrupted one (an integration test: CCLM_INTEGRATION=1)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from run_checks import assert_bitwise_equal, logged_losses, workdir_params  # noqa: E402
from test_data_region import _region_file  # noqa: E402

DEMO_DIR = pathlib.Path(os.environ.get("CCLM_TEST_DATA_DIR", "/tmp/cclm_jax_test_data"))


def _train(workdir, regions, steps):
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
    cmd = [sys.executable, "-m", "cclm_jax", "train", f"--config={REPO}/configs/tiny.py:micro,4m,{steps}",
           f"--workdir={workdir}", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
           "--config.evals.dev.every=-1", f"--config.data.data_dir={DEMO_DIR}",
           f"--config.data.region.paths=('{regions}',)"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def regions(tmp_path_factory):
    path = tmp_path_factory.mktemp("regions") / "regions.jsonl"
    _region_file(path, n_images=16)
    return path


@pytest.mark.integration
def test_4m_mixture_trains_and_resumes(regions, tmp_path):
    _train(tmp_path, regions, 2)  # parallel_text, image_caption; checkpoint at step 2
    _train(tmp_path, regions, 3)  # resumed: the region update
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows}
    assert sorted(by_step) == [1, 2, 3]
    assert "train/parallel_text/ttc" in by_step[1] and "train/image_caption/itc" in by_step[2]
    region = by_step[3]
    for name in ("itc", "itm", "mlm", "bbox", "giou"):
        assert region[f"train/region/{name}"] > 0, name
    total = sum(region[f"train/region/{n}"] for n in ("itc", "itm", "mlm", "bbox", "giou"))
    assert region["train/region/loss"] == pytest.approx(total, rel=1e-5)
    # schedule step = step // 2 (two updates per reference iteration): warmup 2 -> lr(step 2) = lr / 2
    config = json.loads((tmp_path / "config.json").read_text())
    assert region["train/region/lr"] == pytest.approx(config["optimizer"]["lr"] / 2, rel=1e-6)
    straight = tmp_path / "straight"
    _train(straight, regions, 3)
    assert_bitwise_equal(workdir_params(straight), workdir_params(tmp_path))
    assert logged_losses(straight) == logged_losses(tmp_path)
