"""Flickr8k retrieval (`../shared/data/flickr8k`): 3,000 training and 237 test (val) images with captions in
en/de/fr/cs (Multi30K task 1: one per image) and zh (Flickr8k-CN: five per image); reference retrieval
fine-tuning (ITC + ITM with image ids, ITM re-ranking of the top `k_test` in evaluation).

`get_config(arg)`, comma-separated options:
- a training language ('en', 'de', 'fr', 'cs', 'zh': zero-shot to the others), or 'all' (default: every
  language, the all-languages protocol);
- 'tiny': a small CCLM from random weights for a CPU (32 px, 2-stage Swin, 2 text + 2 fusion layers, vocabulary
  from the tokenizer, e.g. a 4,000-piece one trained on the captions with `Tokenizer.train`; lr 1e-3, batch 32,
  2 epochs of 844 steps, no image augmentation, no gradient clipping, no dropout; ~12 minutes on 2 cores). From
  scratch on 3,000 photos such a model learns global colour and layout statistics, scoring what the linear
  baseline of `benchmarks/flickr8k_linear_baseline.py` scores (R@1 ~5x chance): 32 px loses nothing against 64 px
  at 2.5x the speed, while the reference augmentation and the reference clipping to norm 1 (a fresh model's
  gradient norm starts near 50) both slow it down within this budget (benchmarks/RESULTS.md, "Fine-tuning").

  cclm-jax finetune --config configs/finetune/flickr8k.py:tiny --workdir /tmp/f8k \\
    --config.data.flickr8k_root=../shared/data/flickr8k --config.data.tokenizer=/tmp/f8k_spm.model
"""
from cclm_jax import tasks
from cclm_jax.models.config import tiny_model_config

LANGUAGES = ("en", "de", "fr", "cs", "zh")


def get_config(arg: str = ""):
    options = [a for a in arg.split(",") if a]
    unknown = [a for a in options if a not in LANGUAGES + ("all", "tiny")]
    if unknown:
        raise ValueError(f"configs/finetune/flickr8k.py: unknown options {unknown}; use a language of "
                         f"{LANGUAGES}, 'all' and/or 'tiny'")
    languages = [a for a in options if a in LANGUAGES]
    config = tasks.default_finetune_config("retrieval")
    config.name = "flickr8k"
    config.train.epochs = 10
    config.eval.update(batch_size=96, k_test=128)
    config.data.update(flickr8k_root="", max_tokens=40, max_words=40, languages=LANGUAGES,
                       train_language=languages[0] if languages else "en")
    if "tiny" in options:
        model = tiny_model_config()
        model.vision.update(image_res=32, embed_dim=64, depths=(2, 2), num_heads=(2, 4), window_size=4)
        model.vision.drop_path_rate = 0.0
        model.text.update(num_layers=4, fusion_layer=2, vocab_size=-1, mask_token_id=-1, max_position_embeddings=64,
                          hidden_dropout=0.0, attention_dropout=0.0)
        config.model = model
        config.init.from_scratch = True
        config.optimizer.update(lr=1e-3, clip_grad_norm=None)
        config.train.update(epochs=2, batch_size=32, log_every=20, checkpoint_every=400)
        config.eval.update(batch_size=64, k_test=16, pairs_per_block=512)
        config.data.update(max_tokens=32, max_words=32, augment=False)
    return tasks.apply_protocol(config, "zero_shot" if languages else "all_languages")
