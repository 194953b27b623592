"""MaRVL through NLVR2, the reference's `NLVR.yaml`: fine-tune the two-image model (fusion layers duplicated,
cross-attention key/value shared within each pair) on English NLVR2, test MaRVL id/sw/ta/tr/zh (and NLVR2 test
as 'en'); lr 3e-5 (2x for `cls_head`), 10 epochs.

The spec's table gives no max_tokens for NLVR; 40 (the caption tasks' value) is used.
`get_config(protocol)`: 'zero_shot' (default), 'translate_test', 'few_shot' (`marvl-<lang>_train<shots>`),
'all_languages'. NLVR2 training data: ALBEF/CCLM json lists (`data.iglue.read_nlvr_json`) in `data.train_files`.
"""
from cclm_jax import tasks
from cclm_jax.evaluation.metrics import IGLUE_LANGUAGES


def get_config(arg: str = ""):
    config = tasks.default_finetune_config("marvl")
    config.train.epochs = 10
    config.eval.update(batch_size=80)
    config.data.update(max_tokens=40, max_words=40, iglue_task="marvl", iglue_root="", image_root="",
                       nlvr_image_root="", train_files=(), languages=IGLUE_LANGUAGES["marvl"], shots="10x2")
    return tasks.apply_protocol(config, arg or "zero_shot")
