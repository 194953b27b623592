"""The training program end to end (micro config, CLI subprocesses): exact resume after SIGTERM and after
SIGKILL, checkpoint restore onto another mesh, NaN handling, and config validation messages."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cclm_jax import parallel
from cclm_jax.checkpoint import Checkpointer, abstract_like
from cclm_jax.run_config import load_config_file, validate_run_config

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import tiny  # noqa: E402  (configs/tiny.py)
from run_checks import assert_bitwise_equal, logged_losses, workdir_params  # noqa: E402

STEPS = 6


def _env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                        "--xla_backend_optimization_level=0")
    env["PYTHONUNBUFFERED"] = "1"
    return env


DEMO_DIR = pathlib.Path(os.environ.get("CCLM_TEST_DATA_DIR", "/tmp/cclm_jax_test_data"))


def _train_cmd(workdir, steps=STEPS, *extra):
    return [sys.executable, "-m", "cclm_jax", "train", f"--config={REPO}/configs/tiny.py:micro,{steps}",
            f"--workdir={workdir}", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
            "--config.evals.dev.every=4", f"--config.data.data_dir={DEMO_DIR}", *extra]


def _run(cmd, timeout=600):
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    _run(_train_cmd(workdir))
    return workdir


def _wait_for(predicate, proc, timeout=600):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.2)


def test_dev_retrieval_runs_every_n_steps_and_at_the_end(uninterrupted):
    rows = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in rows if "eval/dev/chance_r1" in r]
    assert [r["step"] for r in evaluated] == [4, STEPS]
    assert all(0.0 <= r["eval/dev/en/i2t_r1"] <= 100.0 for r in evaluated)
    assert len({r["step"] for r in rows if any(k.startswith("train/") for k in r)}) == STEPS  # one row per step


def test_evaluate_reproduces_the_runs_final_dev_retrieval(uninterrupted):
    """`cclm-jax evaluate` on a pre-training run: its config's evaluators on the latest checkpoint give the numbers
    the run logged at its last step (same parameters, same dev set), and a report under eval/."""
    proc = _run([sys.executable, "-m", "cclm_jax", "evaluate", f"--config={REPO}/configs/tiny.py:micro,{STEPS}",
                 f"--workdir={uninterrupted}", "--config.evals.dev.every=4", f"--config.data.data_dir={DEMO_DIR}"])
    printed = json.loads(proc.stdout[proc.stdout.index("{"):])
    rows = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if r["step"] == STEPS and "eval/dev/chance_r1" in r][0]
    assert printed == {k.removeprefix("eval/"): v for k, v in logged.items() if k.startswith("eval/dev/")}
    report = json.loads((uninterrupted / "eval" / "step_latest" / "results.json").read_text())
    assert report["dev"]["en"]["i2t_r1"] == logged["eval/dev/en/i2t_r1"]


@pytest.mark.integration
def test_diverged_weights_stop_the_run_with_a_clear_error(tmp_path):
    proc = subprocess.run(_train_cmd(tmp_path, STEPS, "--config.optimizer.lr=1e30",
                                     "--config.train.max_consecutive_skips=2", "--config.evals.dev.every=-1"),
                          env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode != 0
    assert "updates in a row before step" in proc.stderr and "max_consecutive_skips=2" in proc.stderr
    stopped = Checkpointer(str(tmp_path), every=1, keep=10)
    assert stopped.latest_step() < STEPS  # saved where it stopped (committed: no temporary directory left)
    stopped.close()
    assert not list((tmp_path / "checkpoints").glob("*tmp*"))


def test_resume_after_sigterm_is_exact(uninterrupted, tmp_path):
    proc = subprocess.Popen(_train_cmd(tmp_path), env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted_at" in out, "the run did not stop at SIGTERM"
    stopped = Checkpointer(str(tmp_path), every=1, keep=10)
    assert stopped.latest_step() < STEPS
    stopped.close()
    _run(_train_cmd(tmp_path))
    assert_bitwise_equal(workdir_params(uninterrupted), workdir_params(tmp_path))
    full, resumed = logged_losses(uninterrupted), logged_losses(tmp_path)
    for step in range(1, STEPS + 1):  # every step saw the same batch (same losses), before and after resume
        assert resumed[step] == full[step], step


@pytest.mark.integration
def test_resume_after_sigkill_uses_last_complete_checkpoint(uninterrupted, tmp_path):
    proc = subprocess.Popen(_train_cmd(tmp_path), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (tmp_path / "checkpoints" / "4").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    _run(_train_cmd(tmp_path))
    assert_bitwise_equal(workdir_params(uninterrupted), workdir_params(tmp_path))


def test_export_of_a_run_loads_in_pytorch(uninterrupted, tmp_path):
    """`cclm-jax export` of the trained run -> `.th` -> the pure-PyTorch module gives the JAX features."""
    torch = pytest.importorskip("torch")
    from cclm_jax.interop import official
    from cclm_jax.models import build_model
    from cclm_jax.torch import load as torch_load

    out = tmp_path / "run.th"
    _run([sys.executable, "-m", "cclm_jax", "export", f"--workdir={uninterrupted}", f"--out={out}"])
    config, params = official.load(out, text_num_heads=4)
    assert_bitwise_equal(workdir_params(uninterrupted), jax.tree.map(np.asarray, params))
    model = build_model(config)
    ids = np.array([[0, 5, 9, 2, 1, 1]], np.int32)
    atts = (ids != 1).astype(np.int32)
    jax_feat = model.apply({"params": params}, model.apply({"params": params}, ids, atts, method=model.encode_text),
                           method=model.text_features)
    torch_model = torch_load(str(out), text_num_heads=4)
    with torch.no_grad():
        t_feat = torch_model.text_features(torch_model.encode_text(torch.from_numpy(ids).long(),
                                                                   torch.from_numpy(atts).long()))
    np.testing.assert_allclose(t_feat.numpy(), np.asarray(jax_feat), atol=1e-5)


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    """A state saved from an (8,) data mesh restores onto (data 4, fsdp 2) with the new shardings."""
    from cclm_jax.models import build_model
    from cclm_jax.optimizer import make_optimizer
    from cclm_jax.train_state import create_train_state

    config = tiny.get_config("micro")
    config.model.text.update(vocab_size=100, mask_token_id=99)
    model = build_model(config.model)

    def state_on(mesh):
        params, _ = parallel.init_sharded_params(model, config.model, mesh, jax.random.PRNGKey(0))
        optimizer = make_optimizer(config.optimizer, config.schedule, params, updates_per_schedule_step=2)
        return jax.jit(lambda p: create_train_state(p, optimizer, jax.random.PRNGKey(1)))(params)

    data_mesh = parallel.make_mesh({"data": 8})
    saved = state_on(data_mesh)
    ckpt = Checkpointer(str(tmp_path), every=1, keep=2)
    ckpt.save(3, saved, {"image_caption": {"batches": 2}}, force=True)
    ckpt.close()

    fsdp_mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
    target = state_on(fsdp_mesh)
    shardings = jax.tree.map(lambda x: x.sharding, target)
    restored, data = Checkpointer(str(tmp_path), every=1, keep=2).restore(abstract_like(target, shardings))
    assert data == {"image_caption": {"batches": 2}}
    assert_bitwise_equal(jax.tree.map(np.asarray, saved), jax.tree.map(np.asarray, restored))
    emb = restored.params["text_encoder"]["embeddings"]["word_embeddings"]
    assert emb.sharding.mesh.shape == fsdp_mesh.shape and emb.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.train.update(mode="both"), "config.train.mode"),
    (lambda c: c.model.vision.update(embed_dim=16), "must equal model.text.hidden_size"),
    (lambda c: c.data.image_caption.update(batch_size=12), "not divisible by the 8 batch shards"),
    (lambda c: c.data.image_caption.update(kind="jsonl", paths=["/nonexistent/cc3m.jsonl"]), "does not exist"),
    (lambda c: c.data.update(tokenizer="/nonexistent/spm.model"), "config.data.tokenizer"),
    (lambda c: c.init.update(xlmr_dir="/tmp"), "must be given together"),
    (lambda c: c.optimizer.update(lr=-1.0), "lr"),
    (lambda c: c.data.image_caption.update(max_tokens=65, max_words=65),
     r"config.data.image_caption.max_tokens 65 exceeds config.model.text.max_position_embeddings 64"),
    (lambda c: c.data.eval.update(max_tokens=100),
     r"config.data.eval.max_tokens 100 exceeds config.model.text.max_position_embeddings 64"),
    (lambda c: c.init.update(text_num_heads=-1), "config.init.text_num_heads must be an integer >= 0"),
])
def test_invalid_configs_fail_with_one_clear_message(edit, message):
    config = tiny.get_config("micro")
    config.data.image_caption.batch_size = 16
    config.data.parallel_text.batch_size = 16
    edit(config)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        validate_run_config(config, num_devices=8)


def test_unknown_config_key_is_rejected():
    config = tiny.get_config("micro")
    with config.unlocked():
        config.train.num_stepz = 3
    with pytest.raises(ValueError, match="config.train.num_stepz: unknown key"):
        validate_run_config(config, num_devices=1)


def test_config_files_load_as_on_the_command_line(tmp_path):
    assert load_config_file(REPO / "configs" / "tiny.py", "micro") == tiny.get_config("micro")
    with pytest.raises(FileNotFoundError, match="nope.py' does not exist"):
        load_config_file(tmp_path / "nope.py")
    (tmp_path / "empty.py").write_text("CONFIG = {}\n")
    with pytest.raises(ValueError, match="empty.py' defines no get_config"):
        load_config_file(tmp_path / "empty.py")


def test_nan_batch_skips_the_update_and_is_counted():
    from cclm_jax.models import build_model
    from cclm_jax.optimizer import make_optimizer
    from cclm_jax.train.steps import StepConfig, make_train_steps
    from cclm_jax.train_state import create_train_state

    config = tiny.get_config("micro")
    config.model.text.update(vocab_size=100, mask_token_id=99)
    model = build_model(config.model)
    mesh = parallel.make_mesh({"data": 2, "tensor": 4})
    params, _ = parallel.init_sharded_params(model, config.model, mesh, jax.random.PRNGKey(0))
    optimizer = make_optimizer(config.optimizer, config.schedule, params, updates_per_schedule_step=2)
    state = jax.jit(lambda p: create_train_state(p, optimizer, jax.random.PRNGKey(1)))(params)
    before = jax.tree.map(np.asarray, state.params)
    step = make_train_steps(StepConfig(config.model, config.objectives, mesh),
                            optimizer, "alternate")["image_caption"]
    rng = np.random.default_rng(0)
    b, length = 4, 16
    ids = rng.integers(4, 99, (b, length)).astype(np.int32)
    batch = {"image": np.full((b, 64, 64, 3), np.nan, np.float32), "text_ids": ids,
             "text_atts": np.ones((b, length), np.int32), "text_ids_masked": ids,
             "masked_pos": np.tile(np.arange(1, 5, dtype=np.int32), (b, 1)), "masked_ids": ids[:, 1:5]}
    state, metrics = step(state, {"image_caption": batch})
    assert int(metrics["skipped_nonfinite"]) == 1 and int(state.nonfinite) == 1 and int(state.step) == 1
    assert_bitwise_equal(before, jax.tree.map(np.asarray, state.params))
