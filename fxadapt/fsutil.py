"""Crash-safe writing of output directories.

A checkpoint or export directory is written whole into a temporary directory beside the target
and swapped into place only when every file is complete, so that a crash or an error part-way
leaves whatever was at the target before, whole. Files in the target that the writer does not
own (``keep``) are carried over into the new directory as hard links (or copies) first: nothing
of the user's is lost.

>>> import os, tempfile
>>> target = os.path.join(tempfile.mkdtemp(), "out")
>>> with atomic_directory(target) as tmp:
...     with open(os.path.join(tmp, "a.txt"), "w") as f:
...         _ = f.write("done")
>>> os.listdir(target)
['a.txt']
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

from .errors import CheckpointError

__all__ = ["atomic_directory"]


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, owned: Callable[[str], bool] = lambda name: True,
                     error: type[Exception] = CheckpointError) -> Iterator[str]:
    """Yield a fresh temporary directory beside ``target``; when the block ends without an
    exception, put it at ``target`` in one step, replacing what was there.

    ``owned(name)`` says which entries of an existing ``target`` the new directory replaces
    (default: all); the others are carried over. I/O failures raise ``error`` naming the path
    (``CheckpointError`` by default, with ``path``).
    """
    target = os.path.abspath(os.fspath(target))
    if os.path.islink(target):  # write where the link points: the user's link stays a link
        target = os.path.realpath(target)
    parent = os.path.dirname(target)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise _error(error, f"{target} exists and is not a directory", target)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise _error(error, f"cannot write {target}: {e.strerror or e}", target) from e
    try:
        yield tmp
        if os.path.isdir(target):
            for name in os.listdir(target):
                if not owned(name) and not os.path.lexists(os.path.join(tmp, name)):
                    _carry(os.path.join(target, name), os.path.join(tmp, name))
        _fsync_tree(tmp)
        _swap_into_place(tmp, target)
        _fsync_directory(parent)
    except OSError as e:
        raise _error(error, f"cannot write {target}: {e.strerror or e}", target) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _error(cls: type[Exception], message: str, path: str) -> Exception:
    return cls(message, path=path) if cls is CheckpointError else cls(message)


def _carry(src: str, dst: str) -> None:
    """Bring an entry the writer does not own into the new directory without touching the old."""
    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _fsync_tree(root: str) -> None:
    """Flush the new files to disk before they become visible under the target's name."""
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _fsync_directory(path: str) -> None:
    """Make the rename itself durable (POSIX; elsewhere directories cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_into_place(tmp: str, target: str) -> None:
    """``tmp`` becomes ``target``; the old ``target`` (if any) is removed. On Linux the two
    directories are exchanged in one atomic step (renameat2 RENAME_EXCHANGE); elsewhere the old
    one is renamed aside first, so at no moment is a half-written directory at ``target``."""
    if not os.path.isdir(target):
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old directory
        return
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".old", dir=os.path.dirname(target))
    os.rmdir(aside)
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths (Linux renameat2); False where the system cannot."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # file system or kernel without exchange
        return False
    raise OSError(code, os.strerror(code), b)


def _libc():
    if os.name != "posix":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
