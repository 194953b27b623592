"""Tokenizer: fairseq/XLM-R ids for the real model, and models trained on the fly.

The expected ids below were computed by an independent route -- the HF slow-tokenizer rule
(``encode_as_pieces`` -> ``piece_to_id`` -> +1, piece 0 -> ``<unk>`` = 3) on the raw
SentencePiece processor -- and are checked in as literals; the sentences are read from
``../shared/data`` (never copied here) by file and 0-based line number.
"""
import gzip

import pytest
import sentencepiece as spm

from cclm_jax.data.tokenizer import Tokenizer, with_specials

XLMR_MODEL = "xlmr_spm/sentencepiece.bpe.model"

# (file under ../shared/data, 0-based line, expected fairseq ids without specials)
EXPECTED_IDS = [
    ("multi30k/val.en.gz", 0, [62, 21115, 111, 453, 621, 72367, 214, 235489, 98, 188, 10, 118149]),
    ("multi30k/val.en.gz", 7, [
        62, 27150, 25299, 179493, 10, 66053, 933, 206249, 144291, 7, 10, 178663, 1777, 99, 142,
        23, 277, 214, 163451, 5
    ]),
    ("multi30k/val.en.gz", 100, [893, 114210, 4, 645, 165598, 332, 147505, 7, 10, 225544, 12960, 20662, 118285, 5]),
    ("multi30k/val.en.gz", 513, [6561, 332, 23, 10, 22556, 79, 27853, 136, 22556, 1256, 83, 75169, 10, 69071, 126, 5]),
    ("multi30k/val.de.gz", 0, [12080, 54493, 542, 63804, 19, 218105, 237976, 13, 644, 1918, 21672, 46351]),
    ("multi30k/val.de.gz", 7, [
        2991, 67401, 24250, 13, 491, 2315, 66053, 933, 9, 74257, 10910, 45786, 214, 18, 1918,
        44978, 12126, 167191, 42, 23, 86459, 9026, 142, 152030, 21786, 7, 5
    ]),
    ("multi30k/val.de.gz", 100, [
        2991, 171238, 42, 4, 1659, 73336, 21358, 14912, 642, 36376, 1918, 436, 7260, 29184,
        4834, 4, 31005, 72, 117099, 15148, 5
    ]),
    ("multi30k/val.de.gz", 513, [
        2991, 14912, 491, 45786, 147, 4383, 21763, 13, 165, 45786, 147, 4383, 8904, 15143,
        77516, 644, 2235, 8302, 112684, 13, 5
    ]),
    ("multi30k/val.fr.gz", 0, [992, 37769, 104, 25, 63624, 7, 25534, 660, 115, 552, 1507, 807, 51, 123762]),
    ("multi30k/val.fr.gz", 7, [
        992, 48375, 163638, 6985, 458, 104, 25, 309, 6648, 12631, 224, 66053, 933, 8796, 217,
        773, 1777, 67, 8, 3647, 9, 12126, 2577, 253, 773, 16446, 13, 569, 54410, 5
    ]),
    ("multi30k/val.fr.gz", 100, [
        992, 51512, 151299, 22, 613, 771, 30185, 3193, 858, 720, 773, 501, 191756, 13, 22, 7442,
        96899, 18, 95, 10174, 6, 128042, 5
    ]),
    ("multi30k/val.fr.gz", 513, [992, 51512, 22, 88477, 82, 18414, 18, 86494, 7, 2219, 13, 8, 21, 151522, 3135, 5]),
    ("multi30k/val.cs.gz", 0, [196245, 29861, 1170, 24, 48558, 709, 111735, 34, 24, 3179, 4704, 10526, 4217, 5]),
    ("multi30k/val.cs.gz", 7, [
        3658, 1673, 56194, 3240, 81, 130543, 34, 66053, 933, 229, 5007, 1411, 178663, 17482, 6,
        100131, 6140, 11900, 3089, 19208, 11029, 2024, 5
    ]),
    ("multi30k/val.cs.gz", 100, [
        4612, 5579, 29861, 91, 1932, 3902, 13885, 4976, 4471, 5381, 22491, 319, 2987, 80600,
        2353, 46743, 85, 1701, 5
    ]),
    ("multi30k/val.cs.gz", 513, [
        164000, 81, 193453, 7271, 13581, 10, 193453, 3416, 85788, 186609, 24, 69071, 41680, 5]),
    ("tatoeba/tatoeba.cmn-eng.cmn", 0, [61317, 176249, 2112, 38]),
    ("tatoeba/tatoeba.cmn-eng.cmn", 1, [13129, 4941, 1677, 134753, 274, 30]),
    ("tatoeba/tatoeba.cmn-eng.cmn", 2, [6, 97092, 9811, 17194, 6147, 32]),
    ("tatoeba/tatoeba.cmn-eng.cmn", 250, [6, 144711, 31120, 2122, 2213, 30]),
    ("tatoeba/tatoeba.jpn-eng.jpn", 0, [6, 67207, 84956, 31647, 14956, 54668, 37, 207255, 198128, 1308, 30]),
    ("tatoeba/tatoeba.jpn-eng.jpn", 3, [
        6, 203750, 47181, 327, 41030, 2391, 7794, 1309, 1894, 8417, 2995, 47181, 251, 4402,
        4130, 30
    ]),
    ("tatoeba/tatoeba.jpn-eng.jpn", 99, [6, 5883, 6095, 327, 25076, 128647, 176488, 45412, 10439, 30]),
    ("tatoeba/tatoeba.jpn-eng.jpn", 400, [102167, 43843, 109038, 4940, 71585, 98204]),
    ("tatoeba/tatoeba.rus-eng.rus", 0, [1509, 19458, 1983, 6826, 4, 84, 12703, 6171, 5999, 5]),
    ("tatoeba/tatoeba.rus-eng.rus", 5, [12382, 23294, 529, 93382, 19637, 32]),
    ("tatoeba/tatoeba.rus-eng.rus", 77, [44230, 77, 67008, 4, 414, 135, 15844, 3318, 5]),
    ("tatoeba/tatoeba.rus-eng.rus", 600, [447, 33641, 212, 218034, 222092, 5]),
    ("tatoeba/tatoeba.ara-eng.ara", 0, [4003, 69160, 179, 767, 195019, 27872, 230, 58101, 5]),
    ("tatoeba/tatoeba.ara-eng.ara", 1, [4003, 69160, 179, 92872, 58101, 7012, 5]),
    ("tatoeba/tatoeba.ara-eng.ara", 2, [223671, 35717, 94129, 746, 189579, 5]),
    ("tatoeba/tatoeba.ara-eng.ara", 300, [1327, 9959, 862, 156847, 4832, 38]),
]
MULTILINGUAL_FILES = [
    "multi30k/val.en.gz", "multi30k/val.de.gz", "multi30k/val.fr.gz", "multi30k/val.cs.gz",
    "tatoeba/tatoeba.cmn-eng.cmn", "tatoeba/tatoeba.jpn-eng.jpn", "tatoeba/tatoeba.rus-eng.rus",
    "tatoeba/tatoeba.ara-eng.ara",
]


