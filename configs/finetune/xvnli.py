"""XVNLI (IGLUE), the reference's `XVNLI.yaml`: 3-way entailment on (image, hypothesis); fine-tune on
`XVNLI/annotations/en/train.jsonl`, test ar/en/es/fr/ru; lr 3e-5 (2x for `cls_head`), 10 epochs, max 80 tokens.

`get_config(protocol)`: 'zero_shot' (default), 'translate_test', 'few_shot' (`train_<shots>` files),
'all_languages'. Images: Flickr30K (`data.image_root/<Flikr30kID>.jpg`).
"""
from cclm_jax import tasks
from cclm_jax.evaluation.metrics import IGLUE_LANGUAGES


def get_config(arg: str = ""):
    config = tasks.default_finetune_config("xvnli")
    config.train.epochs = 10
    config.eval.update(batch_size=96)
    config.data.update(max_tokens=80, max_words=80, iglue_task="xvnli", iglue_root="", image_root="",
                       languages=("en", *IGLUE_LANGUAGES["xvnli"]), shots=48)
    return tasks.apply_protocol(config, arg or "zero_shot")
