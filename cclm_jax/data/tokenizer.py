"""XLM-R SentencePiece tokenizer with fairseq ids.

Id layout (the one fairseq and HF ``XLMRobertaTokenizer`` use): ``<s>`` = 0, ``<pad>`` = 1,
``</s>`` = 2, ``<unk>`` = 3, SentencePiece piece ``i >= 3`` -> ``i + 1``, ``<mask>`` = last id.
With the XLM-R model (250,000 pieces) ``vocab_size`` = 250,002 and ``mask_id`` = 250,001.
The SentencePiece model must reserve pieces 0, 1, 2 for ``<unk>``, ``<s>``, ``</s>`` (the XLM-R
layout, and what ``Tokenizer.train`` produces).

    tok = Tokenizer("../shared/data/xlmr_spm/sentencepiece.bpe.model")
    tok.encode("Hello world!")                      # [35378, 8999, 38]
    tok.encode_with_specials("Hello world!", 40)    # [0, 35378, 8999, 38, 2]
"""
import hashlib
import os
import pathlib
from typing import Iterable, Sequence

import sentencepiece as spm

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_SPM_UNK, _SPM_BOS, _SPM_EOS = 0, 1, 2


class Tokenizer:
    """SentencePiece model behind fairseq ids (see the module docstring)."""

    bos_id = BOS_ID
    pad_id = PAD_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    def __init__(self, model_path, key: str = "tokenizer"):
        """`model_path`: the SentencePiece `.model` file; `key`: what errors name it by (e.g. the config key).

        Raises FileNotFoundError (no such file) or ValueError (not a SentencePiece model, or not the XLM-R
        piece layout), each one line starting with `key` and naming the file."""
        path = pathlib.Path(os.path.expanduser(str(model_path)))
        if not path.is_file():
            raise FileNotFoundError(f"{key}: SentencePiece model {str(path)!r} does not exist")
        self.model_path = path
        self._model_bytes = path.read_bytes()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        except RuntimeError as e:  # sentencepiece's parse error names no file
            raise ValueError(f"{key}: {str(path)!r} is not a SentencePiece model (RuntimeError: "
                             f"{str(e).strip()})") from e
        expected = {_SPM_UNK: "<unk>", _SPM_BOS: "<s>", _SPM_EOS: "</s>"}
        found = {i: self._sp.id_to_piece(i) for i in expected}
        if found != expected:
            raise ValueError(
                f"{key}: {str(path)!r} must reserve pieces 0, 1, 2 for <unk>, <s>, </s> "
                f"(the XLM-R layout); found {found}")
        self.vocab_size = self._sp.get_piece_size() + 2
        self.mask_id = self.vocab_size - 1

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of the SHA-256 of the model file (names cached, tokenised data)."""
        return hashlib.sha256(self._model_bytes).hexdigest()[:16]

    def _to_fairseq(self, spm_ids):
        return [UNK_ID if i == _SPM_UNK else i + 1 for i in spm_ids]

    def encode(self, text: str) -> list:
        """Text -> fairseq ids without special tokens."""
        return self._to_fairseq(self._sp.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list:
        """Several texts at once (one C++ call) -> list of id lists without special tokens."""
        return [self._to_fairseq(ids) for ids in self._sp.encode(list(texts))]

    def encode_with_specials(self, text: str, max_tokens: int) -> list:
        """``<s> ids </s>`` truncated to ``max_tokens`` ids (``</s>`` always kept)."""
        return with_specials(self.encode(text), max_tokens)

    def decode(self, ids: Iterable[int]) -> str:
        """Fairseq ids -> text; special ids are dropped, ``<unk>`` is kept as ``<unk>``."""
        pieces = []
        for i in ids:
            i = int(i)
            if i in (BOS_ID, PAD_ID, EOS_ID) or i == self.mask_id:
                continue
            pieces.append(_SPM_UNK if i == UNK_ID else i - 1)
        return self._sp.decode(pieces)

    @classmethod
    def train(cls, texts: Iterable[str], model_prefix, vocab_size: int = 1000,
              model_type: str = "bpe") -> "Tokenizer":
        """Train a small SentencePiece model on ``texts`` with the XLM-R piece layout.

        Writes ``{model_prefix}.model`` (and ``.vocab``). ``vocab_size`` is an upper bound: a
        small corpus gets fewer pieces. ``bpe`` suits small, repetitive corpora (``unigram``
        prunes them to near-characters). Deterministic for a given text sequence.
        """
        prefix = pathlib.Path(os.path.expanduser(str(model_prefix)))
        prefix.parent.mkdir(parents=True, exist_ok=True)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)), model_prefix=str(prefix), vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0, hard_vocab_limit=False,
            unk_id=_SPM_UNK, bos_id=_SPM_BOS, eos_id=_SPM_EOS, pad_id=-1,
            shuffle_input_sentence=False, num_threads=1, minloglevel=2)
        return cls(f"{prefix}.model")


def with_specials(ids: Sequence[int], max_tokens: int) -> list:
    """``[<s>] + ids`` cut to ``max_tokens - 1`` ids, then ``</s>`` (the reference layout)."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 to hold <s> and </s>, got {max_tokens}")
    return ([BOS_ID] + list(ids))[: max_tokens - 1] + [EOS_ID]
