"""Integration: retrieval fine-tuning on the real Flickr8k images with captions in en/de/fr/cs/zh, evaluated on
the 237 val images per language (runs when ../shared/data is present; ~13 minutes on 2 CPU cores; the steps can be
set with CCLM_FLICKR8K_STEPS).

A small CCLM (the `configs/finetune/flickr8k.py:tiny` recipe: 32 px, 2-stage Swin, 2 text + 2 fusion layers, a
SentencePiece vocabulary trained on the train captions, no image augmentation) is initialised at random, trained
with the fine-tuning step (index-aware ITC + ITM, reference AdamW) on batches drawn from all (image, caption)
pairs of the five languages, then evaluated with the reference protocol (ITC top-k re-ranked by ITM) and in
dual-encoder mode, next to the linear colour-layout baseline (`cclm_jax.evaluation.baselines`: CCA between
thumbnail/colour-histogram image statistics and bag-of-pieces captions, fitted on the same training pairs). The
recalls are printed. Asserted, for the dual encoder (a from-scratch ITM head does not learn in this budget; see
benchmarks/RESULTS.md): R@1 pooled over languages and directions > 3x chance (1/237), every language's R@10 (mean
of both directions) > 2x chance, and the pooled R@10 at least 0.8x the baseline's. From random weights on 3,000
photos the model learns the colour and layout statistics the baseline sees and no more (both ~5x chance at R@1);
single R@1 cells rest on 1-8 hits.
"""
import os
import pathlib
import time

import jax
import numpy as np
import pytest
import task_batches  # tests/task_batches.py
from flax import linen as nn

from benchmarks.linear_baseline import cca_retrieval_baseline
from cclm_jax.data import retrieval_sets
from cclm_jax.data.finetune_input import encode_texts
from cclm_jax.data.tokenizer import Tokenizer
from cclm_jax.evaluation import metrics
from cclm_jax.evaluation.retrieval import RetrievalEvaluator
from cclm_jax.models import build_model
from cclm_jax.models.tasks import init_retrieval_params
from cclm_jax.run_config import load_config_file
from cclm_jax.tasks import definitions
from cclm_jax.train import finetuning
from cclm_jax.train_state import create_train_state

LANGUAGES = ("en", "de", "fr", "cs", "zh")
STEPS = int(os.environ.get("CCLM_FLICKR8K_STEPS", "1000"))
CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "finetune" / "flickr8k.py"


def _tiny_config(tokenizer):
    """`configs/finetune/flickr8k.py:tiny` with the tokenizer's vocabulary."""
    config = load_config_file(CONFIG, "tiny")
    config.model.text.update(vocab_size=tokenizer.vocab_size, mask_token_id=tokenizer.mask_id)
    definitions.validate_finetune_config(config)
    return config


