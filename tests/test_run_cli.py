"""`cclm-jax train` runs (micro config on the demo data, CLI subprocesses): a quiet console (progress lines and the
run's own warnings on stderr, the final JSON on stdout, the libraries' chatter in WORKDIR/log.txt),
`train.nonfinite='stop'` (the last good state committed, a non-zero exit, a resumed run that continues), and an
`init.checkpoint` that does not fit the model refused before anything is written."""
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from cclm_jax.checkpoint import Checkpointer
from cclm_jax.interop import official
from cclm_jax.interop.shapes import param_shapes

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import tiny  # noqa: E402  (configs/tiny.py)

DEMO_DIR = pathlib.Path(os.environ.get("CCLM_TEST_DATA_DIR", "/tmp/cclm_jax_test_data"))
STEPS = 4
# Joint updates (one per schedule step) with lr(k) = 5e37 * (k / 1 for k < 1, else max(0, 2 - k)): k = 0, 2, 3
# train at lr 0 (finite), k = 1 at 5e37 (x2 for the new parameters), which overflows the weights: exactly the
# update of step index 1 is non-finite.
ONE_BAD_STEP = ["--config.train.mode=joint", "--config.optimizer.lr=5e37", "--config.schedule.warmup_steps=1",
                "--config.schedule.total_steps=2"]
# Compile time dominates these runs: no dropout (random-number ops) and one block per Swin stage, 1 + 1 text layers.
SMALLER = ["--config.train.dropout=False", "--config.model.vision.depths=(1, 1)", "--config.model.text.num_layers=2",
           "--config.model.text.fusion_layer=1"]
STEP_LINE = re.compile(r"step (\d+)/4  (\S+=-?\d+\.\d{4} ?)+  \d+\.\d\ds/step  \d+\.\d ex/s  \S+ TFLOP/s  "
                       r"ETA \d+:\d\d:\d\d")


