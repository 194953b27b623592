"""Training batches from img2dataset shards (read directly) and from prepared datasets (`data.*.kind = "tfds"`)."""
import numpy as np
import pytest

from cclm_jax.data import pipeline, prepare
from cclm_jax.data.config import default_data_config, validate_data_config
from tests import data_fixtures


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    shards = data_fixtures.write_webdataset(root / "wds", shards=3, per_shard=6)
    de = data_fixtures.write_translations(root / "uc2_de.tsv.gz", sorted(shards["captions"]), "de")
    wikimatrix = data_fixtures.write_wikimatrix(root / "WikiMatrix.de-en.tsv", [
        (1.1 + i / 100, f"Satz Nummer {i}", f"sentence number {i}") for i in range(20)] + [(0.5, "zu", "low")])
    cfg = default_data_config()
    cfg.data_dir = str(root / "cache")
    cfg.shuffle_buffer = 8
    cfg.demo.update(image_size=32, num_train=20, num_val=8, num_parallel=24, vocab_size=300)
    cfg.image_caption.update(kind="img2dataset", paths=tuple(shards["paths"]), translations=(f"de={de}",),
                             image_res=24, batch_size=4, randaugment=False, sample_2_captions=True)
    cfg.parallel_text.update(kind="wikimatrix", paths=(wikimatrix,), batch_size=4)
    cfg.eval.update(image_res=24, batch_size=4)
    return cfg, pipeline.load_tokenizer(cfg), shards, root


def _batches(pipes, kind, n):
    return [next(pipes[kind]) for _ in range(n)]


def test_webdataset_shards_read_end_to_end_into_batches(setup):
    cfg, tokenizer, shards, _ = setup
    pipes = pipeline.build_host_pipelines(cfg, tokenizer)
    # 18 samples: a corrupt image, a missing caption, a missing image and a broken json member are dropped
    assert pipes["image_caption"].metrics() == {
        "data/image_caption/skipped_corrupt_image": 1, "data/image_caption/skipped_invalid_json": 1,
        "data/image_caption/skipped_missing_image": 1, "data/image_caption/skipped_no_caption": 1}
    assert pipes["parallel_text"].metrics() == {"data/parallel_text/skipped_below_min_score": 1}
    for batch in _batches(pipes, "image_caption", 5):  # 14 examples: crosses an epoch
        assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.uint8
        assert batch["text_ids"].shape == batch["text_ids_2"].shape == (4, cfg.image_caption.max_tokens)
        assert (batch["text_atts"].sum(1) > 2).all()
        # every sample has its English caption and a German translation: the second caption differs
        assert (batch["text_ids"] != batch["text_ids_2"]).any(axis=1).all()
    batch = next(pipes["parallel_text"])
    assert batch["text_ids"].shape == batch["text_ids_2"].shape == (4, cfg.parallel_text.max_tokens)
    pipes["image_caption"].close()
    pipes["parallel_text"].close()


def test_training_reads_prepared_datasets_like_the_inputs(setup, tmp_path):
    cfg, tokenizer, _, _ = setup
    done = {p.section: p for p in prepare.prepare_config(cfg, str(tmp_path / "prepared"), num_shards=2)}
    assert sorted(done) == ["eval", "image_caption", "parallel_text"]
    assert done["image_caption"].num_examples == 14 and done["parallel_text"].num_examples == 20
    assert done["image_caption"].skipped == {"corrupt_image": 1, "invalid_json": 1, "missing_image": 1,
                                             "no_caption": 1}
    prepared = cfg.copy_and_resolve_references()
    for section in ("image_caption", "parallel_text"):
        p = done[section]
        prepared[section].update(kind="tfds", tfds_name=p.name, tfds_data_dir=p.data_dir, tfds_split="train")
        assert f"--config.data.{section}.tfds_name={p.name}" in p.overrides()
    validate_data_config(prepared)
    direct, from_prepared = (pipeline.build_train_pipelines(c, tokenizer) for c in (cfg, prepared))
    for kind in ("image_caption", "parallel_text"):  # the same records in the same order: the same batches
        assert from_prepared[kind].skipped == direct[kind].skipped
        for a, b in zip(_batches(direct, kind, 3), _batches(from_prepared, kind, 3)):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # two hosts: each reads its own half (7 examples) of the files
    hosts = [pipeline.build_train_pipelines(prepared, tokenizer, process_index=i, process_count=2) for i in range(2)]
    first = [next(h["image_caption"]) for h in hosts]
    assert not np.array_equal(first[0]["image"], first[1]["image"])
    for pipes in [direct, from_prepared, *hosts]:
        for it in pipes.values():
            it.close()


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.image_caption.update(format="zip"), "config.data.image_caption.format: must be one of"),
    (lambda c: c.image_caption.update(translations=("de",)), "translations\\[0\\] must be 'lang=path'"),
    (lambda c: c.image_caption.update(paths=("/nonexistent/00000.tar",)),
     "config.data.image_caption.paths\\[0\\]: file '/nonexistent/00000.tar' does not exist"),
    (lambda c: c.parallel_text.update(kind="tfds", tfds_name=""), "config.data.parallel_text.tfds_name"),
])
def test_config_errors_name_the_key(setup, edit, message):
    cfg = setup[0].copy_and_resolve_references()
    edit(cfg)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        validate_data_config(cfg)


def test_runs_written_before_new_config_keys_resume(tmp_path):
    """Keys added after a run was written (this data release's, the region section and losses, a new batch kind)
    read as their defaults; a non-default value of one is another run."""
    import json

    from cclm_jax.run_config import default_run_config
    from cclm_jax.train import run_directory

    config = default_run_config()
    saved = json.loads(config.to_json_best_effort(sort_keys=True))
    for key in ("format", "caption_language", "translations", "join_field"):  # keys this data release added
        del saved["data"]["image_caption"][key]
    del saved["data"]["parallel_text"]["min_score"]
    del saved["data"]["region"], saved["data"]["mix"]["region"]
    del saved["objectives"]["weights"]["bbox"], saved["objectives"]["weights"]["giou"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    run_directory.check_same_run(config, str(tmp_path))  # absent = the default: the same run
    config.data.parallel_text.min_score = 1.2
    with pytest.raises(ValueError, match="data.parallel_text.min_score"):
        run_directory.check_same_run(config, str(tmp_path))
    config.data.parallel_text.min_score = 1.04
    config.data.mix = {"image_caption": 1, "parallel_text": 1, "region": 1}
    with pytest.raises(ValueError, match=r"differs in data.mix.region \('<absent>' -> 1\)"):
        run_directory.check_same_run(config, str(tmp_path))
