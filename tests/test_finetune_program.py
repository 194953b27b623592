"""`cclm-jax finetune` / `cclm-jax evaluate` end to end on generated IGLUE-format fixtures (micro model, CPU):
XVNLI from a pre-training run directory (`cclm-jax import` of an official file) and xFlickr&CO-style retrieval
from an official checkpoint, the reports, exact resume, evaluation of a fine-tuned run, and the errors a bad
config, a missing annotation file or a missing image give before anything compiles."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import task_batches  # tests/task_batches.py
import tensorflow as tf
from flax import linen as nn

from cclm_jax.checkpoint import Checkpointer
from cclm_jax.data import finetune_input
from cclm_jax.data.finetune_data import load_task_data
from cclm_jax.data.finetune_input import TrainBatches
from cclm_jax.data.tokenizer import Tokenizer
from cclm_jax.evaluation import metrics, report
from cclm_jax.interop import official
from cclm_jax.interop.shapes import param_shapes
from cclm_jax.interop.workdir import read_run_config, restore_params
from cclm_jax.run_config import load_config_file
from cclm_jax.tasks import definitions, locked_tower
from cclm_jax.tasks import start as task_start
from cclm_jax.train import finetuning
from cclm_jax.train.import_run import import_to_workdir

REPO = pathlib.Path(__file__).resolve().parents[1]
SENTENCES = ["a dog runs on the grass", "two dogs play with a red ball", "the man sits at the table",
             "a woman rides a bike", "children play in the park", "a cat sleeps on the sofa",
             "ein hund läuft über das gras", "un chien court dans l'herbe", "there is no cat",
             "the picture shows two dogs", "a red car on the street", "people walk on the beach"]
LABELS = ["entailment", "contradiction", "neutral"]


def _write_jpeg(path, rng, size=(40, 56)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_jpeg(tf.constant(rng.integers(0, 256, size + (3,), dtype=np.uint8))).numpy())


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@pytest.fixture(scope="module")
def fixture(tmp_path_factory, micro_params):
    """An IGLUE `datasets` folder (XVNLI train/test/translate-test/few-shot, Flickr30K train + xFlickr&CO test,
    MaRVL test + an NLVR2 training list, GQA train + answers + xGQA test), generated images, a tokenizer, and a
    micro CCLM as an official `.th` file and as an imported pre-training run directory."""
    root = tmp_path_factory.mktemp("finetune")
    iglue, images = root / "iglue", root / "images"
    rng = np.random.default_rng(0)
    ids = [str(1000 + i) for i in range(8)]
    for i in ids:
        _write_jpeg(images / f"{i}.jpg", rng)
    xvnli = lambda n, offset: [{"Flikr30kID": ids[(k + offset) % 8], "sentence1": "premise",  # noqa: E731
                                "sentence2": SENTENCES[(k + offset) % len(SENTENCES)],
                                "gold_label": LABELS[k % 3], "pairID": f"p{offset}-{k}"} for k in range(n)]
    _jsonl(iglue / "XVNLI" / "annotations" / "en" / "train.jsonl", xvnli(20, 0))
    for lang, offset in (("en", 1), ("fr", 2)):
        _jsonl(iglue / "XVNLI" / "annotations" / lang / "test.jsonl", xvnli(5, offset))
    flickr = lambda offset: [{"sentences": [SENTENCES[(k + offset) % 12], SENTENCES[(k + offset + 5) % 12]],  # noqa: E731
                              "id": i, "img_path": f"{i}.jpg"} for k, i in enumerate(ids)]
    _jsonl(iglue / "flickr30k" / "annotations" / "train_ann.jsonl", flickr(0))
    for lang, offset in (("en", 0), ("de", 3)):
        _jsonl(iglue / "xFlickrCO" / "annotations" / lang / "test.jsonl", flickr(offset)[:6])
    _jsonl(iglue / "XVNLI" / "annotations_machine-translate" / "fr" / "test.jsonl", xvnli(3, 4))
    _jsonl(iglue / "XVNLI" / "annotations" / "fr" / "train_5.jsonl", xvnli(5, 5))
    # MaRVL: NLVR2 json training list (images under nlvr/), zero-shot test in the IGLUE image layout.
    for side in ("a", "b"):
        for k in range(3):
            _write_jpeg(root / "nlvr" / f"dev-{k}-{side}.png", rng)
            _write_jpeg(images / "id" / "images" / "anjing" / f"{k}-{side}.jpg", rng)
    (root / "nlvr.json").write_text(json.dumps([{"images": [f"dev-{k}-a.png", f"dev-{k}-b.png"],
                                                 "sentence": SENTENCES[k], "label": ["True", "False"][k % 2]}
                                                for k in range(3)]))
    _jsonl(iglue / "marvl" / "zero_shot" / "annotations" / "marvl-id.jsonl",
           [{"id": f"id-{k}", "left_img": f"{k}-a.jpg", "right_img": f"{k}-b.jpg", "caption": SENTENCES[k + 3],
             "label": bool(k % 2), "concept": "anjing", "language": "id"} for k in range(3)])
    # GQA training list, the answer list, an xGQA test file.
    answers = ["yes", "no", "left", "two"]
    (iglue / "gqa" / "annotations").mkdir(parents=True)
    (iglue / "gqa" / "annotations" / "train.json").write_text(json.dumps(
        [{"question_id": f"q{k}", "img_id": ids[k], "sent": q, "label": label} for k, (q, label) in enumerate(
            [("Is the dog on the left?", {"yes": 1.0}), ("How many dogs?", {"two": 1.0, "no": 0.3}),
             ("Is there a cat?", {"no": 1.0})])]))
    (iglue / "gqa" / "annotations" / "trainval_ans2label.json").write_text(
        json.dumps({a: i for i, a in enumerate(answers)}))
    xgqa = iglue / "xGQA" / "annotations" / "few_shot" / "de" / "test.json"
    xgqa.parent.mkdir(parents=True)
    xgqa.write_text(json.dumps({f"x{k}": {"imageId": ids[k], "question": q, "answer": a}
                                for k, (q, a) in enumerate([("Gibt es einen Hund?", "yes"), ("Wie viele?", "two")])}))

    tokenizer = Tokenizer.train(SENTENCES * 4, root / "spm", vocab_size=200)
    cfg = micro_params[0].copy_and_resolve_references()
    cfg.text.update(vocab_size=tokenizer.vocab_size, mask_token_id=tokenizer.mask_id)
    draw = np.random.default_rng(1)

    def leaf(path, shape):
        name = path[-1].key
        if name == "scale":
            return np.ones(shape, np.float32)
        return np.full(shape, cfg.temp, np.float32) if name == "temp" else (0.05 * draw.normal(size=shape)).astype(
            np.float32)

    params = jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    checkpoint = root / "micro.th"
    official.save(checkpoint, cfg, params)
    pretrained = root / "pretrained_run"
    import_to_workdir(str(checkpoint), str(pretrained), text_num_heads=cfg.text.num_heads)
    return dict(root=root, iglue=iglue, images=images, tokenizer=tokenizer, model=cfg, params=params,
                checkpoint=checkpoint, pretrained=pretrained)


def _micro(fx, **overrides) -> dict:
    """Command-line overrides: the fixture's data and micro geometry, no dropout or augmentation, batches of 8."""
    return {"data.iglue_root": fx["iglue"], "data.tokenizer": fx["tokenizer"].model_path,
            "model.vision.image_res": 32, "model.vision.window_size": 4, "model.vision.drop_path_rate": 0.0,
            "model.text.hidden_dropout": 0.0, "model.text.attention_dropout": 0.0, "data.max_tokens": 16,
            "data.max_words": 16, "data.augment": False, "train.batch_size": 8, "train.checkpoint_every": 4,
            "train.log_every": 1, "eval.batch_size": 8, "optimizer.lr": 1e-3, **overrides}