def _lines(data_dir, relative):
    path = data_dir / relative
    opener = gzip.open if relative.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


@pytest.fixture(scope="module")
def xlmr(shared_data_dir):
    return Tokenizer(shared_data_dir / XLMR_MODEL)


def test_xlmr_special_layout_and_hello_world(xlmr):
    assert (xlmr.bos_id, xlmr.pad_id, xlmr.eos_id, xlmr.unk_id) == (0, 1, 2, 3)
    assert xlmr.vocab_size == 250002
    assert xlmr.mask_id == 250001
    assert xlmr.encode_with_specials("Hello world!", 40) == [0, 35378, 8999, 38, 2]


def test_xlmr_ids_match_checked_in_literals(xlmr, shared_data_dir):
    files = {}
    for relative, line, expected in EXPECTED_IDS:
        if relative not in files:
            files[relative] = _lines(shared_data_dir, relative)
        assert xlmr.encode(files[relative][line]) == expected, (relative, line)


def test_xlmr_ids_match_hf_rule_on_400_sentences(xlmr, shared_data_dir):
    raw = spm.SentencePieceProcessor(model_file=str(shared_data_dir / XLMR_MODEL))

    def hf_ids(text):
        ids = [raw.piece_to_id(piece) for piece in raw.encode_as_pieces(text)]
        return [i + 1 if i else 3 for i in ids]

    texts = [t for relative in MULTILINGUAL_FILES for t in _lines(shared_data_dir, relative)[:50]]
    assert len(texts) == 400
    assert xlmr.encode_batch(texts) == [hf_ids(t) for t in texts]
    assert [xlmr.encode(t) for t in texts[::40]] == [hf_ids(t) for t in texts[::40]]


