"""Multilingual MSCOCO retrieval, the reference's `Retrieval_coco_<lang>_ft.yaml`: lr 3e-5, 10 epochs, max 40
tokens, k_test 256; test on `en.1k_test`, `ja.1k_test`, `zh.test` (CCLM retrieval json lists).

`get_config(lang)`: 'en' (default), 'ja', 'zh' or 'all' (training languages).
"""
from cclm_jax import tasks

LANGUAGES = ("en", "ja", "zh")


def get_config(arg: str = ""):
    return tasks.json_retrieval_config("mscoco", LANGUAGES, arg, k_test=256)
