"""CCLM pre-training as in the paper (the 3M setting): Swin-B 224 + 12 layers of XLM-R-large.

Image–caption json-lines (CC3M with UC2 translations) + parallel sentences (WikiMatrix), batch 1024 + 1024
per iteration, AdamW lr 1e-4 (2e-4 for new parameters), warmup 2500, linear decay over 30 epochs
(2,772 iterations each), one optimizer update per batch kind. Give the data by path:

  cclm-jax train --config configs/cclm_base.py --workdir gs://bucket/run \
    --config.data.image_caption.paths="('/data/cc3m/part-000.jsonl', ...)" \
    --config.data.parallel_text.paths="('/data/wikimatrix/part-000.jsonl', ...)" \
    --config.data.tokenizer=/data/xlm-roberta-large/sentencepiece.bpe.model \
    --config.init.xlmr_dir=/data/xlm-roberta-large --config.init.swin_path=/data/swin_base_patch4_window7_224_22k.pth

Batch sizes in `data.*.batch_size` are per host: on P hosts set them to 1024 / P.
`get_config('runlocal')` shrinks the same config (tiny widths, demo data, a few steps) for a laptop.
"""
from cclm_jax.models.config import tiny_model_config
from cclm_jax.run_config import default_run_config

ITERATIONS_PER_EPOCH = 2772  # ceil(2,838,361 / 1024)
EPOCHS = 30


def get_config(arg: str = ""):
    config = default_run_config()
    data = config.data
    data.mix = {"parallel_text": 1, "image_caption": 1}  # the reference's order within an iteration
    data.tokenizer = "xlm-roberta-large/sentencepiece.bpe.model"
    data.image_caption.update(kind="jsonl", paths=[], image_field="binary", image_root="", batch_size=1024,
                              image_res=224, max_tokens=40, max_words=40, max_masks=12, mask_prob=0.4)
    data.parallel_text.update(kind="jsonl", paths=[], batch_size=1024, max_tokens=64, max_words=64,
                              max_masks=20, mask_prob=0.4)
    data.eval.update(image_res=224)
    config.schedule.update(warmup_steps=2500, total_steps=ITERATIONS_PER_EPOCH * EPOCHS)
    config.train.update(num_steps=2 * ITERATIONS_PER_EPOCH * EPOCHS, log_every=100, checkpoint_every=2000,
                        keep_every=50_000)
    config.evals.dev.every = -1  # no dev set at scale; set data.eval and evals.dev.every to evaluate
    config.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    if arg == "runlocal":
        config.model = tiny_model_config()
        data.tokenizer = "demo"
        data.image_caption.update(kind="demo", batch_size=8)
        data.parallel_text.update(kind="demo", batch_size=8)
        data.eval.update(kind="demo", batch_size=16)
        config.model.text.update(vocab_size=-1, mask_token_id=-1)  # the demo tokenizer's
        config.schedule.update(warmup_steps=2, total_steps=10)
        config.train.update(num_steps=20, log_every=5, checkpoint_every=10)
        config.evals.dev.every = 0
        config.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    elif arg:
        raise ValueError(f"configs/cclm_base.py: unknown argument {arg!r} (expected '' or 'runlocal')")
    return config
