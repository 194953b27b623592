"""WIT retrieval (IGLUE), the reference's `WIT.yaml`: fine-tune on English WIT, test ar/bg/da/el/en/et/id/ja/ko/
tr/vi; lr 3e-5, 5 epochs, max 80 tokens, k_test 128, evaluation from epoch 3.

`get_config(protocol)`: 'zero_shot' (default), 'translate_test', 'all_languages' (IGLUE has no WIT few-shot
files). Images are the WIT test images (`data.image_root`) or embedded in the annotation lines.
"""
from cclm_jax import tasks
from cclm_jax.evaluation.metrics import IGLUE_LANGUAGES


def get_config(arg: str = ""):
    protocol = arg or "zero_shot"
    if protocol == "few_shot":
        raise ValueError("configs/finetune/wit.py: IGLUE has no few-shot WIT files")
    config = tasks.default_finetune_config("retrieval")
    config.name = "wit"
    config.train.epochs = 5
    config.eval.update(batch_size=96, k_test=128, start_epoch=3)
    config.data.update(
        max_tokens=80, max_words=80, iglue_task="wit", iglue_root="", image_root="",
        train_file="wit/annotations/train_en.jsonl",  # relative to iglue_root
        languages=("en", *IGLUE_LANGUAGES["wit"]))
    return tasks.apply_protocol(config, protocol)
