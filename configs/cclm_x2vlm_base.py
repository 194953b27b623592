"""CCLM-X2VLM pre-training (X2-VLM's multilingual CCLM recipe): BEiT-v2-B/16 + XLM-R base + a 6-layer cross encoder.

One optimizer update per iteration on the summed losses of an image–caption batch and a parallel-text batch
(`train.mode = 'joint'`, X2-VLM's `mixed_in_batch`), gradient clipping 1.0, AdamW with per-tower learning rates
(cross encoder 4e-5, vision 2e-5, text 8e-5: the `optimizer.lr_mults` table; projections, heads and `temp` x2),
warmup 1000, linear decay over 39 epochs. Start from a released CCLM-X2VLM or X2-VLM file (`init.checkpoint`).
Region batches (X2-VLM's third view) are off by default: a `region` entry in `data.mix` with `data.region.paths` and
`data.region.patch_size=16` (this ViT's patch) adds them to every update (see the README). Give the data by path:

  cclm-jax train --config configs/cclm_x2vlm_base.py --workdir gs://bucket/run \
    --config.data.image_caption.paths="('/data/cc3m/part-000.jsonl', ...)" \
    --config.data.parallel_text.paths="('/data/wikimatrix/part-000.jsonl', ...)" \
    --config.data.tokenizer=/data/xlm-roberta-base/sentencepiece.bpe.model \
    --config.init.checkpoint=/data/cclm_x2vlm_base.th

`get_config('runlocal')` shrinks the same recipe (the golden fixture's widths, demo data, a few steps).
"""
from cclm_jax.models.config import x2vlm_model_config
from cclm_jax.run_config import default_run_config

SIZE = "base"
ITERATIONS_PER_EPOCH = 4888  # ceil(5,004,332 image-text pairs / 1024)
EPOCHS = 39
# Per-tower learning rates on the base lr 4e-5 (cross encoder): vision 2e-5, text 8e-5; the projections, heads and
# `temp` x2 (X2-VLM's new parameters; its cross encoder's cross-attention is not among them).
X2VLM_LR_MULTS = (
    ("vision_encoder/.*", 0.5),
    ("text_encoder/.*", 2.0),
    ("(text_proj|vision_proj|itm_head|bbox_head)/.*", 2.0),
    ("temp", 2.0),
)


def x2vlm_run_config(size: str, arg: str, name: str):
    """The CCLM-X2VLM pre-training run config of `size` ('base' | 'large'); `arg` '' or 'runlocal'."""
    config = default_run_config()
    config.model = x2vlm_model_config(size)
    data = config.data
    data.mix = {"parallel_text": 1, "image_caption": 1}
    data.tokenizer = "xlm-roberta-base/sentencepiece.bpe.model"
    data.image_caption.update(kind="jsonl", paths=[], image_field="binary", image_root="", batch_size=1024,
                              image_res=224, max_tokens=30, max_words=30, max_masks=10, mask_prob=0.4)
    data.parallel_text.update(kind="jsonl", paths=[], batch_size=1024, max_tokens=64, max_words=64,
                              max_masks=16, mask_prob=0.4)
    data.eval.update(image_res=224)
    config.optimizer.update(lr=4e-5, weight_decay=0.01, clip_grad_norm=1.0, lr_mults=X2VLM_LR_MULTS)
    config.schedule.update(warmup_steps=1000, total_steps=ITERATIONS_PER_EPOCH * EPOCHS)
    config.train.update(mode="joint", num_steps=ITERATIONS_PER_EPOCH * EPOCHS, log_every=100,
                        checkpoint_every=2000, keep_every=50_000)
    config.evals.dev.every = -1
    config.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    if arg == "runlocal":
        config.model = x2vlm_model_config("tiny")
        data.tokenizer = "demo"
        data.image_caption.update(kind="demo", batch_size=8)
        data.parallel_text.update(kind="demo", batch_size=8)
        data.eval.update(kind="demo", batch_size=16)
        config.model.text.update(vocab_size=-1, mask_token_id=-1)  # the demo tokenizer's
        config.schedule.update(warmup_steps=2, total_steps=10)
        config.train.update(num_steps=10, log_every=5, checkpoint_every=10)
        config.evals.dev.every = 0
        config.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    elif arg:
        raise ValueError(f"configs/{name}: unknown argument {arg!r} (expected '' or 'runlocal')")
    return config


def get_config(arg: str = ""):
    return x2vlm_run_config(SIZE, arg, "cclm_x2vlm_base.py")
