"""Corpus intake: a folder of books (or files, or several of both, or a Hugging Face data set) becomes clean text.

Each book is decoded (UTF-8, else cp1252/latin-1 with a warning), its line endings made
LF, and its Project Gutenberg header and licence cut off where the markers are present.
The validation split is the last `val_fraction` of every book, so it covers all of them.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from llmb.errors import UserError

START_MARKER = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
END_MARKER = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
END_LINE = re.compile(r"^End of (the )?Project Gutenberg.*$", re.MULTILINE | re.IGNORECASE)


@dataclass
class Book:
    name: str
    text: str
    encoding: str


@dataclass
class Corpus:
    books: list

    def split(self, val_fraction=0.1):
        """(train_text, val_text): the first and last parts of every book, books joined in order."""
        train, val = [], []
        for book in self.books:
            cut = int(len(book.text) * (1 - val_fraction))
            train.append(book.text[:cut])
            val.append(book.text[cut:])
        return "\n\n".join(train), "\n\n".join(val)

    @property
    def text(self):
        return "\n\n".join(b.text for b in self.books)

    @property
    def warnings(self):
        return [f"{b.name} is not UTF-8; decoded it as {b.encoding}" for b in self.books if b.encoding != "utf-8"]

    def report(self):
        """One line per book and a total, for the terminal."""
        lines = [f"  {b.name}: {len(b.text):,} chars ({b.encoding})" for b in self.books]
        total = sum(len(b.text) for b in self.books)
        lines.append(f"  total: {len(self.books)} book(s), {total:,} chars")
        return "\n".join(lines)


def strip_gutenberg(text):
    """Keep what lies between the Project Gutenberg START and END markers (when present)."""
    start = START_MARKER.search(text)
    if start:
        text = text[start.end():]
    for marker in (END_MARKER, END_LINE):
        end = marker.search(text)
        if end:
            text = text[:end.start()]
    return text.strip("\n") + "\n"


def decode(data):
    """UTF-8 if it is UTF-8, else cp1252 (Windows), else latin-1 (never fails)."""
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        pass
    for encoding in ("cp1252", "latin-1"):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        return text, encoding


def read_book(path):
    data = path.read_bytes()
    if b"\x00" in data:
        raise UserError(f"{path} looks like a binary file (it contains NUL bytes); pass plain text files")
    text, encoding = decode(data)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = strip_gutenberg(text)
    if not text.strip():
        raise UserError(f"{path} has no text in it")
    return Book(path.name, text, encoding)


def find_files(paths):
    """Files as given (but .jsonl chats); folders expand to the *.txt files inside (sorted, so book 1..7 keep
    order)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise UserError("no data given; pass --data with a text file or a folder of .txt books")
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.txt") if f.is_file())
            if not found:
                raise UserError(f"{p} has no .txt files; put your books there as plain text files")
            files.extend(found)
        elif p.suffix.lower() == ".jsonl" and p.is_file():  # a story model on chat JSON is a mistake
            raise UserError(f"{p} is a .jsonl file of chats, for an adapter (llmb train-assistant); a story model "
                            "learns from plain-text books (rename it to .txt to train on its text anyway)")
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p} does not exist; check the path given to --data")
    return files


def hub_book(name):
    """A Hugging Face data set as one book: the train split's text column, rows joined by newlines."""
    from llmb.hub import load_hub_dataset

    rows = [row for _, row in load_hub_dataset(name).get("train", [])]
    column = "text" if rows and "text" in rows[0] else next((k for k, v in (rows or [{}])[0].items()
                                                              if isinstance(v, str)), None)
    if column is None:
        raise UserError(f"the Hugging Face data set {name} has no train split with a text column")
    text = "\n".join(str(row[column]) for row in rows if row.get(column))
    if not text.strip():
        raise UserError(f"the Hugging Face data set {name} has no text in its {column!r} column")
    return Book(name, text.replace("\r\n", "\n") + "\n", "utf-8")


def load_corpus(paths):
    """Books from files and folders (see find_files) and Hugging Face data sets (`owner/name` or `hf:owner/name`),
    in the order given."""
    from llmb.hub import hub_dataset_id

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths or [])
    books = []
    for path in paths or find_files(paths):  # find_files says what to do when nothing is given
        name = hub_dataset_id(path)
        books += [hub_book(name)] if name else [read_book(f) for f in find_files([path])]
    return Corpus(books)