def test_xlmr_unknown_piece_maps_to_unk(xlmr):
    ids = xlmr.encode("\U0001f9ff\U0001fa90")  # rare symbols fall back to <unk>
    assert 3 in ids
    assert all(i == 3 or i >= 4 for i in ids)


def test_with_specials_truncates_body_and_keeps_eos():
    assert with_specials([10, 11, 12], 10) == [0, 10, 11, 12, 2]
    assert with_specials([10, 11, 12], 4) == [0, 10, 11, 2]
    assert with_specials([], 2) == [0, 2]
    with pytest.raises(ValueError, match="max_tokens must be >= 2"):
        with_specials([5], 1)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    texts = [f"a {c} {s} on the {p}" for c in ("red", "green", "blue") for s in ("circle", "square")
             for p in ("left", "right", "top")] * 20
    return Tokenizer.train(texts, tmp_path_factory.mktemp("spm") / "small", vocab_size=60)


def test_trained_model_has_the_xlmr_layout(small):
    raw = spm.SentencePieceProcessor(model_file=str(small.model_path))
    assert [raw.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert small.vocab_size == raw.get_piece_size() + 2
    assert small.mask_id == small.vocab_size - 1
    text = "a blue square on the top"
    ids = small.encode(text)
    assert ids == [i + 1 for i in raw.encode(text)]
    assert min(ids) >= 4 and max(ids) < small.mask_id
    assert small.decode([0] + ids + [2, 1, 1]) == text


def test_training_is_deterministic(small, tmp_path):
    texts = [f"a {c} {s} on the {p}" for c in ("red", "green", "blue") for s in ("circle", "square")
             for p in ("left", "right", "top")] * 20
    again = Tokenizer.train(texts, tmp_path / "again", vocab_size=60)

    def pieces(tok):
        raw = spm.SentencePieceProcessor(model_file=str(tok.model_path))
        return [(raw.id_to_piece(i), raw.get_score(i)) for i in range(raw.get_piece_size())]

    assert pieces(again) == pieces(small)


def test_missing_or_foreign_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer(tmp_path / "nope.model")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["some text here", "more text there"] * 30),
        model_prefix=str(tmp_path / "foreign"), vocab_size=30, pad_id=0, unk_id=1, bos_id=2,
        eos_id=3, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="must reserve pieces 0, 1, 2"):
        Tokenizer(tmp_path / "foreign.model")


def test_random_bytes_name_the_config_key_and_file(tmp_path):
    import random

    from cclm_jax.data.config import default_data_config
    from cclm_jax.data.pipeline import load_tokenizer

    path = tmp_path / "noise.model"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(ValueError, match=r"^tokenizer: '.*noise\.model' is not a SentencePiece model \(RuntimeError"):
        Tokenizer(path)
    cfg = default_data_config()
    cfg.tokenizer = str(path)
    with pytest.raises(ValueError, match=r"^config\.data\.tokenizer: '.*noise\.model' is not a SentencePiece model"):
        load_tokenizer(cfg)
