"""Multi30K retrieval, the reference's `Retrieval_multi30k_<lang>_ft.yaml`: lr 3e-5, 10 epochs, max 40 tokens,
k_test 128; test on `test_2016_flickr.{en,de,fr,cs}`.

`get_config(lang)`: train on one language ('en' default: zero-shot cross-lingual for the others; 'de', 'fr',
'cs') or on all four ('all'). Files are the CCLM retrieval json lists (`readers.read_cclm_retrieval_json`):

  --config.data.train_files="('/data/multi30k/train.en.json',)" --config.data.image_root=/data/flickr30k/images \
  --config.data.test_files.en=/data/multi30k/test_2016_flickr.en.json  (and .de, .fr, .cs)
"""
from cclm_jax.train import finetune

LANGUAGES = ("en", "de", "fr", "cs")


def get_config(arg: str = ""):
    lang = arg or "en"
    if lang not in LANGUAGES + ("all",):
        raise ValueError(f"configs/finetune/multi30k.py: argument must be one of {LANGUAGES + ('all',)}, got {lang!r}")
    config = finetune.default_finetune_config("retrieval")
    config.name = "multi30k"
    config.train.epochs = 10
    config.eval.update(batch_size=96, k_test=128)
    config.data.update(max_tokens=40, max_words=40, image_root="", train_files=(),
                       test_files={code: "" for code in LANGUAGES}, languages=LANGUAGES,
                       train_language=lang)
    return finetune.apply_protocol(config, "all_languages" if lang == "all" else "zero_shot")
