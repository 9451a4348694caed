import pytest

from llmb.errors import UserError
from llmb.story.corpus import find_files, load_corpus, strip_gutenberg


def test_oz_books_are_read_clean(repo_data):
    corpus = load_corpus([repo_data / "books" / "oz"])
    names = [b.name for b in corpus.books]
    assert names == sorted(names) and len(names) == 7  # book order kept
    for book in corpus.books:
        assert "\r" not in book.text  # CRLF and CR became LF
        assert "PROJECT GUTENBERG" not in book.text.upper()  # header, licence and trailers gone
        assert len(book.text) > 150_000
    land = corpus.books[1]  # CRLF file with the full Gutenberg header and licence
    assert land.text.lstrip().startswith("The Marvelous")
    assert "riches of content" in land.text[-300:]
    wizard = corpus.books[0]
    assert "\u201c" in wizard.text and "\u2019" in wizard.text  # curly quotes survive decoding


def test_split_covers_every_book_and_is_deterministic(repo_data):
    corpus = load_corpus([repo_data / "books" / "oz"])
    train, val = corpus.split(0.1)
    assert corpus.split(0.1) == (train, val)
    for book in corpus.books:
        tail = book.text[-200:]
        assert tail in val and tail not in train
        assert book.text[:200] in train
    total = sum(len(b.text) for b in corpus.books)
    assert abs(len(val) - 0.1 * total) < 0.01 * total


def test_files_and_folders_mix(tmp_path, repo_data):
    (tmp_path / "b.txt").write_text("second book\n")
    (tmp_path / "a.txt").write_text("first book\n")
    (tmp_path / "notes.md").write_text("not a book")
    single = repo_data / "tinyshakespeare.txt"
    files = find_files([tmp_path, single])
    assert [f.name for f in files] == ["a.txt", "b.txt", "tinyshakespeare.txt"]


def test_cp1252_falls_back_with_a_warning(tmp_path):
    (tmp_path / "old.txt").write_bytes("caf\u00e9 \u201cquoted\u201d\r\nline two\r".encode("cp1252"))
    corpus = load_corpus(tmp_path / "old.txt")
    assert corpus.books[0].text == "caf\u00e9 \u201cquoted\u201d\nline two\n"
    assert corpus.warnings == ["old.txt is not UTF-8; decoded it as cp1252"]


def test_gutenberg_markers():
    text = "licence\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nStory.\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlegal"
    assert strip_gutenberg(text) == "Story.\n"
    assert strip_gutenberg("No markers here.") == "No markers here.\n"


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "has no .txt files"),
    (lambda d: (d / "x.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00") and d / "x.txt", "binary"),
    (lambda d: (d / "blank.txt").write_text("\n\n  \n") and d / "blank.txt", "no text"),
])
def test_bad_input_is_one_clear_error(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        load_corpus([make(tmp_path)])


def test_a_hugging_face_data_set_is_a_book_in_the_order_given(tmp_path, repo_data, monkeypatch):
    """`owner/name` (no such local folder) and `hf:owner/name` load through datasets.load_dataset: the train split's
    text column is the book. The Hub itself is out of reach in the tests, so load_dataset answers with a real
    DatasetDict of the shipped Shakespeare, as karpathy/tiny_shakespeare is laid out (one row per split)."""
    import datasets

    text = (repo_data / "tinyshakespeare.txt").read_text()
    asked = []

    def load_dataset(name):
        asked.append(name)
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": [text[:50_000]]}),
                                     "test": datasets.Dataset.from_dict({"text": ["not read"]})})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr("llmb.hub.hub_reachable", lambda: True)
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    (tmp_path / "mine.txt").write_text("my own book\n")
    corpus = load_corpus(["hf:karpathy/tiny_shakespeare", "mine.txt", "karpathy/tiny_shakespeare"])
    assert asked == ["karpathy/tiny_shakespeare"] * 2
    assert [b.name for b in corpus.books] == ["karpathy/tiny_shakespeare", "mine.txt", "karpathy/tiny_shakespeare"]
    assert corpus.books[0].text.startswith("First Citizen:") and "not read" not in corpus.text


@pytest.mark.parametrize("source, message", [
    ("hf:../etc", "not a Hugging Face data set name"),
    ("hf:books", "a local path here"),  # load_dataset would read the local folder
    ("nobody-here/no-such-books", "the Hugging Face hub cannot be reached"),  # offline in the tests: said at once
])
def test_a_data_set_that_cannot_load_is_one_clear_error(tmp_path, monkeypatch, source, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("a book\n")
    with pytest.raises(UserError, match=message):
        load_corpus([source])
