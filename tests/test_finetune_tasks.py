"""Fine-tuning task models: initialisation checked parameter by parameter against the spec, one training step and
evaluation of XVNLI / MaRVL / xGQA on generated IGLUE-format fixtures, retrieval losses, config and batch helpers."""
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import task_batches  # tests/task_batches.py
import tensorflow as tf

from cclm_jax import objectives
from cclm_jax import optimizer as optimizer_lib
from cclm_jax.data.finetune_input import answer_candidates
from cclm_jax.data.iglue import VQAExample, read_answer_list, read_gqa_json, read_iglue
from cclm_jax.data.image import prepare_batch
from cclm_jax.data.text import pre_question
from cclm_jax.data.tokenizer import Tokenizer
from cclm_jax.evaluation import metrics
from cclm_jax.models import build_model, tasks
from cclm_jax.run_config import load_config_file
from cclm_jax.tasks import definitions
from cclm_jax.train import finetuning
from cclm_jax.train_state import create_train_state

LR = 1e-3
MAX_TOKENS = 16
ANSWER_TOKENS = 6
ANSWERS = ["yes", "no", "red", "two dogs", "left", "the table"]
SENTENCES = [
    "a dog runs on the grass", "two dogs play with a red ball", "the man sits at the table",
    "ein hund läuft über das gras", "zwei hunde spielen", "un chien court dans l'herbe",
    "is the ball red?", "how many dogs are there?", "what is on the left?", "is there a table?",
    "the picture shows two dogs", "there is no cat", "the left image has a red car",
] + ANSWERS


def _leaves(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, prefix + (k,))
    else:
        yield prefix, tree


def _get(tree, path):
    for part in path:
        tree = tree[part]
    return tree


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def deep_pretrained(micro_params):
    """(config, params) with 2 text + 2 fusion layers (numpy, nothing compiled): two fusion layers make the
    NLVR copy positions and the decoder layer mapping non-trivial."""
    from cclm_jax.interop.shapes import param_shapes

    cfg = micro_params[0].copy_and_resolve_references()
    cfg.text.update(num_layers=4, fusion_layer=2)
    rng = np.random.default_rng(5)
    params = jax.tree.map(lambda shape: rng.normal(size=shape).astype(np.float32), param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    return cfg, params


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.train(SENTENCES * 4, tmp_path_factory.mktemp("spm") / "spm", vocab_size=300)


def _write_jpeg(path, rng, size=(48, 80)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size + (3,), dtype=np.uint8)
    path.write_bytes(tf.io.encode_jpeg(tf.constant(pixels)).numpy())


@pytest.fixture(scope="module")
def iglue(tmp_path_factory):
    """An IGLUE `datasets` folder with XVNLI, MaRVL, GQA/xGQA annotations and generated images."""
    root = tmp_path_factory.mktemp("iglue")
    images = root / "images"
    rng = np.random.default_rng(0)
    for i in range(4):
        _write_jpeg(images / f"{100 + i}.jpg", rng)
    xvnli = [("100", "a dog runs on the grass", "entailment"), ("101", "there is no cat", "contradiction"),
             ("102", "the man sits at the table", "neutral"), ("103", "two dogs play", "-"),
             ("103", "two dogs play with a red ball", "entailment")]
    path = root / "XVNLI" / "annotations" / "en" / "train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({"Flikr30kID": i, "sentence1": "premise", "sentence2": h, "gold_label": g,
                                        "pairID": str(n)}) + "\n" for n, (i, h, g) in enumerate(xvnli)))
    marvl = []
    for n, (caption, label) in enumerate([("the left image has a red car", True), ("there are two dogs", False),
                                          ("the picture shows two dogs", True), ("there is no cat", False)]):
        left, right = f"{n}-a.jpg", f"{n}-b.jpg"
        for name in (left, right):
            _write_jpeg(images / "id" / "images" / "anjing" / name, rng)
        marvl.append({"id": f"id-{n}", "left_img": left, "right_img": right, "caption": caption, "label": label,
                      "concept": "anjing", "language": "id"})
    path = root / "marvl" / "zero_shot" / "annotations" / "marvl-id.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in marvl))
    gqa_train = [{"question_id": f"q{n}", "img_id": str(100 + n), "sent": q, "label": label}
                 for n, (q, label) in enumerate([("Is the ball red?", {"yes": 1.0}),
                                                 ("How many dogs are there?", {"two dogs": 1.0, "no": 0.5}),
                                                 ("What is on the left?", {"the table": 1.0}),
                                                 ("Is there a table?", {"no": 1.0})])]
    path = root / "gqa" / "annotations" / "train.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(gqa_train))
    (root / "gqa" / "annotations" / "trainval_ans2label.json").write_text(
        json.dumps({a: i for i, a in enumerate(ANSWERS)}))
    xgqa = {f"x{n}": {"imageId": str(100 + n), "question": q, "answer": a}
            for n, (q, a) in enumerate([("Ist der Ball rot?", "yes"), ("Wie viele Hunde?", "two dogs"),
                                        ("Was ist links?", "the table"), ("Gibt es einen Tisch?", "no")])}
    path = root / "xGQA" / "annotations" / "few_shot" / "de" / "test.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(xgqa))
    return types.SimpleNamespace(root=root, images=images)


