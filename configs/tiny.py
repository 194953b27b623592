"""Small configs on the built-in demo data, for tests and for debugging the full program on a CPU.

`get_config()` / `get_config('N')`: the golden fixture's model sizes (every structural knob of CCLM,
widths shrunk: 224-px Swin with 4 stages, 12 text layers = 6 text + 6 fusion), N training steps.
`get_config('micro')` / `get_config('micro,N')`: the same program with a 64-px, 2-stage Swin and 4 text
layers (2 + 2), which compiles in a fraction of the time (the integration tests use it).
`get_config('small')` / `get_config('small,N')`: between tiny and base, for benchmarks (benchmarks/RESULTS.md):
a 96-px, 3-stage Swin (embed 64, window 6) feeding 256-wide text layers (4 text + 2 fusion, 1024 MLP),
captions/sentences of 32 tokens with 6 masks.
Add `4m` (e.g. `get_config('micro,4m')`) for the 4M mixture (parallel_text, image_caption, region, parallel_text)
with region batches of 8 rows from 4 images; give the region json-lines with `--config.data.region.paths`.
"""
from cclm_jax.models.config import tiny_model_config
from cclm_jax.run_config import default_run_config


def get_config(arg: str = ""):
    parts = [p for p in arg.split(",") if p]
    micro, small = "micro" in parts, "small" in parts
    if micro and small:
        raise ValueError("configs/tiny.py: choose one of 'micro' and 'small', got both")
    steps = [int(p) for p in parts if p not in ("micro", "small", "4m")]
    config = default_run_config()
    config.model = tiny_model_config()
    image_res = 224
    if micro:
        image_res = 64
        config.model.vision.update(image_res=64, embed_dim=64, depths=(2, 2), num_heads=(2, 4), window_size=4,
                                   drop_path_rate=0.1)
        config.model.text.update(num_layers=4, fusion_layer=2, max_position_embeddings=64)
    tokens, masks = 16, 4
    if small:
        image_res, tokens, masks = 96, 32, 6
        config.model.vision.update(image_res=96, embed_dim=64, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=6)
        config.model.text.update(hidden_size=256, num_heads=4, intermediate_size=1024, num_layers=6, fusion_layer=4,
                                 max_position_embeddings=64)
        config.model.embed_dim = 128
    config.model.text.update(vocab_size=-1, mask_token_id=-1)  # the demo tokenizer's
    data = config.data
    data.mix = {"parallel_text": 1, "image_caption": 1}
    data.image_caption.update(batch_size=8, image_res=image_res, max_tokens=tokens, max_words=tokens,
                              max_masks=masks)
    data.parallel_text.update(batch_size=8, max_tokens=tokens, max_words=tokens, max_masks=masks)
    data.eval.update(batch_size=8, image_res=image_res, max_tokens=tokens, max_words=tokens)
    data.shuffle_buffer = 256
    if "4m" in parts:
        data.mix = {"parallel_text": 2, "image_caption": 1, "region": 1}
        stride = config.model.vision.patch_size * 2 ** (len(config.model.vision.depths) - 1)
        data.region.update(batch_size=8, max_images=4, image_res=image_res, patch_size=stride, max_tokens=tokens,
                           max_words=tokens, max_masks=masks)
    config.schedule.update(warmup_steps=2, total_steps=50)
    config.train.update(num_steps=steps[0] if steps else 8, log_every=2, checkpoint_every=4)
    config.evals.dev.update(every=-1, k_test=4)
    return config
