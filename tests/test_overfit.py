"""Training the model on one repeated image–caption batch and one repeated sentence-pair batch drives every
loss down (contrastive losses towards 0) within 100 alternating updates (micro config; an integration test:
CCLM_INTEGRATION=1)."""
import pathlib
import sys

import jax
import numpy as np
import pytest

from cclm_jax import parallel
from cclm_jax.models import build_model
from cclm_jax.optimizer import make_optimizer
from cclm_jax.train.steps import StepConfig, make_train_steps
from cclm_jax.train_state import create_train_state

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
import tiny  # noqa: E402

UPDATES = 100


def _batches(model_config, b=4, length=12, masks=3):
    rng = np.random.default_rng(0)
    vocab, res = model_config.text.vocab_size, model_config.vision.image_res

    def text(suffix=""):
        ids = rng.integers(4, vocab - 1, (b, length)).astype(np.int32)
        ids[:, 0], ids[:, -1] = 0, 2
        pos = np.sort(rng.choice(np.arange(1, length), (b, masks), replace=True), axis=1).astype(np.int32)
        masked = ids.copy()
        np.put_along_axis(masked, pos, vocab - 1, axis=1)
        return {f"text_ids{suffix}": ids, f"text_atts{suffix}": np.ones_like(ids),
                f"text_ids_masked{suffix}": masked, f"masked_pos{suffix}": pos,
                f"masked_ids{suffix}": np.take_along_axis(ids, pos, axis=1)}

    image_batch = {"image": rng.integers(0, 256, (b, res, res, 3)).astype(np.uint8), **text()}
    return {"image_caption": image_batch, "parallel_text": {**text(), **text("_2")}}


@pytest.mark.integration
def test_losses_go_down_on_repeated_batches():
    config = tiny.get_config("micro")
    config.model.text.update(vocab_size=100, mask_token_id=99)
    config.optimizer.update(lr=5e-4, lr_mults=())
    config.schedule.update(warmup_steps=5, total_steps=UPDATES)
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    model = build_model(config.model)
    params, _ = parallel.init_sharded_params(model, config.model, mesh, jax.random.PRNGKey(0))
    optimizer = make_optimizer(config.optimizer, config.schedule, params, updates_per_schedule_step=2)
    state = jax.jit(lambda p: create_train_state(p, optimizer, jax.random.PRNGKey(1)))(params)
    steps = make_train_steps(StepConfig(config.model, config.objectives, mesh, dropout=False), optimizer,
                             "alternate")
    batches = _batches(config.model)
    history = {"image_caption": [], "parallel_text": []}
    for i in range(UPDATES):
        kind = ("parallel_text", "image_caption")[i % 2]
        state, metrics = steps[kind](state, {kind: batches[kind]})
        history[kind].append(metrics)
    first = {k: jax.device_get(v[0]) for k, v in history.items()}
    last = {k: jax.device_get(v[-1]) for k, v in history.items()}
    assert last["image_caption"]["itc"] < 0.05 and last["parallel_text"]["ttc"] < 0.05, last
    for kind, names in [("image_caption", ("itm", "mlm", "loss")), ("parallel_text", ("ttm", "mlm", "loss"))]:
        for name in names:
            assert last[kind][name] < 0.6 * first[kind][name], (kind, name, first[kind][name], last[kind][name])
    assert int(state.nonfinite) == 0