def _config(task, model_config):
    config = definitions.default_finetune_config(task)
    config.model = model_config
    config.optimizer.lr = LR
    config.train.update(epochs=1, batch_size=4, warmup_fraction=0.0)
    definitions.validate_finetune_config(config)
    return config


def _train(config, params, batch, steps):
    schedule = finetuning.finetune_schedule(config.train, 4 * steps)
    optimizer = finetuning.make_task_optimizer(config, schedule, params)
    state = jax.jit(lambda p, key: create_train_state(p, optimizer, key))(params, jax.random.PRNGKey(1))
    step = finetuning.make_train_step(config, optimizer)
    history = []
    for _ in range(steps):
        state, out = step(state, batch)
        history.append(jax.tree.map(float, out))
    return state, history


def _assert_head_lr_doubled(before, after, head_path, body_path):
    """The first reference-AdamW step moves each weight by lr x lr_mult (|g| >> eps): 2x for the task head."""
    head = np.abs(np.asarray(_get(after, head_path)) - _get(before, head_path)).max()
    body = np.abs(np.asarray(_get(after, body_path)) - _get(before, body_path)).max()
    assert head == pytest.approx(2 * LR, rel=0.02) and body == pytest.approx(LR, rel=0.02)


# ------------------------------------------------------------------------------------------------ parameters

def test_retrieval_and_xvnli_params_reuse_the_pretrained_tree(micro_params):
    _, pretrained = micro_params
    retrieval = tasks.init_retrieval_params(pretrained)
    assert sorted(retrieval) == ["itm_head", "temp", "text_encoder", "text_proj", "vision_encoder", "vision_proj"]
    xvnli = tasks.init_xvnli_params(pretrained, jax.random.PRNGKey(0))
    for path, value in _leaves(xvnli):
        if path[0] == "cls_head":
            continue
        source = _get(pretrained, path)
        np.testing.assert_array_equal(value, source, err_msg="/".join(path))
        assert not np.shares_memory(value, source), "/".join(path)
    head = {"/".join(p): np.shape(v) for p, v in _leaves(xvnli["cls_head"])}
    assert head == {"fc1/kernel": (128, 256), "fc1/bias": (256,), "norm/scale": (256,), "norm/bias": (256,),
                    "fc2/kernel": (256, 3), "fc2/bias": (3,)}
    with pytest.raises(ValueError, match="lack \\['mlm_head'\\]"):
        tasks.init_vqa_params({k: v for k, v in pretrained.items() if k != "mlm_head"})


