"""What Flickr8k retrieval gives without learned visual features: `benchmarks/linear_baseline.py` (linear CCA
between colour-layout image statistics and bag-of-subwords captions) per language, on the split and metrics of
the fine-tuning runs.

    python benchmarks/flickr8k_linear_baseline.py [--data ../shared/data] [--res 32] [--dims 32] [--reg 10]

Captions are split into XLM-R SentencePiece pieces (`--data`/xlmr_spm). The ridge and the number of directions
are fixed in advance, not tuned on the test images. Trained on each language's (image, caption) pairs of the
3,000 training images, tested on the 237 val images: R@1/R@10 as the reference `itm_eval` (chance R@1 =
1/237 = 0.42%, R@10 = 4.2%). A from-scratch model that lands at these numbers has learned colour and layout
statistics and nothing more; benchmarks/RESULTS.md ("Fine-tuning") compares the tiny CCLM runs against it.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.linear_baseline import cca_retrieval_baseline  # noqa: E402
from cclm_jax.data.finetune_input import load_images  # noqa: E402
from cclm_jax.data.retrieval_sets import read_flickr8k  # noqa: E402
from cclm_jax.data.tokenizer import Tokenizer  # noqa: E402

LANGUAGES = ("en", "de", "fr", "cs", "zh")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--res", type=int, default=32)
    parser.add_argument("--dims", type=int, default=32)
    parser.add_argument("--reg", type=float, default=10.0)
    args = parser.parse_args()
    root = os.path.join(args.data, "flickr8k")
    tokenizer = Tokenizer(os.path.join(args.data, "xlmr_spm", "sentencepiece.bpe.model"))
    train = {lang: read_flickr8k(os.path.join(root, "train.jsonl"), root, lang) for lang in LANGUAGES}
    test = {lang: read_flickr8k(os.path.join(root, "val.jsonl"), root, lang) for lang in LANGUAGES}
    train_images = load_images([(path, False) for path in train["en"].image_paths], args.res)
    test_images = load_images([(path, False) for path in test["en"].image_paths], args.res)
    print(f"| language | R@1 i2t / t2i | R@10 i2t / t2i |  (res {args.res}, dims {args.dims}, reg {args.reg})")
    r1, r10 = [], []
    for lang in LANGUAGES:
        r = cca_retrieval_baseline(train[lang], test[lang], train_images, test_images, tokenizer.encode_batch,
                                   args.dims, args.reg)
        r1.append((r["txt_r1"] + r["img_r1"]) / 2)
        r10.append((r["txt_r10"] + r["img_r10"]) / 2)
        print(f"| {lang} | {r['txt_r1']:.2f} / {r['img_r1']:.2f} | {r['txt_r10']:.2f} / {r['img_r10']:.2f} |")
    print(f"| mean | {np.mean(r1):.2f} | {np.mean(r10):.2f} |")


if __name__ == "__main__":
    main()
