"""Training metrics arithmetic (no compile): step times one step behind, model FLOPs per step and per second
per batch kind, MFU against a (fake) chip's peak, and agreement with `flops.describe`."""
import json
import pathlib
import re
import sys
import types

import jax
import numpy as np
import pytest

from cclm_jax import flops
from cclm_jax.train.metrics import MetricsWriter

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import cclm_base  # noqa: E402  (configs/cclm_base.py)
import tiny  # noqa: E402  (configs/tiny.py)

ROWS = 8  # host rows per batch kind (tiny config), one process


@pytest.mark.parametrize("device_kind,tflops", [
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5p", 459.0), ("TPU v6 lite", 918.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", 989.4), ("cpu", None), ("Some Future Chip", None),
])
def test_peak_of_each_device_kind(device_kind, tflops):
    peak = flops.peak_flops(device_kind)
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))


def _config():
    config = tiny.get_config("micro")
    config.model.text.update(vocab_size=1000, mask_token_id=999)
    return config


class Clock:
    """Scripted clock: each call returns the next time."""

    def __init__(self, *times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def _metrics(loss):
    return {"loss": np.float32(loss)}


STATE = types.SimpleNamespace(nonfinite=np.int32(0))


def test_alternating_steps_report_model_flops_and_mfu_per_kind(tmp_path):
    config = _config()
    # t=0 start; steps finish at 2, 3, 5 (seen when the next step is recorded) and 6 (seen by flush); flush at 6.5
    writer = MetricsWriter(str(tmp_path), config.train.num_steps, flops.run_model_flops(config),
                           device_kind="TPU v5 lite", clock=Clock(0.0, 2.0, 3.0, 5.0, 6.0, 6.5))
    for kind, loss in (("image_caption", 4.0), ("parallel_text", 3.0), ("image_caption", 2.0), ("parallel_text", 1.0)):
        writer.record(kind, _metrics(loss), {kind: ROWS}, input_seconds=0.5)
    scalars = writer.flush(4, STATE, {})
    writer.close()

    # independent per-example counts at the tiny config's padded shapes (16 tokens, 4 masks for both kinds)
    per_example = {k: flops.model_flops(config.model, k, flops.TextShapes(16, 4)) for k in flops.KINDS}
    peak = 197e12 * jax.device_count()
    seconds = {"image_caption": 2.0 + 2.0, "parallel_text": 1.0 + 1.0}
    for kind in flops.KINDS:
        step_flop = per_example[kind] * ROWS
        assert scalars[f"train/{kind}/step_seconds"] == pytest.approx(seconds[kind] / 2)
        assert scalars[f"train/{kind}/examples_per_sec"] == pytest.approx(2 * ROWS / seconds[kind])
        assert scalars[f"train/{kind}/input_wait_fraction"] == pytest.approx(1.0 / seconds[kind])
        assert scalars[f"train/{kind}/model_tflop_per_step"] == pytest.approx(step_flop / 1e12)
        assert scalars[f"train/{kind}/model_tflop_per_sec"] == pytest.approx(2 * step_flop / seconds[kind] / 1e12)
        assert scalars[f"train/{kind}/mfu"] == pytest.approx(2 * step_flop / seconds[kind] / peak)
    assert scalars["train/image_caption/loss"] == pytest.approx(3.0)
    interval_flop = 2 * ROWS * (per_example["image_caption"] + per_example["parallel_text"])
    assert scalars["train/seconds_per_step"] == pytest.approx(6.5 / 4)
    assert scalars["train/model_tflop_per_sec"] == pytest.approx(interval_flop / 6.5 / 1e12)
    assert scalars["train/mfu"] == pytest.approx(interval_flop / 6.5 / peak)
    written = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert written["step"] == 4 and written["train/mfu"] == pytest.approx(scalars["train/mfu"])


def test_joint_steps_count_both_kinds_and_cpu_has_no_mfu(tmp_path):
    config = _config()
    writer = MetricsWriter(str(tmp_path), config.train.num_steps, flops.run_model_flops(config),
                           device_kind="cpu", clock=Clock(0.0, 1.5, 3.0, 3.0))
    for _ in range(2):
        writer.record("joint", _metrics(1.0), {"image_caption": ROWS, "parallel_text": ROWS}, input_seconds=0.0)
    scalars = writer.flush(2, STATE, {})
    writer.close()
    both = sum(flops.model_flops(config.model, k, flops.TextShapes(16, 4)) for k in flops.KINDS) * ROWS
    assert scalars["train/joint/model_tflop_per_step"] == pytest.approx(both / 1e12)
    assert scalars["train/joint/model_tflop_per_sec"] == pytest.approx(both / 1.5 / 1e12)
    assert scalars["train/joint/examples_per_sec"] == pytest.approx(2 * ROWS / 1.5)
    assert not [k for k in scalars if k.endswith("mfu")]


def test_metrics_count_the_flops_that_info_describes(tmp_path):
    """`cclm-jax info` (flops.describe) and the training metrics use one per-example count (cclm_base)."""
    config = cclm_base.get_config()
    batch = config.data.image_caption.batch_size
    writer = MetricsWriter(str(tmp_path), config.train.num_steps, flops.run_model_flops(config),
                           device_kind="cpu", clock=Clock(0.0))
    described = dict(re.findall(r"^(\w+): ([\d.]+) GFLOPs/example training", flops.describe(config), re.M))
    assert described == {"image_caption": "248.3", "parallel_text": "275.8"}  # benchmarks/RESULTS.md
    for kind, gflops in described.items():
        per_example = writer.step_model_flop({kind: batch}) / batch
        assert f"{per_example / 1e9:.1f}" == gflops
    writer.close()


def test_evaluation_time_is_left_out_of_the_step_times(tmp_path):
    """Step 1 ends at t=2, an evaluation runs 2..7, step 2 ends at 8: steps took 2 s and 1 s, not 2 s and 6 s."""
    config = _config()
    writer = MetricsWriter(str(tmp_path), config.train.num_steps, flops.run_model_flops(config),
                           device_kind="cpu", clock=Clock(0.0, 2.0, 2.0, 7.0, 8.0, 8.0))
    writer.record("parallel_text", _metrics(1.0), {"parallel_text": ROWS}, input_seconds=0.0)
    assert writer.exclude(lambda: "evaluated") == "evaluated"
    writer.record("parallel_text", _metrics(1.0), {"parallel_text": ROWS}, input_seconds=0.0)
    scalars = writer.flush(2, STATE, {})
    writer.close()
    assert scalars["train/parallel_text/step_seconds"] == pytest.approx(1.5)
    assert scalars["train/seconds_per_step"] == pytest.approx(1.5)