def test_nlvr_params_duplicate_fusion_layers_with_shared_key_value(deep_pretrained):
    cfg, pretrained = deep_pretrained
    f, n = cfg.text.fusion_layer, cfg.text.num_layers  # 2, 4 -> NLVR layers 0, 1 + copies 2..5
    params = tasks.init_nlvr_params(pretrained, jax.random.PRNGKey(0))
    text = params["text_encoder"]
    assert sorted(k for k in text if k.startswith("layer_")) == [f"layer_{i}" for i in range(f + 2 * (n - f))]
    expected = {}  # NLVR path -> pre-trained path, by the spec rule
    for path, _ in _leaves(pretrained["text_encoder"]):
        if not path[0].startswith("layer_") or int(path[0][6:]) < f:
            expected[("text_encoder",) + path] = ("text_encoder",) + path
            continue
        layer = int(path[0][6:])
        for copy in (0, 1):
            shared = path[1] == "crossattention" and path[2] == "self" and path[3] in ("key", "value")
            if copy == 1 and shared:
                continue  # the odd copy holds no key/value of its own
            expected[("text_encoder", f"layer_{f + 2 * (layer - f) + copy}") + path[1:]] = ("text_encoder",) + path
    for path, _ in _leaves(pretrained["vision_encoder"]):
        expected[("vision_encoder",) + path] = ("vision_encoder",) + path
    got = {path: value for path, value in _leaves(params) if path[0] != "cls_head"}
    assert set(got) == set(expected)
    for path, value in got.items():
        np.testing.assert_array_equal(value, _get(pretrained, expected[path]), err_msg="/".join(path))
    assert _get(params, ("cls_head", "fc2", "kernel")).shape == (256, 2)
    full = tasks.lend_shared_cross_kv(params, f)
    for even in (f, f + 2):
        for name in ("key", "value"):
            assert full["text_encoder"][f"layer_{even + 1}"]["crossattention"]["self"][name] is \
                params["text_encoder"][f"layer_{even}"]["crossattention"]["self"][name]
    with pytest.raises(ValueError, match="layer_3/crossattention/self holds its own \\['key', 'value'\\]"):
        tasks.lend_shared_cross_kv(full, f)


def test_shared_key_value_gradient_is_the_sum_over_both_copies(deep_pretrained):
    cfg, pretrained = deep_pretrained
    f = cfg.text.fusion_layer
    params = tasks.init_nlvr_params(pretrained, jax.random.PRNGKey(0))
    weights = {i: float(i + 1) for i in range(f, f + 4)}

    def use_every_copy(p):
        full = tasks.lend_shared_cross_kv(p, f)
        return sum(w * jnp.sum(full["text_encoder"][f"layer_{i}"]["crossattention"]["self"]["key"]["kernel"])
                   for i, w in weights.items())

    grads = jax.jit(jax.grad(use_every_copy))(params)
    for even in (f, f + 2):
        g = np.asarray(grads["text_encoder"][f"layer_{even}"]["crossattention"]["self"]["key"]["kernel"])
        np.testing.assert_allclose(g, weights[even] + weights[even + 1])


def test_vqa_decoder_is_initialised_from_the_fusion_layers(deep_pretrained):
    cfg, pretrained = deep_pretrained
    f, n = cfg.text.fusion_layer, cfg.text.num_layers
    params = tasks.init_vqa_params(pretrained)
    assert sorted(params) == ["lm_head", "text_decoder", "text_encoder", "vision_encoder"]
    expected = {("text_decoder", "embeddings") + p: ("text_encoder", "embeddings") + p
                for p, _ in _leaves(pretrained["text_encoder"]["embeddings"])}
    for i in range(n - f):
        expected.update({("text_decoder", f"layer_{i}") + p: ("text_encoder", f"layer_{f + i}") + p
                         for p, _ in _leaves(pretrained["text_encoder"][f"layer_{f + i}"])})
    expected.update({("lm_head",) + p: ("mlm_head",) + p for p, _ in _leaves(pretrained["mlm_head"])})
    for tower in ("vision_encoder", "text_encoder"):
        expected.update({(tower,) + p: (tower,) + p for p, _ in _leaves(pretrained[tower])})
    got = dict(_leaves(params))
    assert set(got) == set(expected)
    assert any("crossattention" in p for p in got if p[0] == "text_decoder")
    for path, value in got.items():
        source = _get(pretrained, expected[path])
        np.testing.assert_array_equal(value, source, err_msg="/".join(path))
        assert not np.shares_memory(value, source)


def test_task_optimizer_groups(deep_pretrained):
    cfg, pretrained = deep_pretrained
    config = _config("marvl", cfg)
    params = tasks.init_nlvr_params(pretrained, jax.random.PRNGKey(0))
    decay = optimizer_lib.param_multipliers(params, config.optimizer.wd_mults, "wd_mults")
    mult = optimizer_lib.param_multipliers(params, config.optimizer.lr_mults, "lr_mults")
    copy = ("text_encoder", "layer_5", "output", "LayerNorm")  # outside the pre-training layout
    assert _get(decay, copy + ("scale",)) == 0.0 and _get(decay, copy + ("bias",)) == 0.0
    assert _get(decay, ("text_encoder", "layer_5", "output", "dense", "kernel")) == 1.0
    assert _get(decay, ("cls_head", "norm", "scale")) == 1.0  # the reference decays cls_head.1.weight
    assert _get(mult, ("cls_head", "fc1", "kernel")) == 2.0
    assert _get(mult, ("text_encoder", "layer_3", "crossattention", "self", "query", "kernel")) == 1.0


