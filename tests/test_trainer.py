"""The one trainer's pieces without a full run: state shardings (AdamW moments sharded like their parameters),
checkpoint items (parameters read alone, legacy single-item checkpoints, unreadable checkpoints skipped), the
update's skip rules, run-directory safety and metrics rows after a restart."""
import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from cclm_jax import parallel
from cclm_jax.checkpoint import ITEMS, Checkpointer, LegacyTrainState, abstract_like
from cclm_jax.interop.shapes import abstract_params
from cclm_jax.models import build_model
from cclm_jax.optimizer import make_optimizer
from cclm_jax.train import run_directory, trainer
from cclm_jax.train.metrics import ScalarSink
from cclm_jax.train.steps import make_update_fn
from cclm_jax.train_state import TrainState, create_train_state

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import tiny  # noqa: E402  (configs/tiny.py)
from run_checks import assert_bitwise_equal  # noqa: E402


def _micro():
    config = tiny.get_config("micro")
    config.model.text.update(vocab_size=100, mask_token_id=99)
    return config


def _task(config) -> trainer.Task:
    """The parts of a pre-training task that `trainer.make_state` reads."""
    model = build_model(config.model)
    return trainer.Task(
        name="test", abstract_params=abstract_params(config.model, "pretrain"),
        initial_params=lambda mesh, shardings, rng: parallel.init_sharded_params(model, config.model, mesh, rng)[0],
        make_optimizer=lambda p: make_optimizer(config.optimizer, config.schedule, p),
        losses=dict, total_steps=1, next_batches=None, start_inputs=None, data_state=dict)


@pytest.fixture(scope="module")
def fsdp_state():
    """(task, mesh, state shardings, state) as the trainer builds a fresh run on an (fsdp 4, tensor 2) mesh."""
    config = _micro()
    task = _task(config)
    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    abstract, shardings, optimizer = trainer.make_state(task.abstract_params, task.make_optimizer, mesh,
                                                        jax.random.PRNGKey(1))
    params = task.initial_params(mesh, shardings.params, jax.random.PRNGKey(0))
    state = jax.jit(lambda p, r: create_train_state(p, optimizer, r), out_shardings=shardings)(
        params, jax.random.PRNGKey(1))
    return task, mesh, abstract, state


def _moments(opt_state):
    """The (mu, nu) parameter-shaped trees of the reference AdamW state."""
    found = []

    def visit(node):
        if hasattr(node, "mu") and hasattr(node, "nu"):
            found.append((node.mu, node.nu))
        elif isinstance(node, (tuple, list)):
            for child in node:
                visit(child)

    visit(opt_state)
    assert len(found) == 1, "expected one AdamW state in the optimizer chain"
    return found[0]


def test_adam_moments_are_sharded_like_their_parameters(fsdp_state):
    _, _, _, state = fsdp_state
    mu, nu = _moments(state.opt_state)
    flat_params = jax.tree_util.tree_flatten_with_path(state.params)[0]
    sharded = 0
    for (path, p), m, v in zip(flat_params, jax.tree.leaves(mu), jax.tree.leaves(nu)):
        assert m.sharding.spec == p.sharding.spec == v.sharding.spec, jax.tree_util.keystr(path)
        sharded += p.sharding.spec != P()
    assert sharded > len(flat_params) // 2  # FSDP shards most parameters: the check covers real shardings
    emb = mu["text_encoder"]["embeddings"]["word_embeddings"]
    vocab, width = emb.shape
    assert emb.sharding.spec == P("tensor", "fsdp") and emb.addressable_shards[0].data.shape == (vocab // 2, width // 4)
    assert state.step.sharding.spec == P()


def test_checkpoint_items_and_parameters_read_alone(fsdp_state, tmp_path):
    task, mesh, abstract, state = fsdp_state
    ckpt = Checkpointer(str(tmp_path), every=1, keep=3)
    ckpt.save(2, state, {"image_caption": {"batches@0": 5}}, force=True)
    ckpt.close()
    step_dir = tmp_path / "checkpoints" / "2"
    assert set(ITEMS) <= {p.name for p in step_dir.iterdir()}
    restored, data = Checkpointer(str(tmp_path), every=1, keep=3).restore(abstract)
    assert data == {"image_caption": {"batches@0": 5}}
    assert_bitwise_equal(jax.tree.map(np.asarray, state), jax.tree.map(np.asarray, restored))
    # export / evaluate / init.workdir read the parameters item only: it works without the optimizer state
    shutil.rmtree(step_dir / "opt_state")
    params = Checkpointer(str(tmp_path), every=1, keep=3).restore_params(abstract.params)
    assert_bitwise_equal(jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, params))


