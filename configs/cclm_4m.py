"""CCLM pre-training in the paper's 4M setting: the 3M recipe (`configs/cclm_base.py`) plus region grounding.

Image–caption data grows to CC3M + SBU + COCO + VG (5,004,332 images with captions in six languages, 4,888
iterations of 1024 per epoch) and region batches join from COCO objects, VG objects and VG regions (X-VLM's
"object and region annotations" with CCLM's translations; `cclm_jax/data/region.py` has the record format and
`python -m cclm_jax.data.region_convert` makes records from COCO / Visual Genome annotation files). Each
reference iteration is a parallel-text update then a region *or* an image–caption update (a coin in the
reference, a fixed alternation here: `data.mix` = parallel_text, image_caption, region, parallel_text per cycle of
two iterations); region batches carry 128 rows from 48 images per GPU (x 8 GPUs), and their loss is
itc + itm + mlm + bbox + giou.

  cclm-jax train --config configs/cclm_4m.py --workdir gs://bucket/run4m \
    --config.data.image_caption.paths="('/data/4m/images-000.jsonl', ...)" \
    --config.data.region.paths="('/data/4m/coco_object.jsonl', '/data/4m/vg_region.jsonl')" \
    --config.data.parallel_text.paths="('/data/wikimatrix/part-000.jsonl', ...)" \
    --config.data.tokenizer=/data/xlm-roberta-large/sentencepiece.bpe.model \
    --config.init.xlmr_dir=/data/xlm-roberta-large --config.init.swin_path=/data/swin_base_patch4_window7_224_22k.pth

Batch sizes (`data.*.batch_size`, `data.region.max_images`) are per host: on P hosts divide them by P.
"""
import os

from cclm_jax.run_config import load_config_file

ITERATIONS_PER_EPOCH = 4888  # ceil(5,004,332 / 1024)
EPOCHS = 30


def get_config(arg: str = ""):
    if arg:
        raise ValueError(f"configs/cclm_4m.py: unknown argument {arg!r} (expected none)")
    config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cclm_base.py"))
    data = config.data
    data.mix = {"parallel_text": 2, "image_caption": 1, "region": 1}
    data.region.update(kind="jsonl", paths=(), image_field="binary", image_root="", image_res=224, patch_size=32,
                       batch_size=1024, max_images=384, max_regions=5, min_perc_in_image=0.5, careful_hflip=True,
                       randaugment=True, max_tokens=40, max_words=40, max_masks=12, mask_prob=0.4)
    config.schedule.update(warmup_steps=2500, total_steps=ITERATIONS_PER_EPOCH * EPOCHS)
    config.train.update(num_steps=2 * ITERATIONS_PER_EPOCH * EPOCHS)
    return config