# ------------------------------------------------------------------------------------------------ end to end

def test_xvnli_step_and_evaluation(micro_params, tokenizer, iglue):
    cfg, pretrained = micro_params
    examples = read_iglue(iglue.root, "xvnli", "en", iglue.images, split="train", check_images=True)
    assert [e.label for e in examples] == [1, 0, 2, 1]  # the '-' pair is skipped
    batch = task_batches.nli_batch(examples, tokenizer, image_res=cfg.vision.image_res, max_tokens=MAX_TOKENS,
                                   max_words=MAX_TOKENS)
    params = definitions.init_task_params("xvnli", pretrained, jax.random.PRNGKey(0))
    state, history = _train(_config("xvnli", cfg), params, batch, steps=10)
    assert history[0]["ce"] == pytest.approx(np.log(3), abs=0.3) and history[0]["lr"] == pytest.approx(LR)
    assert history[-1]["ce"] < 0.5 * history[0]["ce"]
    logits = np.asarray(definitions.make_predict_fn("xvnli", cfg)(state.params, batch))
    assert logits.shape == (4, 3) and metrics.accuracy(logits.argmax(axis=1), batch["label"]) == 100.0


def test_marvl_step_evaluation_and_image_routing(micro_params, tokenizer, iglue):
    cfg, pretrained = micro_params
    examples = read_iglue(iglue.root, "marvl", "id", iglue.images, check_images=True)
    batch = task_batches.image_pair_batch(examples, tokenizer, image_res=cfg.vision.image_res,
                                          max_tokens=MAX_TOKENS, max_words=MAX_TOKENS)
    params = definitions.init_task_params("marvl", pretrained, jax.random.PRNGKey(0))
    state, history = _train(_config("marvl", cfg), params, batch, steps=1)
    assert np.isfinite(history[0]["ce"]) and history[0]["skipped_nonfinite"] == 0
    _assert_head_lr_doubled(params, state.params, ("cls_head", "fc1", "kernel"),
                            ("text_encoder", "layer_0", "attention", "self", "query", "kernel"))
    assert "key" not in state.params["text_encoder"]["layer_2"]["crossattention"]["self"]
    logits = definitions.make_predict_fn("marvl", cfg)
    predictions = np.asarray(logits(state.params, batch)).argmax(axis=1)
    assert metrics.accuracy(predictions, batch["label"]) == 100.0 * np.mean(predictions == batch["label"])

    # The even copy (layer 1) attends image 0, the odd copy (layer 2) image 1: silencing one parity's
    # cross-attention output makes the logits blind to that image only.
    other = dict(batch, image=batch["image"][::-1], image_2=batch["image_2"][::-1])
    for parity, blind, seen in ((0, "image", "image_2"), (1, "image_2", "image")):
        silenced = jax.tree.map(lambda x: x, state.params)
        layers = tasks.nlvr_num_layers(cfg.text.num_layers, cfg.text.fusion_layer)
        for i in range(cfg.text.fusion_layer + parity, layers, 2):
            dense = silenced["text_encoder"][f"layer_{i}"]["crossattention"]["output"]["dense"]
            dense["kernel"], dense["bias"] = jnp.zeros_like(dense["kernel"]), jnp.zeros_like(dense["bias"])
        base = np.asarray(logits(silenced, batch))
        np.testing.assert_allclose(np.asarray(logits(silenced, dict(batch, **{blind: other[blind]}))), base,
                                   atol=1e-5)
        assert np.abs(np.asarray(logits(silenced, dict(batch, **{seen: other[seen]}))) - base).max() > 1e-4


