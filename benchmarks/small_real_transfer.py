"""Tatoeba text -> text retrieval for languages that never appear in the Flickr8k captions (configs/small_real.py).

Rows: "e5-small alone" (the converted e5 weights through all 12 layers of our text stack, mean-pooled, the way
e5 embeds: the model before any CCLM training), and every run directory given (the CCLM dual encoder's text
feature: the projected CLS token after the 6 text layers, `inference.embed_texts`). For each language XXX,
`../shared/data/tatoeba/tatoeba.XXX-eng.{XXX,eng}` (up to 1,000 pairs): R@1 of XXX -> eng and eng -> XXX over all
pairs (chance 0.1%), in percent, and their mean.

  python benchmarks/small_real_transfer.py --runs /tmp/sr/en [--languages spa,ita,...] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from cclm_jax import inference
from cclm_jax.data.finetune_input import encode_texts
from cclm_jax.data.tokenizer import Tokenizer
from cclm_jax.models import build_model

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
# Tatoeba languages with no Flickr8k caption (en/de/fr/cs/zh are the caption languages).
LANGUAGES = ("spa", "ita", "por", "rus", "pol", "tur", "ara", "jpn", "hin", "vie", "swh", "fin")


def recall_at_1(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """R@1 (percent) of a_i -> b_i and b_i -> a_i by cosine similarity of L2-normalised rows."""
    sims = a @ b.T
    gold = np.arange(len(a))
    return (float(np.mean(np.argmax(sims, 1) == gold) * 100), float(np.mean(np.argmax(sims, 0) == gold) * 100))


def pairs(lang: str) -> tuple[list[str], list[str]]:
    root = DATA / "tatoeba"
    src = (root / f"tatoeba.{lang}-eng.{lang}").read_text(encoding="utf-8").splitlines()
    eng = (root / f"tatoeba.{lang}-eng.eng").read_text(encoding="utf-8").splitlines()
    return src, eng


def e5_embedder(max_tokens: int = 48):
    """texts -> (N, 384) e5-small sentence embeddings ('query: ' prefix, all 12 layers, mean pooling)."""
    from cclm_jax.interop.convert_real import converted
    from cclm_jax.interop.hf_towers import init_from_hf_towers
    from cclm_jax.run_config import load_config_file

    config = load_config_file(str(REPO / "configs" / "small_real.py"), "").model
    params, _ = init_from_hf_towers(config, None, converted("e5"), jax.random.key(0))
    model = build_model(config)
    tok = Tokenizer(DATA / "xlmr_spm" / "sentencepiece.bpe.model")

    @jax.jit
    def pooled(ids, atts):
        hidden = model.apply({"params": params}, ids, atts, method=lambda m, i, a: m.text_encoder.encode_all(i, a))
        x = (hidden * atts[..., None]).sum(1) / atts.sum(1, keepdims=True)
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    def embed(texts):
        ids, atts = encode_texts(tok, ["query: " + t for t in texts], max_tokens=max_tokens, max_words=max_tokens,
                                 clean=lambda t, _: t)
        return np.concatenate([np.asarray(pooled(ids[s:s + 250], atts[s:s + 250]))
                               for s in range(0, len(ids), 250)])

    return embed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="", help="comma-separated run directories")
    parser.add_argument("--languages", default=",".join(LANGUAGES))
    parser.add_argument("--no-e5", action="store_true", help="skip the e5-alone row")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    languages = [x for x in args.languages.split(",") if x]
    embedders = {} if args.no_e5 else {"e5-small alone (before training)": e5_embedder()}
    for run in [r for r in args.runs.split(",") if r]:
        model = inference.load(run)
        embedders[run] = lambda texts, model=model: inference.embed_texts(model, texts, batch_size=250)
    results = {}
    for name, embed in embedders.items():
        row = {}
        for lang in languages:
            src, eng = pairs(lang)
            row[lang] = recall_at_1(embed(src), embed(eng))
        row["mean"] = float(np.mean([v for lang in languages for v in row[lang]]))
        results[name] = row
        print(f"| {name} | " + " | ".join(f"{row[lg][0]:.1f} / {row[lg][1]:.1f}" for lg in languages)
              + f" | {row['mean']:.1f} |", flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