def _xvnli(fx) -> dict:
    return _micro(fx, **{"data.image_root": fx["images"], "data.languages": ("en", "fr"),
                         "init.workdir": fx["pretrained"], "train.epochs": 2, "eval.start_epoch": 0})


def _retrieval(fx) -> dict:
    return _micro(fx, **{"data.image_root.flickr30k": fx["images"], "data.image_root.coco": fx["images"],
                         "data.languages": ("en", "de"), "init.checkpoint": fx["checkpoint"],
                         "init.text_num_heads": fx["model"].text.num_heads, "train.epochs": 1,
                         "objectives.negatives": "global", "eval.k_test": 3, "eval.pairs_per_block": 16})


def _config(name: str, overrides: dict):
    """The config `cclm-jax --config configs/finetune/<name>.py` builds with these overrides (in process)."""
    config = load_config_file(REPO / "configs" / "finetune" / f"{name}.py")
    for key, value in overrides.items():
        *parents, field = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[field] = str(value) if isinstance(value, pathlib.Path) else value
    return config


def _cli(command: str, name: str, workdir, overrides: dict, check: bool = True):
    """`python -m cclm_jax <command>` on one CPU device (Orbax saves of 8-device arrays are slow)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
    cmd = [sys.executable, "-m", "cclm_jax", command, f"--config={REPO}/configs/finetune/{name}.py",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def xvnli_run(fixture, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("xvnli_run")
    proc = _cli("finetune", "xvnli", workdir, {**_xvnli(fixture), "evals.translate_test.every": 0})
    return workdir, json.loads(proc.stdout[proc.stdout.index("{"):])


def _params(workdir):
    return jax.tree.map(np.asarray, restore_params(str(workdir))[1])


def test_xvnli_finetunes_from_a_pretraining_run_and_reports(fixture, xvnli_run):
    workdir, printed = xvnli_run
    results = report.read_results(workdir)
    # the run's own test sets and, added by config (`evals.translate_test`), the translate-test files at the end
    assert set(results) == {"xvnli", "xvnli_translate_test"} and set(results["xvnli"]) == {"en", "fr"}
    assert results["xvnli"] == printed
    translate_test = load_task_data(_config("xvnli", {**_xvnli(fixture), "protocol": "translate_test"}), train=False)
    assert set(results["xvnli_translate_test"]) == set(translate_test.tests) == {"en", "fr"}
    for lang, test in load_task_data(_config("xvnli", _xvnli(fixture)), train=False).tests.items():
        correct = results["xvnli"][lang]["accuracy"] * len(test) / 100
        assert correct == pytest.approx(round(correct))  # k of the 5 test pairs right
    markdown = (workdir / "results.md").read_text()
    assert "| fr |" in markdown and "avg (excl. en)" in markdown
    assert (workdir / "xvnli.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["task"] == "xvnli" and saved["model"]["vision"]["image_res"] == 32
    assert saved["model"]["text"]["num_layers"] == fixture["model"].text.num_layers
    assert saved["data"]["tokenizer"] == str(fixture["tokenizer"].model_path)
    # 20 examples, batch 8: 3 steps per epoch (the last one half padding), 2 epochs, checkpoints every 4 steps.
    assert Checkpointer(str(workdir), every=1, keep=9).all_steps() == [4, 6]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/ce" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(r["train/ce"]) for r in train)
    assert train[0]["train/ce"] == pytest.approx(np.log(3), abs=0.3)
    # the test sets after epoch 0 (step 3, during the run) and at the end (step 6)
    tested = [r for r in rows if "eval/test/fr/accuracy" in r]
    assert [r["step"] for r in tested] == [3, 6]
    assert tested[-1]["eval/test/fr/accuracy"] == results["xvnli"]["fr"]["accuracy"]
    translated = [r for r in rows if "eval/translate_test/fr/accuracy" in r]
    assert [r["step"] for r in translated] == [6]  # every=0: at the end only
    assert translated[0]["eval/translate_test/fr/accuracy"] == results["xvnli_translate_test"]["fr"]["accuracy"]
    assert (workdir / "eval" / "epoch_0" / "results.json").is_file()
    # The pre-trained towers were the starting point: each weight moved by at most the summed learning rate.
    params = _params(workdir)
    assert sorted(params) == ["cls_head", "text_encoder", "vision_encoder"]
    path = ("text_encoder", "layer_0", "attention", "self", "query", "kernel")
    start, end = fixture["params"], params
    for part in path:
        start, end = start[part], end[part]
    assert 0 < np.abs(end - start).max() < 6 * 1e-3


def test_resume_is_exact(fixture, xvnli_run, tmp_path):
    """A run killed after step 5 (its last checkpoint is step 4, in the second epoch) and restarted ends with the
    same parameters and results as the uninterrupted run."""
    workdir, printed = xvnli_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "checkpoints" / "6")
    for name in ("results.json", "results.md", "xvnli.png"):
        (copy / name).unlink()
    proc = _cli("finetune", "xvnli", copy, {**_xvnli(fixture), "evals.translate_test.every": 0})
    assert "resumed from step 4" in proc.stderr
    assert report.read_results(copy) == report.read_results(workdir)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(_params(workdir))[0],
                            jax.tree.leaves(_params(copy))):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def _cli_process(name: str, workdir, overrides: dict) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
    cmd = [sys.executable, "-m", "cclm_jax", "finetune", f"--config={REPO}/configs/finetune/{name}.py",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, timeout=600):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.1)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_resume_after_a_signal_is_exact(fixture, xvnli_run, tmp_path, how):
    """Fine-tuning runs through the pre-training trainer: SIGTERM saves and exits 0, SIGKILL loses only the steps
    after the last checkpoint; either way the restarted run ends bit for bit where the uninterrupted one did."""
    workdir, _ = xvnli_run
    run = tmp_path / "run"
    proc = _cli_process("xvnli", run, _xvnli(fixture))
    if how == "sigterm":
        _wait_for(lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 1,
                  proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "preemption requested: saved step" in err, err[-3000:]
        assert Checkpointer(str(run), every=1, keep=9).latest_step() < 6
    else:
        _wait_for(lambda: (run / "checkpoints" / "4").is_dir(), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    _cli("finetune", "xvnli", run, _xvnli(fixture))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(_params(workdir))[0],
                            jax.tree.leaves(_params(run))):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert report.read_results(run)["xvnli"] == report.read_results(workdir)["xvnli"]


def test_retrieval_finetunes_from_an_official_checkpoint_and_evaluates(fixture, tmp_path):
    workdir = tmp_path / "retrieval"
    _cli("finetune", "xflickrco", workdir, _retrieval(fixture))
    tables = report.read_results(workdir)
    assert set(tables) == {"xflickrco", "xflickrco_itc"}  # re-ranked, and its first stage (the dual encoder)
    results = tables["xflickrco"]
    assert set(results) == set(tables["xflickrco_itc"]) == {"en", "de"}
    for values in results.values():
        assert values["r_mean"] == pytest.approx(
            np.mean([values[f"{d}_r{k}"] for d in ("txt", "img") for k in metrics.RECALL_AT]))
    assert "txt_r1" in (workdir / "results.md").read_text()
    params = _params(workdir)
    assert sorted(params) == ["itm_head", "temp", "text_encoder", "text_proj", "vision_encoder", "vision_proj"]
    assert read_run_config(workdir).name == "xflickrco"
    assert Checkpointer(str(workdir), every=1, keep=9).all_steps() == [2]  # 16 (image, caption) pairs, batch 8

    # `cclm-jax evaluate` with the dual encoder alone reports under the same key what training's re-ranked
    # evaluation reported for its first stage.
    (workdir / "results.json").unlink()
    proc = _cli("evaluate", "xflickrco", workdir, {**_retrieval(fixture), "eval.rerank": False})
    evaluated = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert evaluated["step"] == 2 and set(evaluated["tables"]) == {"xflickrco_itc"}
    assert evaluated["results"] == tables["xflickrco_itc"]
    assert report.read_results(workdir) == {"xflickrco_itc": tables["xflickrco_itc"]}
    assert (workdir / "xflickrco_itc.png").exists() and "## xflickrco_itc" in (workdir / "results.md").read_text()


def test_a_locked_tower_encodes_each_training_image_once(fixture, tmp_path):
    """`model.vision.frozen` + no augmentation: batches carry the tower's outputs, computed once per distinct image,
    the losses are those of the pixel batches, and the trained run's tower is bitwise the loaded one."""
    overrides = {**_retrieval(fixture), "model.vision.frozen": True}
    config = _config("xflickrco", overrides)
    assert locked_tower.uses_cached_features(config)
    assert not locked_tower.uses_cached_features(_config("xflickrco", {**overrides, "data.augment": True}))
    assert not locked_tower.uses_cached_features(
        _config("xflickrco", {**overrides, "data.cache_locked_features": False}))
    rows = load_task_data(config).train
    model_config, params = task_start.initial_task_params(config, jax.random.key(0))
    sources = [s for row in rows for s in finetune_input.row_images("retrieval", row)]
    features = locked_tower.encode_training_images(model_config, params, sources, image_res=32,
                                                   batch_size=3)  # 8 images: calls of 3, 3 and 2 (padded)
    assert len(sources) == 16 and features.embeds.shape == (8, 17, 128)  # 16 pairs of 8 pictures; global + 4x4 tokens

    def batches(**kw):
        return TrainBatches("retrieval", rows, fixture["tokenizer"], global_batch=8, image_res=32, seed=3,
                            augment=False, max_tokens=16, max_words=16, **kw).batches(0)

    pixels, cached = next(batches()), next(batches(image_features=features))
    assert "image" not in cached and cached["image_embeds"].shape == (8, 17, 128)
    for key in ("text_ids", "text_atts", "idx", "valid"):
        np.testing.assert_array_equal(cached[key], pixels[key], err_msg=key)
    config.model = model_config
    loss_fn = jax.jit(definitions.make_loss_fn(config, dropout=False))
    (total, parts), (total_cached, parts_cached) = (loss_fn(params, b, jax.random.key(1)) for b in (pixels, cached))
    for name in ("itc", "itm"):  # measured: equal to 2e-7 relative (the tower batched by 3 vs by 8)
        assert float(parts_cached[name]) == pytest.approx(float(parts[name]), rel=1e-6), name
    with pytest.raises(ValueError, match="data.augment = False"):
        TrainBatches("retrieval", rows, fixture["tokenizer"], global_batch=8, image_res=32, seed=3, augment=True,
                     image_features=features, max_tokens=16, max_words=16)

    workdir = tmp_path / "locked"
    proc = _cli("finetune", "xflickrco", workdir, overrides)
    assert "8 training images encoded once" in proc.stderr + (workdir / "log.txt").read_text()
    trained = _params(workdir)
    jax.tree.map(np.testing.assert_array_equal, trained["vision_encoder"],
                 jax.tree.map(np.asarray, params["vision_encoder"]))
    assert not np.array_equal(trained["text_proj"]["kernel"], np.asarray(params["text_proj"]["kernel"]))


