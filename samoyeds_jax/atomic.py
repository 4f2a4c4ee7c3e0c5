"""Atomic replacement of a whole directory (Hugging Face exports and converted models).

``replace_directory(directory, markers=..., what=...)`` yields a fresh sibling directory
``.{name}.tmp-*``; the caller writes every file there (``write_file`` and ``fsync_file`` make
each one durable). When the block ends without an exception the sibling directory is fsync'd
and takes the place of ``directory``: on Linux one ``renameat2(RENAME_EXCHANGE)`` swaps the two,
so ``directory`` holds the old version or the new one, complete, at every instant; elsewhere (or
on a file system without the exchange) the old directory is first renamed aside to
``.{name}.old-*``, then the new one is renamed into place (an error in between renames the old
one back). A crash between those two renames leaves both complete copies under their sibling
names and ``directory`` itself absent. The old copy is deleted last. A crash while writing can
leave a ``.{name}.tmp-*`` sibling behind; it is never read, and the next replacement of the same
directory deletes it before it writes (so two writers of one directory at the same time are not
supported: the later one deletes the earlier one's staging directory, which then fails). Old
copies left by a crash (``.{name}.old-*``) are deleted once a new version is in place. When the
block raises, the sibling is deleted and ``directory`` is untouched.

Only an absent or empty ``directory``, or one holding one of the ``markers`` files (a previous
version of the same kind), is replaced: anything else raises ValueError before a byte is
written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator

__all__ = ["check_target", "exchange", "fsync_dir", "fsync_file", "replace_directory",
           "replace_file", "write_json",
           "write_file"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def fsync_dir(path: str) -> None:
    """Make a directory's entries (created, renamed files) durable; POSIX only."""
    if os.name != "posix":  # directories cannot be opened for fsync elsewhere
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    """Make a file written by other code (e.g. a library's ``save_file``) durable."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def check_path(path, what: str) -> str:
    """``path`` as a str; TypeError/ValueError naming ``what`` for None, a number, ''."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{what} must be a path, got ''")
    return path


def replace_file(path: str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` whole: into a temporary sibling (fsync'd), then renamed over
    ``path``, which holds the old content or the new at every instant. The parent directory is
    created if missing; a failure removes the temporary file and leaves ``path`` as it was."""
    path = check_path(path, "the file to write")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write the file {path}: it is a directory (expected a "
                                "file path)")
    directory = os.path.dirname(os.path.abspath(path))
    _make_parents(directory, path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _make_parents(directory: str, path: str) -> None:
    """``os.makedirs(directory)``; NotADirectoryError naming the file that stands in the way of
    writing ``path`` (``directory`` or one of its parents)."""
    try:
        os.makedirs(directory, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = directory
        while not os.path.exists(blocker) and os.path.dirname(blocker) != blocker:
            blocker = os.path.dirname(blocker)
        if os.path.isdir(blocker):
            raise
        raise NotADirectoryError(f"cannot write {path}: {blocker} is a file, not a "
                                 "directory") from None


def write_json(path: str, obj, *, allow_nan: bool = True) -> None:
    """``obj`` as indented JSON at ``path``, written whole (``replace_file``)."""
    replace_file(path, json.dumps(obj, indent=1, allow_nan=allow_nan) + "\n")


def exchange(a: str, b: str) -> bool:
    """Swap paths ``a`` and ``b`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the platform or file system cannot; raises OSError for other errors.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28)
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint)
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def _sibling(target: str, kind: str) -> str:
    """A fresh hidden path next to ``target``: ``.{name}.{kind}-{random}``."""
    parent, name = os.path.split(target)
    return os.path.join(parent, f".{name}.{kind}-{secrets.token_hex(6)}")


def _leftovers(target: str, kind: str) -> list[str]:
    """The ``_sibling(target, kind)`` paths that exist (left by a crashed replacement)."""
    parent, name = os.path.split(target)
    prefix = f".{name}.{kind}-"
    try:
        entries = os.listdir(parent)
    except FileNotFoundError:
        return []
    return [os.path.join(parent, e) for e in entries if e.startswith(prefix)
            and len(e) == len(prefix) + 12 and all(c in "0123456789abcdef" for c in e[-12:])]


def _remove(paths: list[str]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def check_target(directory: str, markers: tuple[str, ...], what: str) -> str:
    """The absolute path ``replace_directory`` would write, after refusing anything but an
    absent or empty directory or one holding one of the ``markers`` files (a ``what``)."""
    directory = check_path(directory, f"the {what} directory")
    target = os.path.realpath(directory)  # a symlink keeps pointing at the new version
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise ValueError(f"{directory!r} exists and is not a directory; refusing to replace it")
        if os.listdir(target) and not any(os.path.isfile(os.path.join(target, m))
                                          for m in markers):
            raise ValueError(f"{directory!r} is a non-empty directory without "
                             f"{' or '.join(markers)}: it does not look like a {what}; refusing "
                             "to replace it")
    return target


def _swap_in(staged: str, target: str) -> None:
    """Put the complete directory ``staged`` at ``target``, then delete the old one (if any)."""
    parent = os.path.dirname(target)
    if not os.path.exists(target):
        os.rename(staged, target)
        fsync_dir(parent)
        return
    if exchange(staged, target):
        old = staged  # the exchange left the old version at the staging path
    else:
        old = _sibling(target, "old")
        os.rename(target, old)
        try:
            os.rename(staged, target)
        except BaseException as err:
            try:
                os.rename(old, target)
            except OSError:
                err.add_note(f"the previous version of {target} is at {old}")
            raise
    try:
        fsync_dir(parent)
    finally:  # the new version is in place: the old copy goes even if the fsync failed
        try:
            shutil.rmtree(old)
        except OSError as err:  # only the old copy lingers
            warnings.warn(f"saved {target}, but could not delete the previous copy at {old}: "
                          f"{err}", stacklevel=5)


@contextlib.contextmanager
def replace_directory(directory: str, *, markers: tuple[str, ...], what: str) -> Iterator[str]:
    """Yield a fresh staging directory; on a clean exit it atomically replaces ``directory``
    (created with its parents if missing). See the module doc."""
    target = check_target(directory, markers, what)
    _make_parents(os.path.dirname(target), directory)
    _remove(_leftovers(target, "tmp"))  # partial writes of crashed runs: never read
    staged = _sibling(target, "tmp")
    os.mkdir(staged)
    try:
        yield staged
        fsync_dir(staged)
        stale = _leftovers(target, "old")  # complete old copies a crash left aside
        _swap_in(staged, target)
        _remove(stale)
    finally:
        # After a failure: the partial new version; after an exchange: already deleted.
        shutil.rmtree(staged, ignore_errors=True)
