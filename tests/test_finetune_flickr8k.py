"""Integration: retrieval fine-tuning on the real Flickr8k images with captions in en/de/fr/cs/zh, evaluated on
the 237 val images per language (opt-in: CCLM_SLOW=1; needs ../shared/data; minutes on 2 CPU cores).

A small CCLM (64 px, 2-stage Swin, 2 text + 2 fusion layers, a SentencePiece vocabulary trained on the train
captions) is initialised at random, trained with the fine-tuning step (index-aware ITC + ITM, reference AdamW)
on one random language's caption per example, then evaluated with the reference protocol (ITC top-k
re-ranked by ITM) and in dual-encoder mode. The recalls are printed; R@1 must be well above chance (1/237).
"""
import os
import time

import jax
import numpy as np
import pytest
from flax import linen as nn

from cclm_jax.data.tokenizer import Tokenizer
from cclm_jax.evaluation import metrics, readers
from cclm_jax.evaluation.retrieval import RetrievalEvaluator
from cclm_jax.models import build_model, tiny_model_config
from cclm_jax.models.tasks import init_retrieval_params
from cclm_jax.train import finetune
from cclm_jax.train.state import create_train_state

LANGUAGES = ("en", "de", "fr", "cs", "zh")
STEPS = int(os.environ.get("CCLM_FLICKR8K_STEPS", "400"))
BATCH, LR, RES, MAX_TOKENS, K_TEST = 32, 1e-3, 64, 32, 16


def _model_config(tokenizer):
    cfg = tiny_model_config()
    cfg.vision.update(image_res=RES, embed_dim=64, depths=(2, 2), num_heads=(2, 4), window_size=4)
    cfg.text.update(num_layers=4, fusion_layer=2, vocab_size=tokenizer.vocab_size,
                    mask_token_id=tokenizer.mask_id, max_position_embeddings=64)
    return cfg


@pytest.mark.skipif(os.environ.get("CCLM_SLOW") != "1", reason="opt-in integration test: set CCLM_SLOW=1")
def test_flickr8k_multilingual_retrieval_finetuning(shared_data_dir, tmp_path, capsys):
    root = shared_data_dir / "flickr8k"
    train = {lang: readers.read_flickr8k(root / "train.jsonl", root, lang) for lang in LANGUAGES}
    val = {lang: readers.read_flickr8k(root / "val.jsonl", root, lang, check_images=True) for lang in LANGUAGES}
    tokenizer = Tokenizer.train([t for lang in LANGUAGES for t in train[lang].texts], tmp_path / "spm",
                                vocab_size=4000)
    cfg = _model_config(tokenizer)
    model = build_model(cfg)
    ids0 = np.zeros((1, 8), np.int32)
    init = jax.jit(lambda key: nn.meta.unbox(model.init(key, np.zeros((1, RES, RES, 3), np.float32), ids0,
                                                        ids0)["params"]))
    params = init_retrieval_params(jax.tree.map(np.asarray, init(jax.random.PRNGKey(0))))

    # Training pool: every (image, caption) of every language; a batch draws captions at random.
    images = finetune.load_images(train["en"].image_paths, RES)
    pool_image = np.concatenate([train[lang].txt2img for lang in LANGUAGES]).astype(np.int32)
    pool_ids, pool_atts = finetune.encode_texts(tokenizer, [t for lang in LANGUAGES for t in train[lang].texts],
                                                max_tokens=MAX_TOKENS, max_words=MAX_TOKENS)
    config = finetune.default_finetune_config("retrieval")
    config.model = cfg
    config.optimizer.lr = LR
    config.train.update(epochs=1, batch_size=BATCH)
    finetune.validate_finetune_config(config)
    schedule = finetune.finetune_schedule(config.train, STEPS * BATCH)
    optimizer = finetune.make_task_optimizer(config, schedule, params)
    state = jax.jit(lambda p, key: create_train_state(p, optimizer, key))(params, jax.random.PRNGKey(1))
    step = finetune.make_train_step(config, optimizer, schedule)
    rng = np.random.default_rng(0)
    start, first = time.time(), None
    for _ in range(STEPS):
        rows = rng.choice(len(pool_image), BATCH, replace=False)
        batch = {"image": images[pool_image[rows]], "text_ids": pool_ids[rows], "text_atts": pool_atts[rows],
                 "idx": pool_image[rows]}
        state, out = step(state, batch)
        first = first or jax.tree.map(float, out)
    last = jax.tree.map(float, out)
    train_seconds = time.time() - start
    assert last["itc"] < first["itc"] - 0.3 and last["skipped_nonfinite"] == 0

    evaluator = RetrievalEvaluator(build_model(cfg), batch_size=64, pairs_per_block=512)
    val_images = finetune.load_images(val["en"].image_paths, RES)
    chance = 100.0 / len(val_images)
    results = {}
    for lang in LANGUAGES:
        ids, atts = finetune.encode_texts(tokenizer, val[lang].texts, max_tokens=MAX_TOKENS, max_words=MAX_TOKENS)
        for mode, rerank in (("itm", True), ("itc", False)):
            scores = evaluator.image_text_scores(state.params, val_images, ids, atts, k_test=K_TEST, rerank=rerank)
            results[lang, mode] = metrics.retrieval_metrics(scores.score_i2t, scores.score_t2i, val[lang].txt2img,
                                                            val[lang].img2txt)
    with capsys.disabled():
        print(f"\nFlickr8k retrieval after {STEPS} steps of batch {BATCH} ({train_seconds:.0f} s of training; "
              f"ITC {first['itc']:.3f} -> {last['itc']:.3f}, ITM {first['itm']:.3f} -> {last['itm']:.3f}); "
              f"val {len(val_images)} images, chance R@1 {chance:.2f}%")
        for (lang, mode), r in results.items():
            print(f"  {lang} {mode}: i2t R@1 {r['txt_r1']:.1f}  t2i R@1 {r['img_r1']:.1f}  "
                  f"i2t R@10 {r['txt_r10']:.1f}  t2i R@10 {r['img_r10']:.1f}  r_mean {r['r_mean']:.1f}")
    for lang in LANGUAGES:
        r = results[lang, "itc"]
        assert (r["txt_r1"] + r["img_r1"]) / 2 > 2 * chance, (lang, r)