def test_xgqa_step_and_ranked_evaluation(micro_params, tokenizer, iglue):
    cfg, pretrained = micro_params
    train = read_gqa_json(iglue.root / "gqa" / "annotations" / "train.json", iglue.images)
    answers = read_answer_list(iglue.root / "gqa" / "annotations" / "trainval_ans2label.json")
    batch = task_batches.vqa_batch(train, tokenizer, image_res=cfg.vision.image_res, max_tokens=MAX_TOKENS,
                                   max_words=30, max_answers=2, answer_tokens=ANSWER_TOKENS)
    np.testing.assert_allclose(batch["answer_weights"], [[1, 0], [0.5, 0.5], [1, 0], [1, 0]])
    params = definitions.init_task_params("xgqa", pretrained, jax.random.PRNGKey(0))
    state, history = _train(_config("xgqa", cfg), params, batch, steps=1)
    assert np.isfinite(history[0]["answer"]) and history[0]["answer"] > 0
    _assert_head_lr_doubled(params, state.params, ("text_decoder", "layer_0", "attention", "self", "query", "kernel"),
                            ("text_encoder", "layer_0", "attention", "self", "query", "kernel"))

    test = read_iglue(iglue.root, "xgqa", "de", iglue.images, check_images=True)
    test_batch = task_batches.vqa_batch(test, tokenizer, image_res=cfg.vision.image_res, max_tokens=MAX_TOKENS,
                                        max_words=50, max_answers=1, answer_tokens=ANSWER_TOKENS)
    answer_ids, answer_atts = answer_candidates(answers, tokenizer, ANSWER_TOKENS)
    k = 3
    best = np.asarray(definitions.make_predict_fn("xgqa", cfg, k_test=k)(state.params, test_batch, answer_ids,
                                                                         answer_atts))
    predictions = {e.question_id: answers[i] for e, i in zip(test, best)}
    accuracy = metrics.vqa_accuracy(predictions, {e.question_id: e.answer for e in test})
    assert accuracy == 100.0 * np.mean([predictions[e.question_id] == e.answer for e in test])

    # Independent ranking: every answer scored, numpy top-k by first-token probability, re-ranked.
    model = definitions.build_task_model("xgqa", cfg)

    @jax.jit
    def all_scores(p, b):
        b = prepare_batch(b)
        apply = lambda m, *a: model.apply({"params": p}, *a, method=getattr(model, m))  # noqa: E731
        states = apply("question_states", b["image"], b["text_ids"], b["text_atts"])
        nq, na = states.shape[0], answer_ids.shape[0]
        start = jnp.zeros((nq, 1), jnp.int32)
        first = jax.nn.log_softmax(apply("answer_logits", start, jnp.ones_like(start), states, b["text_atts"])[:, 0])
        nll = apply("answer_nll", jnp.tile(answer_ids, (nq, 1)), jnp.tile(answer_atts, (nq, 1)),
                    jnp.repeat(states, na, 0), jnp.repeat(b["text_atts"], na, 0))
        return first[:, answer_ids[:, 1]], nll.reshape(nq, na)

    first, nll = (np.asarray(x) for x in all_scores(state.params, test_batch))
    for q in range(len(test)):
        top = np.argsort(-first[q], kind="stable")[:k]
        assert top[np.argmax(first[q, top] - nll[q, top])] == best[q]


def test_retrieval_losses_are_image_text_itc_and_itm_with_ids(micro_params):
    cfg, pretrained = micro_params
    model = build_model(cfg)
    rng = np.random.default_rng(3)
    b, res = 4, cfg.vision.image_res
    ids = rng.integers(4, 999, (b, 8)).astype(np.int32)
    images = rng.integers(0, 256, (b, res, res, 3), np.uint8)
    batch = {"image": prepare_batch({"image": jnp.asarray(images)})["image"],
             "text_ids": ids, "text_atts": np.ones_like(ids), "idx": np.array([7, 7, 3, 5]),
             "text_ids_masked": ids, "masked_pos": np.ones((b, 2), np.int32), "masked_ids": ids[:, 1:3]}
    negatives = np.array([2, 3, 0, 1, 3, 2, 1, 0])  # never a same-id example
    params = tasks.init_retrieval_params(pretrained)

    @jax.jit
    def both(p, full):  # one compilation for both (the shared encoders are computed once)
        key = jax.random.PRNGKey(0)
        return (definitions.retrieval_losses(model, p, batch, key, negatives=negatives),
                objectives.image_text_losses(model, full, batch, key, negatives))

    (total, losses), reference = both(params, pretrained)
    for name in ("itc", "itm"):  # measured 0 (the same ops); 2e-7: one or two float32 roundings
        assert float(losses[name]) == pytest.approx(float(reference[name]), rel=2e-7)
    assert float(total) == pytest.approx(float(reference["itc"] + reference["itm"]), rel=2e-7)


