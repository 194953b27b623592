"""Multi30K retrieval, the reference's `Retrieval_multi30k_<lang>_ft.yaml`: lr 3e-5, 10 epochs, max 40 tokens,
k_test 128; test on `test_2016_flickr.{en,de,fr,cs}`.

`get_config(lang)`: train on one language ('en' default: zero-shot cross-lingual for the others; 'de', 'fr',
'cs') or on all four ('all'). Files are the CCLM retrieval json lists (`data.retrieval_sets.read_cclm_retrieval_json`):

  --config.data.train_files="('/data/multi30k/train.en.json',)" --config.data.image_root=/data/flickr30k/images \
  --config.data.test_files.en=/data/multi30k/test_2016_flickr.en.json  (and .de, .fr, .cs)
"""
from cclm_jax import tasks

LANGUAGES = ("en", "de", "fr", "cs")


def get_config(arg: str = ""):
    return tasks.json_retrieval_config("multi30k", LANGUAGES, arg, k_test=128)
