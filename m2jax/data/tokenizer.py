"""bert-base-uncased WordPiece tokenizer (HF `tokenizers`), matching HF `BertTokenizer` ids.

The vocab ships in `m2jax/data/assets/bert-base-uncased-vocab.txt` (30522 tokens). Models pad
their embedding table to 30528; ids >= 30522 never come out of this tokenizer.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np

ASSETS = pathlib.Path(__file__).parent / "assets"
VOCAB_FILE = ASSETS / "bert-base-uncased-vocab.txt"
# BERT's WordPiece maps any whitespace-delimited word longer than this to [UNK].
_MAX_CHARS_PER_WORD = 100
# English prose averages ~4.5 characters per WordPiece token: a first piece this long usually
# holds the tokens a row keeps; `encode_rows` tokenises further pieces when it does not.
_CHARS_PER_TOKEN = 5


class BertWordPiece:
    """Uncased BERT WordPiece: BERT normaliser (clean, CJK spacing, lowercase, strip accents),
    BERT pre-tokeniser, WordPiece with '##' continuations, [CLS] a [SEP] (b [SEP]) templates.

    `encode(text, pair=None)` / `encode_batch(texts_or_pairs)` return HF `tokenizers.Encoding`
    objects (`.ids`, `.type_ids`, `.attention_mask`); when `max_seq_len` is set they are
    truncated ('longest_first' for pairs, as HF `truncation=True`) and padded to exactly
    `max_seq_len`, like HF `tokenizer(..., padding='max_length', truncation=True)`.
    """

    def __init__(self, vocab_file: str | pathlib.Path = VOCAB_FILE, max_seq_len: int | None = None):
        import tokenizers  # imported here so that `import m2jax.data` stays light
        from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

        self.vocab_file = pathlib.Path(vocab_file)
        vocab = _read_vocab(self.vocab_file)
        self.vocab = vocab
        self.vocab_size = len(vocab)
        self.pad_id, self.unk_id = vocab["[PAD]"], vocab["[UNK]"]
        self.cls_id, self.sep_id, self.mask_id = vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"]
        # HF's `all_special_ids`: what the reference's MLM collator never selects for prediction.
        self.special_ids = (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)
        self.max_seq_len = max_seq_len

        tok = tokenizers.Tokenizer(models.WordPiece(
            vocab, unk_token="[UNK]", max_input_chars_per_word=_MAX_CHARS_PER_WORD))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", self.cls_id), ("[SEP]", self.sep_id)])
        self._raw = tok  # no truncation/padding: used for packing and long-document encoding
        if max_seq_len is not None:
            if max_seq_len < 2:
                raise ValueError(f"max_seq_len must be >= 2 to hold [CLS] and [SEP], got {max_seq_len}")
            padded = tokenizers.Tokenizer.from_str(tok.to_str())
            padded.enable_truncation(max_seq_len, strategy="longest_first")
            padded.enable_padding(length=max_seq_len, pad_id=self.pad_id, pad_token="[PAD]")
            self._tok = padded
        else:
            self._tok = tok

    def encode(self, text: str, pair: str | None = None):
        """One `tokenizers.Encoding`; `.ids` equals HF BertTokenizer's `input_ids`."""
        return self._tok.encode(text, pair)

    def encode_batch(self, texts: Sequence[str] | Sequence[tuple[str, str]]):
        """Encodes many texts (or (a, b) pairs) in parallel in Rust threads."""
        return self._tok.encode_batch(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def word_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text without [CLS]/[SEP], not truncated (for packing)."""
        return [e.ids for e in self._encode_fast(list(texts))]

    def encode_rows(self, texts: Sequence[str], max_seq_len: int) -> np.ndarray:
        """Single texts as `[CLS] ids[:L-2] [SEP] [PAD]...`: int32 (N, max_seq_len).

        Equal to HF `tokenizer(texts, truncation=True, padding='max_length')` but cheap on long
        documents: texts are tokenised in pieces cut at whitespace (in parallel), piece after
        piece, only until a row holds its L-2 tokens.
        """
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2 to hold [CLS] and [SEP], got {max_seq_len}")
        body = max_seq_len - 2
        ids: list[list[int]] = [[] for _ in texts]
        pos = [0] * len(texts)
        todo = list(range(len(texts)))
        chars = _CHARS_PER_TOKEN * body + 32
        while todo:
            pieces = [_next_piece(texts[i], pos[i], chars) for i in todo]
            for i, piece, enc in zip(todo, pieces, self._encode_fast(pieces)):
                ids[i].extend(enc.ids)
                pos[i] += len(piece)
            todo = [i for i in todo if len(ids[i]) < body and pos[i] < len(texts[i])]
            chars *= 2
        out = np.full((len(texts), max_seq_len), self.pad_id, dtype=np.int32)
        for row, row_ids in zip(out, ids):
            self._fill_row(row, row_ids[:body])
        return out

    def encode_row(self, text: str, max_seq_len: int) -> np.ndarray:
        """One text as `[CLS] ids[:L-2] [SEP] [PAD]...`: int32 (max_seq_len,); see `encode_rows`."""
        return self.encode_rows([text], max_seq_len)[0]

    def _encode_fast(self, texts: list[str]):
        # encode_batch_fast (tokenizers >= 0.21) skips character offsets we never use.
        fast = getattr(self._raw, "encode_batch_fast", self._raw.encode_batch)
        return fast(texts, add_special_tokens=False)

    def _fill_row(self, row: np.ndarray, ids: Sequence[int]) -> None:
        row[0] = self.cls_id
        row[1:len(ids) + 1] = ids
        row[len(ids) + 1] = self.sep_id


def _next_piece(text: str, start: int, limit: int) -> str:
    """text[start:cut]: at most `limit` characters ending just before whitespace (or the rest).

    BERT normalises character by character and splits words at whitespace, so tokenising a
    text piece by piece at such cuts gives exactly the tokens of the whole text.
    """
    stop = start + limit
    if stop >= len(text):
        return text[start:]
    cut = max(text.rfind(" ", start, stop), text.rfind("\n", start, stop))
    return text[start:] if cut <= start else text[start:cut]


def _read_vocab(path: pathlib.Path) -> dict[str, int]:
    """One token per line, id = line number (the BERT vocab.txt format)."""
    if not path.is_file():
        raise FileNotFoundError(f"WordPiece vocab file not found: {path}")
    vocab: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f):
            token = line.rstrip("\n")
            if token in vocab:
                raise ValueError(f"{path}:{n + 1}: duplicate token {token!r} (first on line {vocab[token] + 1})")
            vocab[token] = n
    for needed in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
        if needed not in vocab:
            raise ValueError(f"{path}: vocab lacks the special token {needed}")
    return vocab


def load_tokenizer(max_seq_len: int | None = None, vocab_file: str | pathlib.Path | None = None) -> BertWordPiece:
    """The bert-base-uncased WordPiece tokenizer shipped with m2jax (vocab_size 30522).

    With `max_seq_len`, `encode`/`encode_batch` truncate and pad to exactly that length.
    """
    return BertWordPiece(VOCAB_FILE if vocab_file is None else vocab_file, max_seq_len)
