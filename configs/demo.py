"""The README's main job: a small CCLM trained on the built-in multilingual demo data on a CPU.

Procedural images (shapes, colours, sizes) with captions in English, German, French and Spanish, and
parallel sentences from the same grammar (generated on first use; no download). The model keeps every
structural knob of CCLM (Swin with shifted windows and patch merging, text layers then fusion layers with
cross-attention, ITC/ITM/MLM and TTC/TTM/MLM) at widths a 2-core CPU trains in minutes. At the end the run
reports dev retrieval R@1 (image->text, text->image, and cross-lingual text->text).

`get_config('N')`: N updates (800). `get_config('4m')` / `get_config('4m,N')`: the 4M mixture (each reference
iteration a parallel-text update, then an image–caption or a region update: `data.mix` {parallel_text: 2,
image_caption: 1, region: 1}) with the demo's region pictures (2-3 shapes each, `data.region.kind = 'demo'`),
N updates (1600: as many image–caption updates as the plain demo), and at the end grounding accuracy on the
held-out region pictures per language (`evals.grounding`) besides dev retrieval.
"""
from cclm_jax.run_config import default_run_config


def get_config(arg: str = ""):
    config = default_run_config()
    m = config.model
    m.vision.update(image_res=64, patch_size=4, embed_dim=32, depths=(2, 2, 2), num_heads=(1, 2, 4),
                    window_size=4, drop_path_rate=0.0)
    m.text.update(hidden_size=128, num_heads=4, intermediate_size=256, num_layers=4, fusion_layer=2,
                  max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0)
    m.embed_dim = 64
    data = config.data
    m.text.update(vocab_size=-1, mask_token_id=-1)  # the demo tokenizer's
    data.mix = {"parallel_text": 1, "image_caption": 1}
    data.image_caption.update(batch_size=32, image_res=64, randaugment=False, crop_scale=(0.8, 1.0),
                              max_tokens=8, max_words=8, max_masks=3)
    data.parallel_text.update(batch_size=32, max_tokens=8, max_words=8, max_masks=3)
    data.eval.update(batch_size=50, image_res=64, max_tokens=8, max_words=8)
    data.shuffle_buffer = 2048
    config.optimizer.update(lr=5e-4, lr_mults=())  # one learning rate for every parameter
    parts = [p for p in arg.split(",") if p]
    four_m = "4m" in parts
    steps = [p for p in parts if p != "4m"]
    if len(steps) > 1 or (steps and not steps[0].isdigit()):
        raise ValueError(f"configs/demo.py: the argument is 'N', '4m' or '4m,N' (N updates), got {arg!r}")
    num_steps = int(steps[0]) if steps else (1600 if four_m else 800)
    if four_m:
        data.mix = {"parallel_text": 2, "image_caption": 1, "region": 1}
        stride = m.vision.patch_size * 2 ** (len(m.vision.depths) - 1)  # 16: a 4x4 grid of output tokens
        data.region.update(kind="demo", batch_size=32, max_images=16, image_res=64, patch_size=stride,
                           randaugment=False, max_tokens=8, max_words=8, max_masks=3)
        # Swin as in CCLM has no absolute position embedding: in a run this short the box head then learns sizes
        # but not places (benchmarks/RESULTS.md); the official Swin's `ape` option gives the tokens their place.
        m.vision.ape = True
        config.evals.grounding = {"kind": "grounding", "every": 0}
    total = max(num_steps // 2, 1)  # one schedule step per reference iteration (2 updates)
    config.schedule.update(warmup_steps=max(1, min(50, total // 10)), total_steps=total)
    config.train.update(num_steps=num_steps, log_every=50, checkpoint_every=200, dropout=False)
    config.evals.dev.update(every=0, k_test=8)
    config.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    return config
