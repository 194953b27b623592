"""`cclm-jax evaluate --out DIR` writes its report to DIR and leaves the run's own report alone; test files are read
from `data.test_root` (outside the training data root); with `data.skip_missing_images` a test image that is
missing is dropped and counted. A fine-tuned (retrieval) micro CCLM imported from an official file, evaluated in
process with the dual encoder (no re-ranking: one small compile)."""
import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from cclm_jax.data.tokenizer import Tokenizer
from cclm_jax.evaluation import report
from cclm_jax.interop import official
from cclm_jax.interop.shapes import param_shapes
from cclm_jax.run_config import load_config_file
from cclm_jax.tasks import definitions
from cclm_jax.train import finetuning
from cclm_jax.train.import_run import import_to_workdir

REPO = pathlib.Path(__file__).resolve().parents[1]
SENTENCES = ["a dog runs on the grass", "two dogs play with a red ball", "a woman rides a bike",
             "children play in the park", "a cat sleeps on the sofa", "ein hund läuft über das gras"]
OWN_REPORT = {"xflickrco": {"en": {"txt_r1": 12.5, "img_r1": 25.0}}}


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory, micro_params):
    """(root, fine-tuned retrieval run directory with its own results.json, tokenizer)."""
    root = tmp_path_factory.mktemp("evaluate_elsewhere")
    tokenizer = Tokenizer.train(SENTENCES * 4, root / "spm", vocab_size=120)
    cfg = micro_params[0].copy_and_resolve_references()
    cfg.text.update(vocab_size=tokenizer.vocab_size, mask_token_id=tokenizer.mask_id)
    draw = np.random.default_rng(0)

    def leaf(path, shape):
        if path[-1].key == "scale":
            return np.ones(shape, np.float32)
        return np.full(shape, cfg.temp, np.float32) if path[-1].key == "temp" else (
            0.05 * draw.normal(size=shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    official.save(root / "retrieval.th", cfg, definitions.init_task_params("retrieval", params, None),
                  layout="retrieval")
    run = root / "run"
    import_to_workdir(str(root / "retrieval.th"), str(run), text_num_heads=cfg.text.num_heads)
    report.write_results(OWN_REPORT, run)
    return root, run, tokenizer


def test_evaluate_writes_elsewhere_reads_test_root_and_skips_missing_images(imported_run, monkeypatch):
    root, run, tokenizer = imported_run
    images, tests = root / "images", root / "elsewhere_tests"
    images.mkdir()
    for k in range(4):
        Image.new("RGB", (32, 32), (60 * k, 20, 200 - 40 * k)).save(images / f"{k}.jpg", format="JPEG")
    rows = [{"sentences": [SENTENCES[k], SENTENCES[k + 1]], "id": str(k), "img_path": f"{k}.jpg"} for k in range(5)]
    test_file = tests / "xFlickrCO" / "annotations" / "de" / "test.jsonl"
    test_file.parent.mkdir(parents=True)
    test_file.write_text("".join(json.dumps(r) + "\n" for r in rows))  # image 4.jpg was never downloaded

    monkeypatch.chdir(REPO)
    config = load_config_file(REPO / "configs" / "finetune" / "xflickrco.py")
    config.data.update(iglue_root=str(root / "training_data_not_here"), test_root=str(tests), languages=("de",),
                       tokenizer=str(tokenizer.model_path), max_tokens=16, max_words=16, skip_missing_images=True)
    config.data.image_root.update(flickr30k=str(images), coco=str(images))
    config.eval.update(rerank=False, batch_size=8, k_test=2, pairs_per_block=16)
    out = root / "report"
    evaluated = finetuning.evaluate(config, str(run), out=str(out))

    assert evaluated["report"] == str(out) and set(evaluated["tables"]) == {"xflickrco_itc"}
    assert evaluated["skipped_missing_images"] == {"test/de": 1}
    written = report.read_results(out)
    assert set(written) == {"xflickrco_itc"} and set(written["xflickrco_itc"]) == {"de"}
    assert written["xflickrco_itc"]["de"] == pytest.approx(evaluated["results"]["de"])
    assert 0.0 <= written["xflickrco_itc"]["de"]["txt_r1"] <= 100.0
    assert (out / "results.md").exists()
    assert report.read_results(run) == OWN_REPORT  # the run's own report is untouched
