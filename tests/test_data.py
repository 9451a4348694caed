"""The shipped data and the README: a clone with nothing beside it has everything the docs name."""

import hashlib
import re
import shlex
import subprocess

import pytest

from tests.conftest import DATA, REPO

DOCS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]


def tracked_files():
    """What a fresh clone holds: git's tracked files (and the untracked ones not ignored, being added)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return set(out.splitlines())


def readme_table_rows():
    """(path under data/, bytes, sha256) of every file data/README.md lists."""
    rows = re.findall(r"^\| `([^`]+)` \|(?: [^|]+ \|)? ([\d,]+) \| `([0-9a-f]{64})` \|$",
                      (DATA / "README.md").read_text(encoding="utf-8"), re.MULTILINE)
    return [(path, int(size.replace(",", "")), digest) for path, size, digest in rows]


def test_every_shipped_data_file_is_listed_with_its_size_and_checksum():
    rows = readme_table_rows()
    listed = {path for path, _, _ in rows}
    shipped = {p.relative_to(DATA).as_posix() for p in DATA.rglob("*") if p.is_file() and p.name != "README.md"}
    assert listed == shipped, f"listed but missing: {listed - shipped}; shipped but not listed: {shipped - listed}"
    for path, size, digest in rows:
        data = (DATA / path).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, digest), f"{path} is not the file listed"


def test_the_messy_corpus_stays_messy_in_git():
    """Line endings are part of the test data (one book has CRLF): git must not normalise them."""
    assert b"\r\n" in (DATA / "books" / "oz" / "02_the_marvelous_land_of_oz.txt").read_bytes()
    attr = subprocess.run(["git", "check-attr", "text", "data/books/oz/02_the_marvelous_land_of_oz.txt"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout
    assert attr.strip().endswith("text: unset")


def commands(markdown):
    """The shell commands of a markdown file's ```bash blocks (continuation lines joined, comments dropped)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def named_paths(command):
    """The repository paths a command names: its words that start with a top-level folder of the repository."""
    tops = ("data/", "checkpoints/", "training/", "benchmarks/", "scripts/", "docs/", "tests/")
    words = shlex.split(command)
    return [w for w in words if w.startswith(tops) or w in ("app.py",)]


def made_by_docs():
    """The folders the docs' commands make (--out), and the small assistant that the set-up imports."""
    made = {"checkpoints/smollm2-135m-instruct"}
    for doc in DOCS:
        for command in commands((REPO / doc).read_text(encoding="utf-8")):
            words = shlex.split(command)
            made |= {words[i + 1].rstrip("/") for i, w in enumerate(words[:-1]) if w == "--out"}
    return made


@pytest.mark.parametrize("doc", DOCS)
def test_every_path_a_doc_command_reads_is_in_a_fresh_clone(doc):
    """A command may name a folder that a command of the docs makes (--out); every other path it names must
    exist in a fresh clone."""
    files, made = tracked_files(), made_by_docs()
    for command in commands((REPO / doc).read_text(encoding="utf-8")):
        for path in named_paths(command):
            path = path.rstrip("/")
            if path in made or any(path.startswith(m + "/") for m in made):
                continue
            assert path in files or any(f.startswith(path + "/") for f in files), \
                f"{doc}: `{command}` names {path}, which a fresh clone does not have"


def test_nothing_the_tests_ci_app_or_docs_use_reads_outside_the_repository():
    """`../shared` is the developers' scratch copy of the data: a clone, a Space and CI never have it."""
    offenders = []
    for name in tracked_files():
        if name.startswith(("benchmarks/", "data/")) or name == "tests/test_data.py" or \
                not name.endswith((".py", ".md", ".sh", ".toml", ".txt", ".cfg")) and name != ".ci/run":
            continue
        text = (REPO / name).read_text(encoding="utf-8", errors="replace")
        if "../shared" in text or '"shared" / "data"' in text or "LLMB_SHARED_DATA" in text:
            offenders.append(name)
    assert not offenders, f"these read or name ../shared: {offenders}"
