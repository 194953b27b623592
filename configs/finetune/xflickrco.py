"""xFlickr&CO retrieval (IGLUE), the reference's `xFlickrCO.yaml`: fine-tune on Flickr30K English, test
de/en/es/id/ja/ru/tr/zh; lr 3e-5, 10 epochs, max 80 tokens, k_test 128, evaluation from epoch 7.

`get_config(protocol)`: 'zero_shot' (default), 'translate_test' (the machine-translated English test files),
'few_shot' (continue from the English-fine-tuned checkpoint on `xFlickrCO/annotations/<lang>/train_<shots>`),
'all_languages'. Set the data locations on the command line:

  --config.init.checkpoint=cclm_3m_epoch_29.th --config.data.iglue_root=/data/iglue/datasets \
  --config.data.image_root.flickr30k=/data/flickr30k/images --config.data.image_root.coco=/data/coco/val2014 \
  --config.data.tokenizer=/data/xlm-roberta-large/sentencepiece.bpe.model
"""
from cclm_jax import tasks
from cclm_jax.evaluation.metrics import IGLUE_LANGUAGES


def get_config(arg: str = ""):
    config = tasks.default_finetune_config("retrieval")
    config.name = "xflickrco"
    config.train.epochs = 10
    config.eval.update(batch_size=96, k_test=128, start_epoch=7)
    config.data.update(
        max_tokens=80, max_words=80, iglue_task="xflickrco", iglue_root="",
        image_root={"flickr30k": "", "coco": ""},
        train_file="flickr30k/annotations/train_ann.jsonl",  # relative to iglue_root (English Flickr30K)
        languages=("en", *IGLUE_LANGUAGES["xflickrco"]), shots=100)
    return tasks.apply_protocol(config, arg or "zero_shot")