def test_legacy_single_item_checkpoints_stay_readable(fsdp_state, tmp_path):
    """A checkpoint as the earlier code wrote it (one `state` item: the TrainState without `skips`)."""
    _, _, abstract, state = fsdp_state
    legacy = LegacyTrainState(state.step, state.params, state.opt_state, state.rng, state.nonfinite)
    manager = ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("state", "data"))
    manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(legacy), data=ocp.args.JsonSave({})))
    manager.wait_until_finished()
    manager.close()
    restored, _ = Checkpointer(str(tmp_path), every=1, keep=3).restore(abstract)
    assert int(restored.skips) == 0
    assert_bitwise_equal(jax.tree.map(np.asarray, state.opt_state), jax.tree.map(np.asarray, restored.opt_state))
    params = Checkpointer(str(tmp_path), every=1, keep=3).restore_params(abstract.params)
    assert_bitwise_equal(jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, params))
    assert params["temp"].sharding == abstract.params["temp"].sharding


def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one(fsdp_state, tmp_path, caplog):
    _, _, abstract, state = fsdp_state
    ckpt = Checkpointer(str(tmp_path), every=1, keep=3)
    ckpt.save(1, state, {}, force=True)
    later = state.replace(step=state.step + 1)
    ckpt.save(2, later, {}, force=True)
    ckpt.close()
    for data_file in (tmp_path / "checkpoints" / "2" / "params" / "ocdbt.process_0" / "d").iterdir():
        data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])  # truncated array files
    restored, _, failed = Checkpointer(str(tmp_path), every=1, keep=3).restore_newest_readable(abstract)
    assert int(restored.step) == 0 and [s for s, _ in failed] == [2]
    assert "checkpoint step 2" in caplog.text and "unreadable" in caplog.text
    assert (tmp_path / "corrupt_checkpoints" / "2").is_dir()
    assert Checkpointer(str(tmp_path), every=1, keep=3).all_steps() == [1]
    shutil.rmtree(tmp_path / "checkpoints" / "1" / "meta")  # a deleted item
    with pytest.raises(RuntimeError, match=r"no readable checkpoint in .*checkpoints: 1 \("):
        Checkpointer(str(tmp_path), every=1, keep=3).restore_newest_readable(abstract)


def _tiny_update(lr):
    """A two-parameter update through `make_update_fn` with plain SGD (loss = sum(w * x))."""
    optimizer = optax.sgd(lr)
    loss_fn = lambda p, batches, rng: (jnp.sum(p["w"] * batches["x"]), {})  # noqa: E731
    update = jax.jit(make_update_fn(loss_fn, optimizer))
    params = {"w": jnp.ones((2,))}
    return update, create_train_state(params, optimizer, jax.random.PRNGKey(0))


def test_updates_that_blow_up_the_weights_are_skipped_and_counted_in_a_row():
    update, state = _tiny_update(1e38)
    state, metrics = update(state, {"x": jnp.array([1.0, 1.0])})  # w -> 1 - 1e38: finite
    assert int(metrics["skipped_nonfinite"]) == 0
    state, metrics = update(state, {"x": jnp.array([10.0, 1.0])})  # w -> -1e39: overflows to -inf
    assert int(metrics["skipped_nonfinite"]) == 1 and int(state.skips) == 1
    assert bool(jnp.all(jnp.isfinite(state.params["w"])))
    state, _ = update(state, {"x": jnp.array([10.0, 1.0])})
    assert int(state.skips) == 2 and int(state.nonfinite) == 2 and int(state.step) == 3
    state, _ = update(state, {"x": jnp.array([0.0, 0.0])})  # a finite update resets the run of skips
    assert int(state.skips) == 0 and int(state.nonfinite) == 2


def _write_run_config(workdir, config):
    run_directory.write_config(config, str(workdir))


