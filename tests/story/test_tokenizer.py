import pytest

from llmb.story.corpus import load_corpus
from llmb.story.tokenizer import CharTokenizer, SubwordTokenizer, build_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def oz_text(repo_data):
    return load_corpus(repo_data / "books" / "oz" / "01_the_wonderful_wizard_of_oz.txt").text


def test_char_round_trip_and_save(oz_text, tmp_path):
    tok = CharTokenizer.train(oz_text)
    assert tok.vocab_size == len(set(oz_text))
    assert tok.decode(tok.encode(oz_text)) == oz_text
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.chars == tok.chars and again.encode("Dorothy") == tok.encode("Dorothy")


def test_unknown_characters_are_dropped_and_named(oz_text):
    tok = CharTokenizer.train(oz_text)
    prompt = "Dorothy \u2603 met \u00df"
    assert tok.unknown(prompt) == ["\u2603", "\u00df"]
    assert tok.decode(tok.encode(prompt, drop_unknown=True)) == "Dorothy  met "


def test_wordpiece_trained_on_corpus(oz_text, tmp_path):
    tok = build_tokenizer("wordpiece", oz_text, vocab_size=500)
    assert 100 < tok.vocab_size <= 500
    line = "The Scarecrow and the Tin Woodman walked on."
    ids = tok.encode(line)
    assert len(ids) < len(line)  # subwords are longer than characters
    assert tok.decode(ids) == line  # WordPiece normalises whitespace only; this line has none to lose
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode(line) == ids


@pytest.mark.slow  # imports transformers
def test_pretrained_tokenizer_from_local_folder(repo_data, tmp_path):
    tok = SubwordTokenizer.from_pretrained(str(repo_data / "phi-2-tokenizer"))
    assert tok.encode("Hello world") == [15496, 995]
    text = "Dorothy lived in the midst of the great Kansas prairies.\n  Indented line."
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 50295
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode(text) == tok.encode(text)


@pytest.mark.slow  # imports transformers
def test_unknown_pretrained_name_is_a_clear_error():
    from llmb.errors import UserError

    with pytest.raises(UserError, match="could not load tokenizer"):
        build_tokenizer("no-such-org/no-such-tokenizer", "text")


def test_byte_level_bpe_is_lossless_and_wordpiece_is_labelled_lossy(oz_text, tmp_path):
    bpe = build_tokenizer("bpe", oz_text, vocab_size=500)
    assert bpe.vocab_size == 500 and bpe.lossless
    sample = oz_text[:5000] + "\n\n\t  caf\u00e9 \u2603 \U0001f600\n"  # whitespace runs, unseen characters
    ids = bpe.encode(sample)
    assert bpe.decode(ids) == sample and bpe.count_unknown(sample) == 0  # every byte has a token
    assert len(ids) < 0.6 * len(sample)
    bpe.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(sample) == ids and again.lossless

    wordpiece = build_tokenizer("wordpiece", oz_text, vocab_size=500)
    assert not wordpiece.lossless
    assert wordpiece.decode(wordpiece.encode("one\n\ntwo")) != "one\n\ntwo"  # the newlines are gone
    assert wordpiece.count_unknown("Dorothy \u2603\u2603 ran") == 2
    assert CharTokenizer.train(oz_text).count_unknown("Dorothy \u2603\u2603 ran") == 2
