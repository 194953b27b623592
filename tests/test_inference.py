"""`cclm_jax.inference` and `cclm-jax index` / `cclm-jax search` on a trained micro model.

The module fixture fine-tunes a micro CCLM for retrieval (the one trainer, in process) on 16 generated pictures
of four colours captioned "a <colour> picture", then indexes four fresh pictures (other noise) and searches them:
the matching picture must come first, both ways, and the HTML page must hold every result inline.
"""
from __future__ import annotations

import html.parser
import json
import pathlib
import sys

import numpy as np
import pytest
from absl import flags
from PIL import Image

from cclm_jax import inference, main
from cclm_jax.data.tokenizer import Tokenizer
from cclm_jax.run_config import load_config_file
from cclm_jax.train import finetuning

REPO = pathlib.Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _picture(path: pathlib.Path, colour: tuple, rng: np.random.Generator, size: int = 40) -> None:
    """A noisy picture of one colour with a grey square somewhere (so pictures of a colour differ)."""
    pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (size, size, 3)), 0, 255)
    y, x = rng.integers(0, size - 12, 2)
    pixels[y:y + 12, x:x + 12] = 128
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, micro_params):
    """(run directory, tokenizer path, folder of 4 fresh pictures, captions file)."""
    root = tmp_path_factory.mktemp("inference")
    rng = np.random.default_rng(0)
    train = []
    for colour, rgb in COLOURS.items():
        for k in range(4):
            _picture(root / "train" / f"{colour}{k}.png", rgb, rng)
            train.append({"image": f"train/{colour}{k}.png", "caption": f"a {colour} picture"})
    (root / "train.json").write_text(json.dumps(train))
    (root / "test.json").write_text(json.dumps(
        [{"image": f"train/{c}0.png", "caption": [f"a {c} picture"]} for c in COLOURS]))
    captions = [f"a {c} picture" for c in COLOURS]
    tokenizer = Tokenizer.train(captions * 8, root / "spm", vocab_size=40)
    for colour, rgb in COLOURS.items():
        _picture(root / "photos" / f"{colour}.png", rgb, np.random.default_rng(hash(colour) % 1000))
    (root / "captions.txt").write_text("\n".join(captions) + "\n")

    config = load_config_file("configs/finetune/multi30k.py", "en")
    model = micro_params[0].copy_and_resolve_references()
    model.text.update(vocab_size=tokenizer.vocab_size, mask_token_id=tokenizer.mask_id, max_position_embeddings=16)
    config.model = model
    config.init.from_scratch = True
    config.data.update(image_root=str(root), train_files=(str(root / "train.json"),), languages=("en",),
                       tokenizer=str(tokenizer.model_path), max_tokens=8, max_words=8, augment=False)
    config.data.test_files = {"en": str(root / "test.json")}
    config.optimizer.update(lr=2e-3, clip_grad_norm=None)
    # 8 fake devices: 2 examples per shard for the in-shard hard negatives; one step per epoch.
    config.train.update(epochs=60, batch_size=16, log_every=60, checkpoint_every=1000, warmup_fraction=0.05)
    config.eval.update(batch_size=8, k_test=4, pairs_per_block=16, start_epoch=60)
    workdir = root / "run"
    finetuning.finetune(config, str(workdir))
    return workdir, tokenizer.model_path, root / "photos", root / "captions.txt"


@pytest.fixture()
def cli(monkeypatch):
    """cli(*args) -> exit status of `cclm-jax ARGS` (flags reset afterwards)."""
    monkeypatch.chdir(REPO)

    def call(*args) -> int:
        monkeypatch.setattr(sys, "argv", ["cclm-jax", *args])
        with pytest.raises(SystemExit) as exit_info:
            main.run()
        return exit_info.value.code or 0

    yield call
    flags.FLAGS.unparse_flags()


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: pathlib.Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_python_api_ranks_the_matching_colour(trained):
    workdir, _, photos, _ = trained
    model = inference.load(workdir)
    files = [photos / f"{c}.png" for c in COLOURS]
    captions = [f"a {c} picture" for c in COLOURS]
    image_feats, text_feats = inference.embed_images(model, files), inference.embed_texts(model, captions)
    assert image_feats.shape == text_feats.shape == (4, model.config.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(image_feats, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.argmax(image_feats @ text_feats.T, axis=1), np.arange(4))
    itc = inference.score(model, files, captions, rerank=False)
    np.testing.assert_allclose(itc, image_feats @ text_feats.T, atol=1e-5)
    itm = inference.score(model, files, captions, rerank=True, k=2)
    assert (itm == -100).sum() == 8  # 2 of 4 texts re-ranked per image (and vice versa: the same top-2 here)
    np.testing.assert_array_equal(np.argmax(itm, axis=1), np.arange(4))


def test_index_then_search_both_ways(trained, cli, tmp_path, capsys):
    workdir, _, photos, captions = trained
    index = tmp_path / "index"
    assert cli("index", f"--workdir={workdir}", f"--images={photos}", f"--out={index}", f"--texts={captions}",
               "--batch_size=3") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"images": 4, "texts": 4, "new": 4}
    assert len(list(index.glob("part-*.npz"))) == 2  # batches of 3: resumable parts
    # A rerun finds everything indexed: nothing is embedded again.
    assert cli("index", f"--workdir={workdir}", f"--images={photos}", f"--out={index}") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["new"] == 0

    page = tmp_path / "red.html"
    assert cli("search", f"--index={index}", "--query=a red picture", "--top=3", f"--html={page}") == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert [pathlib.Path(line[-1]).name for line in lines][:1] == ["red.png"] and len(lines) == 3
    parsed = _parse(page)
    assert len(parsed.images) == 3 and all(i["src"].startswith("data:image/png;base64,") for i in parsed.images)
    assert parsed.images[0]["alt"] == "red.png" and "a red picture" in "".join(parsed.text)

    page = tmp_path / "blue.html"
    assert cli("search", f"--index={index}", f"--query={photos / 'blue.png'}", "--image", "--top=4",
               f"--html={page}") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("a blue picture"), out
    parsed = _parse(page)
    assert len(parsed.images) == 1 and parsed.images[0]["src"].startswith("data:image/png;base64,")
    assert sum("picture" in t for t in parsed.text) == 4


def test_search_errors_are_one_line(trained, cli, tmp_path, capsys):
    workdir, _, photos, _ = trained
    assert cli("search", f"--index={tmp_path}", "--query=x") == 2
    assert "is not an index" in capsys.readouterr().err
    index = tmp_path / "index"
    assert cli("index", f"--workdir={workdir}", f"--images={photos}", f"--out={index}") == 0
    capsys.readouterr()
    assert cli("search", f"--index={index}", f"--query={photos / 'red.png'}", "--image") == 2
    assert "the index has no texts" in capsys.readouterr().err
    assert cli("index", f"--workdir={workdir}", f"--images={tmp_path / 'none'}", f"--out={index}") == 2
    assert "is not a directory" in capsys.readouterr().err