def test_a_different_run_in_the_workdir_is_refused_before_anything_is_written(tmp_path):
    config = _micro()
    _write_run_config(tmp_path, config)
    before = (tmp_path / "config.json").read_text()
    other = _micro()
    other.data.seed = 7
    other.optimizer.lr = 3e-4
    with pytest.raises(ValueError, match=r"holds another run: its config.json differs in data.seed \(.*\), "
                                         r"optimizer.lr"):
        run_directory.check_same_run(other, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == before


def test_resumable_changes_are_accepted_with_a_warning(tmp_path, caplog):
    config = _micro()
    _write_run_config(tmp_path, config)
    longer = _micro()
    longer.train.num_steps = config.train.num_steps + 10
    longer.train.log_every = 7
    run_directory.check_same_run(longer, str(tmp_path))
    assert "train.log_every" in caplog.text and "train.num_steps" in caplog.text


def test_metrics_rows_after_the_restored_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (1, 2, 3, 4)))
    ScalarSink(str(tmp_path), resume_step=2).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_abstract_state_matches_the_created_state(fsdp_state):
    """Resume restores into `jax.eval_shape` targets: they must equal what a fresh run creates."""
    _, _, abstract, state = fsdp_state
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)):
        assert (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding)
    assert isinstance(state, TrainState) and not isinstance(nn.meta.unbox(abstract.params), nn.LogicallyPartitioned)
    assert abstract_like(state).params["temp"].sharding == state.params["temp"].sharding


def test_evaluators_come_from_the_config_and_bad_specs_name_the_key():
    made = []
    makers = {"dev_retrieval": lambda name, spec: made.append(name) or (lambda params, step: {"r": 1.0})}
    evals = {"dev": {"kind": "dev_retrieval", "every": 4}, "end": {"kind": "dev_retrieval", "every": 0},
             "off": {"kind": "dev_retrieval", "every": -1}, "per_epoch": {"kind": "dev_retrieval", "every": 2,
                                                                           "unit": "epochs"}}
    evaluators = trainer.evaluators_from_config(evals, makers, steps_per_epoch=3)
    assert [(e.name, e.every, e.at_end) for e in evaluators] == [("dev", 4, True), ("end", 0, True),
                                                                  ("per_epoch", 6, True)]
    assert made == ["dev", "end", "per_epoch"]  # the disabled one is never built
    for spec, message in [({"kind": "bleu", "every": 1}, "config.evals.x.kind must be one of ('dev_retrieval',)"),
                          ({"kind": "dev_retrieval", "every": -2}, "config.evals.x.every must be an integer >= -1"),
                          ({"kind": "dev_retrieval", "every": 1, "unit": "epochs"},
                           "config.evals.x.unit must be one of ('steps',)")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            trainer.evaluators_from_config({"x": spec}, makers)  # pre-training counts steps only


def test_moved_train_keys_point_to_config_evals():
    from cclm_jax.run_config import validate_run_config

    config = tiny.get_config("micro")
    config.train.eval_every = 4
    with pytest.raises(ValueError, match=r"config.train.eval_every: unknown key \(now config.evals.dev.every\)"):
        validate_run_config(config)


def test_a_skipped_update_keeps_adams_state_and_advances_the_schedule():
    """lr(k) = 1e38 at schedule step 1 only: that update overflows the weights and is skipped; the next one runs at
    lr(2) = 0 (the schedule counts iterations), with Adam's count and moments as before the skipped one."""
    from cclm_jax.optimizer import default_optimizer_config

    ocfg = default_optimizer_config()
    ocfg.update(lr=1e38, clip_grad_norm=None)
    scfg = ml_collections.ConfigDict({"kind": "linear", "warmup_steps": 1, "total_steps": 2})
    params = {"w": jnp.ones((2,))}
    optimizer = make_optimizer(ocfg, scfg, params)
    loss_fn = lambda p, batches, rng: (jnp.sum(p["w"] * batches["x"]), {})  # noqa: E731
    update = jax.jit(make_update_fn(loss_fn, optimizer))
    state = create_train_state(params, optimizer, jax.random.PRNGKey(0))
    batch = {"x": jnp.array([1.0, 2.0])}
    state, metrics = update(state, batch)  # schedule step 0: lr 0, Adam's count 1
    adam_before = jax.tree.map(np.asarray, state.opt_state.inner_state[0])
    state, metrics = update(state, batch)  # schedule step 1: lr 1e38 -> weights overflow
    assert int(metrics["skipped_nonfinite"]) == 1 and metrics["lr"] == np.float32(1e38)
    for before, after in zip(jax.tree.leaves(adam_before), jax.tree.leaves(state.opt_state.inner_state[0])):
        np.testing.assert_array_equal(before, np.asarray(after))
    assert int(state.opt_state.count) == 2
    state, metrics = update(state, batch)  # schedule step 2: lr 0, applied
    assert int(metrics["skipped_nonfinite"]) == 0 and float(metrics["lr"]) == 0.0
    assert int(state.opt_state.inner_state[0].count) == 2 and int(state.skips) == 0