def _train(workdir, *extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
    cmd = [sys.executable, "-m", "cclm_jax", "train", f"--config={REPO}/configs/tiny.py:micro,{STEPS}",
           f"--workdir={workdir}", "--config.train.log_every=1", "--config.evals.dev.every=-1",
           "--config.train.checkpoint_every=100", f"--config.data.data_dir={DEMO_DIR}", *SMALLER, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)


def _console(proc) -> list[str]:
    """The stderr lines, without the one-off warning of a first build of the demo data (shared between tests)."""
    return [line for line in proc.stderr.splitlines() if not line.startswith("warning: building ")]


@pytest.fixture(scope="module")
def stopped_and_resumed(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stop")
    first = _train(workdir, "--config.train.nonfinite=stop", *ONE_BAD_STEP)
    committed = Checkpointer(str(workdir), every=1, keep=10)
    steps = committed.all_steps()
    committed.close()
    temporary = sorted(p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name)
    log_after_first = (workdir / "log.txt").read_text()
    second = _train(workdir, "--config.train.nonfinite=stop", *ONE_BAD_STEP)
    return workdir, first, steps, temporary, log_after_first, second


def test_nonfinite_stop_commits_the_last_good_state_and_a_resumed_run_continues(stopped_and_resumed):
    workdir, first, steps, temporary, _, second = stopped_and_resumed
    assert first.returncode == 2, first.stderr[-3000:]
    assert first.stderr.splitlines()[-1] == ("error: a non-finite loss, gradient or parameter before step 2 (config."
                                             "train.nonfinite='stop'); the last good state was saved at this step")
    assert steps == [2] and temporary == []  # the save was committed, not left as a temporary directory
    # The resumed run trains steps 3 and 4 (finite again) and finishes: the counter of earlier non-finite updates
    # (cumulative in the state) does not stop it again.
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 2" in second.stderr
    assert [int(m.group(1)) for m in STEP_LINE.finditer(second.stderr)] == [3, 4]
    final = json.loads(second.stdout[second.stdout.index("{"):])
    assert final["train/nonfinite_updates"] == 1.0 and final["train/joint/skipped_nonfinite"] == 0.0
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/joint/skipped_nonfinite"]) for r in rows] == [(1, 0.0), (2, 1.0), (3, 0.0), (4, 0.0)]


def test_the_console_shows_one_line_per_log_step_and_chatter_goes_to_the_log_file(stopped_and_resumed):
    workdir, first, _, _, log_after_first, second = stopped_and_resumed
    log_file = workdir / "log.txt"
    expected = {first: ["process 0 of 1 reads input shards [0]", f"pretrain: {STEPS} steps in {workdir} (log: "
                        f"{log_file})", "data: no record skipped", "step 1/4", "step 2/4", "error: a non-finite"],
                second: ["process 0 of 1 reads input shards [0]", f"pretrain: {STEPS} steps in {workdir} (log: "
                         f"{log_file})", "data: no record skipped", "resumed from step 2", "step 3/4", "step 4/4"]}
    for proc, starts in expected.items():  # every console line, in order; the data's counts on every run
        lines = _console(proc)
        assert [line[:len(start)] for line, start in zip(lines, starts)] == starts and len(lines) == len(starts), lines
        step_lines = [line for line in lines if line.startswith("step ")]
        assert all(STEP_LINE.fullmatch(line) for line in step_lines), step_lines
        assert "joint/loss=" in step_lines[0] and "joint/image_caption/itc=" in step_lines[0]
    assert first.stdout == "" and second.stdout.startswith("{")  # the result only
    log = log_file.read_text()
    assert log.startswith(log_after_first)  # appended by the resumed run
    assert "CheckpointManager" in log  # Orbax
    assert re.search(r"\] \[2\] train/examples_per_sec=.*train/joint/grad_norm=", log)  # clu's full metric dump
    assert "oneDNN" in log  # TensorFlow's native start-up banner
    assert "cclm_jax.progress" in log and "step 4/4" in log


def test_an_init_checkpoint_that_does_not_fit_is_refused_before_anything_is_written(tmp_path):
    config = tiny.get_config("micro").model  # the runs' model (SMALLER) with another vocabulary than the demo's
    config.vision.depths = (1, 1)
    config.text.update(num_layers=2, fusion_layer=1, vocab_size=77, mask_token_id=76)
    params = jax.tree.map(lambda shape: np.zeros(shape, np.float32), param_shapes(config),
                          is_leaf=lambda x: isinstance(x, tuple))
    checkpoint = tmp_path / "other_vocab.th"
    official.save(checkpoint, config, params)
    workdir = tmp_path / "run"
    proc = _train(workdir, f"--config.init.checkpoint={checkpoint}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    match = re.fullmatch(
        rf"error: the parameters of config\.init\.checkpoint \({re.escape(str(checkpoint))}; the model is "
        r"config\.model with the vocabulary of config\.data\.tokenizer\) do not fit the model: wrong shape: "
        r"\['mlm_head'\]\['bias'\] \(77,\) in the checkpoint, \((\d+),\) in the model \(and 1 more\)",
        _console(proc)[-1])
    assert match, proc.stderr
    assert int(match.group(1)) > 100  # the demo tokenizer's vocabulary
    assert not (workdir / "config.json").exists() and not (workdir / "log.txt").exists()


def test_the_start_line_lists_the_skipped_records_by_kind():
    from cclm_jax.train.console import describe_skips

    assert describe_skips({"data/image_caption/skipped_corrupt_image": 2.0, "train/loss": 3.0,
                           "data/image_caption/skipped_missing_image_file": 1.0,
                           "data/parallel_text/skipped_empty_text": 0.0, "data/test/de/skipped_missing_image": 4.0}
                          ) == ("data: skipped records (not used): image_caption corrupt_image=2 missing_image_file=1; "
                                "test/de missing_image=4")
    assert describe_skips({"data/parallel_text/skipped_empty_text": 0.0}) == "data: no record skipped"