# ------------------------------------------------------------------------------------------------ helpers

def test_schedule_protocols_and_config_errors(micro_params):
    train = definitions.default_finetune_config("xvnli").train
    assert finetuning.finetune_schedule(train, 1000).to_dict() == {"kind": "linear", "warmup_steps": 8,
                                                                   "total_steps": 80}  # 10 x ceil(1000/128)
    config = definitions.apply_protocol(definitions.default_finetune_config("xgqa"), "few_shot")
    assert (config.optimizer.lr, config.train.epochs, config.protocol) == (1e-5, 60, "few_shot")
    with pytest.raises(ValueError, match="protocol must be one of"):
        definitions.apply_protocol(config, "zero-shot")
    with pytest.raises(ValueError, match="config.task must be one of"):
        definitions.default_finetune_config("nlvr")
    config.eval.k_test = 0
    with pytest.raises(ValueError, match="config.eval.k_test must be a positive integer, got 0"):
        definitions.validate_finetune_config(config)
    config = definitions.default_finetune_config("xvnli")
    config.data.max_tokens = 600
    with pytest.raises(ValueError, match="config.data.max_tokens 600 exceeds config.model.text.max_position_embeddings"
                                         " 514"):
        definitions.validate_finetune_config(config)


def test_question_cleaning_and_answer_errors(tokenizer):
    assert pre_question("Is the ball red? (left-side)", 30) == "is the ball red left side"
    assert pre_question("one two three four", 2) == "one two"
    with pytest.raises(ValueError, match="answer 'two dogs play with a red ball' needs .* answer_tokens is 4"):
        answer_candidates(["yes", "two dogs play with a red ball"], tokenizer, 4)
    example = VQAExample("q9", "1", "/nonexistent.jpg", "q", None, (), None)
    with pytest.raises(ValueError, match="question 'q9' has no answer to train on"):
        task_batches.vqa_batch([example], tokenizer, image_res=64, max_tokens=8, max_words=8, max_answers=1,
                               answer_tokens=4)


REFERENCE_SETTINGS = {  # config file: (task, epochs, k_test, max_tokens), spec §4.2
    "xflickrco": ("retrieval", 10, 128, 80), "wit": ("retrieval", 5, 128, 80),
    "multi30k": ("retrieval", 10, 128, 40), "mscoco": ("retrieval", 10, 256, 40),
    "xvnli": ("xvnli", 10, None, 80), "marvl": ("marvl", 10, None, 40), "xgqa": ("xgqa", 5, 128, 40),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_SETTINGS))
def test_finetune_configs_carry_the_reference_hyper_parameters(name):
    import pathlib

    config = load_config_file(pathlib.Path(__file__).resolve().parents[1] / "configs" / "finetune" / f"{name}.py")
    definitions.validate_finetune_config(config)
    task, epochs, k_test, max_tokens = REFERENCE_SETTINGS[name]
    assert (config.task, config.train.epochs, config.data.max_tokens) == (task, epochs, max_tokens)
    assert config.optimizer.lr == 3e-5 and config.optimizer.weight_decay == 0.01
    assert (config.model.vision.image_res, config.model.vision.window_size) == (384, 12)
    assert tuple(config.optimizer.lr_mults) == tuple((f"{head}/.*", 2.0) for head in definitions.TASK_HEADS[task])
    if k_test is not None:
        assert config.eval.k_test == k_test


def test_head_count_recorded_in_an_export_wins_and_a_conflicting_flag_is_an_error(micro_params, tmp_path):
    from cclm_jax.interop import official
    from cclm_jax.tasks import start as task_start

    cfg, params = micro_params
    assert cfg.text.num_heads == 4
    path = tmp_path / "four_heads.th"
    official.save(path, cfg, params)  # records num_heads=4
    config = definitions.default_finetune_config("retrieval")
    config.model.vision.update(image_res=cfg.vision.image_res, window_size=cfg.vision.window_size)
    config.init.checkpoint = str(path)
    model_config, _ = task_start.initial_task_params(config, jax.random.PRNGKey(0))
    assert model_config.text.num_heads == 4
    config.init.text_num_heads = 8
    with pytest.raises(ValueError, match=r"four_heads\.th records 4 text attention heads.*text_num_heads=8"):
        task_start.initial_task_params(config, jax.random.PRNGKey(0))