def test_training_batches_are_a_function_of_the_step(fixture):
    config = _config("xvnli", _xvnli(fixture))
    rows = load_task_data(config).train
    make = lambda: TrainBatches("xvnli", rows, fixture["tokenizer"], global_batch=8, image_res=32, seed=3,  # noqa: E731
                                max_tokens=16, max_words=16)
    full = make().batches(0)
    batches = [next(full) for _ in range(5)]
    assert [b["valid"].sum() for b in batches] == [8, 8, 4, 8, 8]
    labels = lambda b: sorted(b["label"][b["valid"]].tolist())  # noqa: E731
    assert sorted(sum((labels(b) for b in batches[:3]), [])) == sorted(r.label for r in rows)
    late = make().batches(3)
    for expected in batches[3:]:
        got = next(late)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    hosts = [TrainBatches("xvnli", rows, fixture["tokenizer"], global_batch=8, image_res=32, seed=3,
                          process_index=p, process_count=2, max_tokens=16, max_words=16).batches(0) for p in (0, 1)]
    halves = [next(h) for h in hosts]
    for key in batches[0]:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), batches[0][key], err_msg=key)


def test_geometry_conversion_of_a_run_matches_the_official_import(fixture):
    """A 32-px / window-4 run fine-tuned at 64 px / window 8 gets the tables `official.load` would give."""
    config = _config("xvnli", _xvnli(fixture))
    config.model.vision.update(image_res=64, window_size=8)
    model_config = task_start.task_model_config(fixture["model"], config.model)
    converted = task_start.resize_geometry(fixture["params"], model_config)
    _, imported = official.load(fixture["checkpoint"], text_num_heads=fixture["model"].text.num_heads,
                                vision__image_res=64, vision__window_size=8)
    table = ("vision_encoder", "layers_0", "blocks_0", "attn", "relative_position_bias_table")
    got, want = converted, imported
    for part in table:
        got, want = got[part], want[part]
    assert got.shape == (15 * 15, 2)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-6)
    abstract = task_start.abstract_task_params("xvnli", model_config)
    task_start.check_tree(definitions.init_task_params("xvnli", converted, jax.random.PRNGKey(0)),
                          nn.meta.unbox(abstract), "converted")


