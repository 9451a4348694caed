"""Tokenizers for the story model: characters (default), a byte-level BPE or a WordPiece trained
on the training split, or any pretrained tokenizer (hub id or local folder).

All share one small interface: encode, decode, vocab_size, unknown, count_unknown, lossless,
save, and `load_tokenizer(dir)` reads back whichever was saved with a checkpoint.

Lossless means decode(encode(text)) == text. Characters and byte-level BPE are lossless, so their
bits per character compare fairly; WordPiece drops whitespace (newlines, runs of spaces), so its
bits per character leave those characters out and are labelled lossy.
"""

import json
from pathlib import Path

from llmb.errors import UserError

CHAR_FILE = "char_vocab.json"
SUBWORD_FILE = "tokenizer.json"
FILES = (CHAR_FILE, SUBWORD_FILE)


class CharTokenizer:
    """One token per character; the vocabulary is the set of characters in the corpus."""

    kind = "char"
    lossless = True

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text):
        return cls(sorted(set(text)))

    @property
    def vocab_size(self):
        return len(self.chars)

    def unknown(self, text):
        """The characters of text this vocabulary lacks, in order of first appearance."""
        return list(dict.fromkeys(c for c in text if c not in self.stoi))

    def count_unknown(self, text):
        """How many characters of text cannot be encoded."""
        return sum(c not in self.stoi for c in text)

    def encode(self, text, drop_unknown=False):
        if drop_unknown:
            return [self.stoi[c] for c in text if c in self.stoi]
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise UserError(f"character {e.args[0]!r} is not in the model's vocabulary") from None

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def save(self, directory):
        """Write char_vocab.json (checkpoints save into a staging folder, see llmb.story.checkpoint)."""
        data = json.dumps({"kind": "char", "chars": self.chars}, ensure_ascii=False)
        (Path(directory) / CHAR_FILE).write_text(data, encoding="utf-8")


PROBE = "Line one.\n\n  Two\tthree   spaces, caf\u00e9 \u201cquoted\u201d.\n"  # whitespace a lossy tokenizer drops


class SubwordTokenizer:
    """A `tokenizers.Tokenizer`: byte-level BPE or WordPiece trained here, or a pretrained one (BERT, Phi-2)."""

    kind = "subword"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.unk_id = None
        model = json.loads(tokenizer.to_str())["model"]
        if model.get("unk_token") is not None:
            self.unk_id = tokenizer.token_to_id(model["unk_token"])
        self.lossless = self.decode(self.encode(PROBE)) == PROBE

    @classmethod
    def train_bpe(cls, text, vocab_size=2000):
        """Byte-level BPE (GPT-2 style) trained on text: every byte has a token, so nothing is unknown
        and decoding gives the text back exactly."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(_chunks(text), trainer=trainer)
        return cls(tok)

    @classmethod
    def train_wordpiece(cls, text, vocab_size=2000):
        """BERT-style WordPiece trained on the corpus (cased, so no information is thrown away)."""
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"], show_progress=False)
        tok.train_from_iterator(_chunks(text), trainer=trainer)
        return cls(tok)

    @classmethod
    def from_pretrained(cls, name):
        """A hub id (needs internet the first time) or a local folder with tokenizer files."""
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(name)
        except Exception as e:  # transformers raises OSError/ValueError/HF errors for a bad id or path
            raise UserError(
                f"could not load tokenizer {name!r} ({type(e).__name__}). Pass 'char', 'wordpiece', "
                "a local folder with tokenizer.json, or a hub id while online."
            ) from None
        if getattr(hf, "backend_tokenizer", None) is None:
            raise UserError(f"tokenizer {name!r} has no fast (tokenizers) version; pick another")
        tok = hf.backend_tokenizer
        tok.no_padding()
        tok.no_truncation()
        return cls(tok)

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def _unknown_spans(self, text):
        if self.unk_id is None:
            return []
        enc = self.tok.encode(text, add_special_tokens=False)
        return [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == self.unk_id]

    def unknown(self, text):
        return list(dict.fromkeys(self._unknown_spans(text)))

    def count_unknown(self, text):
        """How many characters of text only an unknown token ([UNK]) stands for."""
        return sum(map(len, self._unknown_spans(text)))

    def encode(self, text, drop_unknown=False):
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if drop_unknown and self.unk_id is not None:
            ids = [i for i in ids if i != self.unk_id]
        return ids

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save(self, directory):
        """Write tokenizer.json (checkpoints save into a staging folder, see llmb.story.checkpoint)."""
        self.tok.save(str(Path(directory) / SUBWORD_FILE))


def _chunks(text, lines_per_chunk=1000):
    lines = text.split("\n")
    return ("\n".join(lines[i:i + lines_per_chunk]) for i in range(0, len(lines), lines_per_chunk))


def build_tokenizer(name, text, vocab_size=2000):
    """`char`, `bpe` or `wordpiece` (trained on text) or a pretrained tokenizer's hub id / local path."""
    if name == "char":
        return CharTokenizer.train(text)
    if name == "bpe":
        return SubwordTokenizer.train_bpe(text, vocab_size)
    if name == "wordpiece":
        return SubwordTokenizer.train_wordpiece(text, vocab_size)
    return SubwordTokenizer.from_pretrained(name)


def load_tokenizer(directory):
    """The tokenizer saved in a checkpoint folder; a damaged file is a UserError naming it."""
    directory = Path(directory)
    if (directory / CHAR_FILE).exists():
        return load_char_vocab(directory / CHAR_FILE)
    if (directory / SUBWORD_FILE).exists():
        from tokenizers import Tokenizer

        try:
            return SubwordTokenizer(Tokenizer.from_file(str(directory / SUBWORD_FILE)))
        except Exception as e:  # tokenizers raises its own Exception for a bad file
            raise UserError(f"{directory / SUBWORD_FILE} is not a valid tokenizer ({str(e)[:100]}); "
                            "restore the file or train again") from None
    raise UserError(f"no tokenizer in {directory} (expected {CHAR_FILE} or {SUBWORD_FILE})")


def load_char_vocab(file):
    """char_vocab.json: {"kind": "char", "chars": [distinct single characters]}."""
    try:
        chars = json.loads(Path(file).read_text(encoding="utf-8"))["chars"]
        ok = isinstance(chars, list) and chars and all(isinstance(c, str) and len(c) == 1 for c in chars)
    except (ValueError, KeyError, TypeError):  # not JSON, not text, no "chars"
        ok = False
    if not ok or len(set(chars)) != len(chars):
        raise UserError(f"{file} is not a valid character vocabulary (expected {{\"chars\": [one character "
                        "each, no repeats]}); restore the file or train again")
    return CharTokenizer(chars)
