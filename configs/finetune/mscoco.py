"""Multilingual MSCOCO retrieval, the reference's `Retrieval_coco_<lang>_ft.yaml`: lr 3e-5, 10 epochs, max 40
tokens, k_test 256; test on `en.1k_test`, `ja.1k_test`, `zh.test` (CCLM retrieval json lists).

`get_config(lang)`: 'en' (default), 'ja', 'zh' or 'all' (training languages).
"""
from cclm_jax.train import finetune

LANGUAGES = ("en", "ja", "zh")


def get_config(arg: str = ""):
    lang = arg or "en"
    if lang not in LANGUAGES + ("all",):
        raise ValueError(f"configs/finetune/mscoco.py: argument must be one of {LANGUAGES + ('all',)}, got {lang!r}")
    config = finetune.default_finetune_config("retrieval")
    config.name = "mscoco"
    config.train.epochs = 10
    config.eval.update(batch_size=96, k_test=256)
    config.data.update(max_tokens=40, max_words=40, image_root="", train_files=(),
                       test_files={code: "" for code in LANGUAGES}, languages=LANGUAGES,
                       train_language=lang)
    return finetune.apply_protocol(config, "all_languages" if lang == "all" else "zero_shot")