def test_abstract_task_params_match_the_initialised_trees(fixture):
    cfg = fixture["model"]
    for task in definitions.TASKS:
        params = definitions.init_task_params(task, fixture["params"], jax.random.PRNGKey(0))
        task_start.check_tree(params, nn.meta.unbox(task_start.abstract_task_params(task, cfg)), task)
    with pytest.raises(ValueError, match="do not fit the task model: missing: .*cls_head"):
        task_start.check_tree(definitions.init_task_params("retrieval", fixture["params"], None),
                              nn.meta.unbox(task_start.abstract_task_params("xvnli", cfg)), "x")


def test_protocols_and_two_image_and_vqa_data(fixture):
    translate = load_task_data(_config("xvnli", {**_xvnli(fixture), "protocol": "translate_test"}), train=False)
    assert [len(translate.tests[lang]) for lang in ("en", "fr")] == [5, 3]  # fr: the machine-translated file
    few = load_task_data(_config("xvnli", {**_xvnli(fixture), "protocol": "few_shot", "data.shots": 5,
                                           "data.train_language": "fr"}))
    assert len(few.train) == 5 and list(few.tests) == ["fr"]

    marvl = _config("marvl", {**_micro(fixture), "data.image_root": fixture["images"], "data.languages": ("id",),
                              "data.train_files": (str(fixture["root"] / "nlvr.json"),),
                              "data.nlvr_image_root": fixture["root"] / "nlvr"})
    data = load_task_data(marvl)
    assert len(data.train) == 3 and len(data.tests["id"]) == 3
    batch = next(TrainBatches("marvl", data.train, fixture["tokenizer"], global_batch=4, image_res=32, seed=0,
                              augment=False, max_tokens=16, max_words=16).batches(0))
    order = TrainBatches("marvl", data.train, fixture["tokenizer"], global_batch=4, image_res=32,
                         seed=0).epoch_order(0)[0]
    for key, side in (("image", 0), ("image_2", 1)):
        np.testing.assert_array_equal(batch[key], task_batches.load_images(
            [data.train[i].image_paths[side] for i in order], 32))
    assert batch["valid"].tolist() == [True, True, True, False]
    np.testing.assert_array_equal(batch["label"], [data.train[i].label for i in order])

    xgqa = _config("xgqa", {**_micro(fixture), "data.image_root": fixture["images"], "data.languages": ("de",),
                            "data.max_answers": 2, "data.answer_tokens": 6})
    data = load_task_data(xgqa)
    assert data.answers == ("yes", "no", "left", "two") and len(data.tests["de"]) == 2
    batch = next(TrainBatches("xgqa", data.train, fixture["tokenizer"], global_batch=4, image_res=32, seed=0,
                              max_tokens=16, max_words=16, max_answers=2, answer_tokens=6).batches(0))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["answer_ids"].shape == (4, 2, 6)
    weights = {data.train[i].question_id: w.tolist() for i, w in zip(
        TrainBatches("xgqa", data.train, None, global_batch=4, image_res=32, seed=0).epoch_order(0)[0],
        batch["answer_weights"])}
    assert weights == {"q0": [1.0, 0.0], "q1": [0.5, 0.5], "q2": [1.0, 0.0]}
    with pytest.raises(ValueError, match="no training data in other languages for xgqa"):
        load_task_data(_config("xgqa", {**_micro(fixture), "data.image_root": fixture["images"],
                                        "protocol": "all_languages"}))


