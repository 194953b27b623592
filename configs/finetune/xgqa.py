"""xGQA (IGLUE) by generative answer ranking, the reference's `GQA.yaml`: fine-tune on GQA
(`gqa/annotations/train.json`), test `xGQA/annotations/few_shot/<lang>/test.json` for bn/de/en/id/ko/pt/ru/zh
(the average leaves out en); lr 3e-5 (2x for the answer decoder, [INFERRED] from the reference's
`init_params`), 5 epochs, max 40 tokens; the 128 answers of `trainval_ans2label.json` with the highest
first-token probability are re-ranked by likelihood (`eval.k_test`); evaluation batch 4 per GPU.

`get_config(protocol)`: 'zero_shot' (default), 'few_shot' (`train_<shots>.json`), 'all_languages'.
"""
from cclm_jax import tasks
from cclm_jax.evaluation.metrics import IGLUE_LANGUAGES


def get_config(arg: str = ""):
    protocol = arg or "zero_shot"
    if protocol == "translate_test":
        raise ValueError("configs/finetune/xgqa.py: IGLUE has no translate-test xGQA files")
    config = tasks.default_finetune_config("xgqa")
    config.train.epochs = 5
    config.eval.update(batch_size=32, k_test=128)
    config.data.update(max_tokens=40, max_words=30, test_max_words=50, max_answers=10, answer_tokens=12,
                       iglue_task="xgqa", iglue_root="", image_root="", train_file="gqa/annotations/train.json",
                       answer_list="gqa/annotations/trainval_ans2label.json",
                       languages=("en", *IGLUE_LANGUAGES["xgqa"]), shots=10)
    return tasks.apply_protocol(config, protocol)
