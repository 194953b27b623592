"""The golden fixture's model sizes (every structural knob of CCLM, widths shrunk) on the demo data.

Used by tests and for debugging the full training program on a CPU: 224-px Swin with 4 stages, 12 text
layers (6 text + 6 fusion). `get_config('N')` sets N training steps.
"""
from cclm_jax.models.config import tiny_model_config
from cclm_jax.run_config import default_run_config


def get_config(arg: str = ""):
    config = default_run_config()
    config.model = tiny_model_config()
    data = config.data
    data.mix = {"parallel_text": 1, "image_caption": 1}
    config.model.text.update(vocab_size=-1, mask_token_id=-1)  # the demo tokenizer's
    data.image_caption.update(batch_size=8, image_res=224)
    data.parallel_text.update(batch_size=8, max_tokens=32, max_words=32, max_masks=8)
    data.eval.update(batch_size=8, image_res=224)
    data.shuffle_buffer = 256
    config.schedule.update(warmup_steps=2, total_steps=50)
    config.train.update(num_steps=int(arg) if arg else 8, log_every=2, checkpoint_every=4, eval_every=-1,
                        eval_k_test=4)
    return config