# ------------------------------------------------------------------------------------------------ errors

def _error(config, tmp_path):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        finetuning.finetune(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())
    return str(info.value)


def test_only_image_roots_the_files_use_are_required(fixture):
    config = _config("xflickrco", {**_retrieval(fixture), "data.image_root.coco": ""})  # no COCO image in the files
    data = load_task_data(config)
    assert {os.path.dirname(path) for path in data.tests["de"].image_paths} == {str(fixture["images"])}
    config = _config("xflickrco", {**_retrieval(fixture), "data.image_root.coco": "/nonexistent/coco"})
    with pytest.raises(FileNotFoundError, match="config.data.image_root.coco: directory /nonexistent/coco does not"):
        load_task_data(config)


def test_errors_before_compilation(fixture, tmp_path):
    config = _config("xvnli", _xvnli(fixture))
    config.init.checkpoint = str(fixture["checkpoint"])
    assert "set exactly one of init.workdir" in _error(config, tmp_path)

    config = _config("xvnli", _xvnli(fixture))
    config.data.languages = ("en", "ar")
    message = _error(config, tmp_path)
    assert "XVNLI/annotations/ar/test.jsonl does not exist" in message and "config.data.iglue_root" in message

    config = _config("xvnli", _xvnli(fixture))
    (fixture["images"] / "1003.jpg").rename(fixture["root"] / "moved.jpg")
    try:
        message = _error(config, tmp_path)
    finally:
        (fixture["root"] / "moved.jpg").rename(fixture["images"] / "1003.jpg")
    assert "images referenced by" in message and "1003.jpg" in message

    config = _config("xvnli", _xvnli(fixture))
    config.train.batch_size = 12
    assert "config.train.batch_size 12 is not divisible by the 8 batch shards" in _error(config, tmp_path)

    config = _config("xvnli", _xvnli(fixture))
    config.data.tokenizer = str(REPO / "no_such.model")
    assert "no_such.model' does not exist" in _error(config, tmp_path)

    config = _config("xflickrco", _retrieval(fixture))
    config.data.tokenizer = str(Tokenizer.train(SENTENCES * 4, tmp_path / "other", vocab_size=150).model_path)
    assert "fine-tune with the pre-training tokenizer" in _error(config, tmp_path)

    with pytest.raises(ValueError, match="holds a pre-training run .* evaluate it with its own task's config"):
        finetuning.evaluate(_config("xvnli", _xvnli(fixture)), str(fixture["pretrained"]))


def test_cli_reports_a_bad_config_without_compiling(fixture, tmp_path):
    proc = _cli("finetune", "xvnli", tmp_path / "run", {**_xvnli(fixture), "data.image_root": "/nonexistent/images"},
                check=False)
    assert proc.returncode != 0
    assert "config.data.image_root: directory /nonexistent/images does not exist" in proc.stderr
    assert not (tmp_path / "run" / "config.json").exists()