@pytest.mark.integration
def test_flickr8k_multilingual_retrieval_finetuning(shared_data_dir, tmp_path, capsys):
    root = shared_data_dir / "flickr8k"
    train = {lang: retrieval_sets.read_flickr8k(root / "train.jsonl", root, lang) for lang in LANGUAGES}
    val = {lang: retrieval_sets.read_flickr8k(root / "val.jsonl", root, lang, check_images=True) for lang in LANGUAGES}
    tokenizer = Tokenizer.train([t for lang in LANGUAGES for t in train[lang].texts], tmp_path / "spm",
                                vocab_size=4000)
    config = _tiny_config(tokenizer)
    cfg, res = config.model, config.model.vision.image_res
    batch_size, max_tokens, k_test = config.train.batch_size, config.data.max_tokens, config.eval.k_test
    model = build_model(cfg)
    ids0 = np.zeros((1, 8), np.int32)
    init = jax.jit(lambda key: nn.meta.unbox(model.init(key, np.zeros((1, res, res, 3), np.float32), ids0,
                                                        ids0)["params"]))
    params = init_retrieval_params(jax.tree.map(np.asarray, init(jax.random.PRNGKey(0))))

    # Training pool: every (image, caption) of every language; a batch draws pairs at random.
    images = task_batches.load_images(train["en"].image_paths, res)
    pool_image = np.concatenate([train[lang].txt2img for lang in LANGUAGES]).astype(np.int32)
    pool_ids, pool_atts = encode_texts(tokenizer, [t for lang in LANGUAGES for t in train[lang].texts],
                                       max_tokens=max_tokens, max_words=max_tokens)
    schedule = finetuning.finetune_schedule(config.train, STEPS * batch_size // config.train.epochs)
    optimizer = finetuning.make_task_optimizer(config, schedule, params)
    state = jax.jit(lambda p, key: create_train_state(p, optimizer, key))(params, jax.random.PRNGKey(1))
    step = finetuning.make_train_step(config, optimizer)
    rng = np.random.default_rng(0)
    start, history = time.time(), []
    for _ in range(STEPS):
        rows = rng.choice(len(pool_image), batch_size, replace=False)
        batch = {"image": images[pool_image[rows]], "text_ids": pool_ids[rows], "text_atts": pool_atts[rows],
                 "idx": pool_image[rows]}
        state, out = step(state, batch)
        history.append(out)  # fetched once after the loop: no host sync per step
    history = [jax.tree.map(float, h) for h in jax.device_get(history)]
    train_seconds = time.time() - start
    first, last = history[0], {k: np.mean([h[k] for h in history[-50:]]) for k in history[-1]}
    assert sum(h["skipped_nonfinite"] for h in history) == 0
    assert last["itc"] < np.log(batch_size) - 0.3, last  # chance: log(batch) nats

    evaluator = RetrievalEvaluator(build_model(cfg), batch_size=config.eval.batch_size,
                                   pairs_per_block=config.eval.pairs_per_block)
    val_images = task_batches.load_images(val["en"].image_paths, res)
    chance = 100.0 / len(val_images)
    results = {}
    for lang in LANGUAGES:
        ids, atts = encode_texts(tokenizer, val[lang].texts, max_tokens=max_tokens, max_words=max_tokens)
        for mode, rerank in (("itm", True), ("itc", False)):
            scores = evaluator.image_text_scores(state.params, val_images, ids, atts, k_test=k_test, rerank=rerank)
            results[lang, mode] = metrics.retrieval_metrics(scores.score_i2t, scores.score_t2i, val[lang].txt2img,
                                                            val[lang].img2txt)
        results[lang, "cca"] = cca_retrieval_baseline(train[lang], val[lang], images, val_images,
                                                      tokenizer.encode_batch)
    with capsys.disabled():
        print(f"\nFlickr8k retrieval after {STEPS} steps of batch {batch_size} ({train_seconds:.0f} s of training; "
              f"ITC {first['itc']:.3f} -> {last['itc']:.3f}, ITM {first['itm']:.3f} -> {last['itm']:.3f} "
              f"(mean of the last 50 steps)); "
              f"val {len(val_images)} images, chance R@1 {chance:.2f}%")
        for (lang, mode), r in results.items():
            print(f"  {lang} {mode}: i2t R@1 {r['txt_r1']:.1f}  t2i R@1 {r['img_r1']:.1f}  "
                  f"i2t R@10 {r['txt_r10']:.1f}  t2i R@10 {r['img_r10']:.1f}  r_mean {r['r_mean']:.1f}")
    dual = [results[lang, "itc"] for lang in LANGUAGES]
    pooled_r1 = np.mean([(r["txt_r1"] + r["img_r1"]) / 2 for r in dual])
    assert pooled_r1 > 3 * chance, pooled_r1
    pooled_r10 = {mode: np.mean([(results[lang, mode]["txt_r10"] + results[lang, mode]["img_r10"]) / 2
                                 for lang in LANGUAGES]) for mode in ("itc", "cca")}
    assert pooled_r10["itc"] > 0.8 * pooled_r10["cca"], pooled_r10  # the colour-layout statistics are learned
    for lang, r in zip(LANGUAGES, dual):
        assert (r["txt_r10"] + r["img_r10"]) / 2 > 20 * chance, (lang, r)
