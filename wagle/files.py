"""Atomic writes: a file or folder appears complete under its final name or not at all.

Everything is written beside its destination under a temporary name, flushed to disk, given the
permissions a plain ``open()``/``mkdir()`` would have given it (``tempfile`` creates 0600 files and 0700
folders, unreadable to the rest of a group on a shared cluster), then renamed into place.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable

from wagle.errors import UserError


def usual_mode(directory: bool = False) -> int:
    """``0o666`` (files) or ``0o777`` (folders) minus the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``.

    The parent folder is created if needed; on any error the temporary file is removed and an existing
    ``path`` is left untouched. An ``OSError`` names ``path``, never the temporary file."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    blocking = _existing_ancestor(folder)
    if not os.path.isdir(blocking):
        raise NotADirectoryError(errno.ENOTDIR, f"cannot write: {blocking} is a file, not a folder", path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise _naming(exc, path) from exc
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        os.chmod(tmp, usual_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename in (tmp, None):
            raise _naming(exc, path) from exc
        raise


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _naming(exc: OSError, path: str) -> OSError:
    """The same kind of ``OSError`` with ``path`` as its file name."""
    return type(exc)(exc.errno, f"cannot write: {exc.strerror or exc}", path)


def check_writable(path: str | os.PathLike, option: str) -> None:
    """Raise :class:`~wagle.errors.UserError` naming ``option`` unless :func:`atomic_write` can create
    the file ``path``: it is not a folder, its nearest existing ancestor is a folder (no regular file
    in the way) and a file can be created there. Checked before any long work starts."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise UserError(f"{option}: {path} is a directory; give a file name")
    ancestor = _existing_ancestor(os.path.dirname(path))
    if not os.path.isdir(ancestor):
        raise UserError(f"{option}: cannot create {path}: {ancestor} is a file, not a folder")
    try:  # os.access ignores read-only file systems and is always true for root: try it
        fd, probe = tempfile.mkstemp(prefix=".wagle-write-check-", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{option}: cannot write {path}: {exc.strerror or exc} in {ancestor}") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8, ``\\n`` line ends on every platform) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)

    atomic_write(path, write)


def temporary_folder(parent: str | os.PathLike, prefix: str) -> str:
    """A new empty folder in ``parent`` with the usual permissions, to be filled, then renamed."""
    folder = tempfile.mkdtemp(prefix=prefix, dir=os.fspath(parent))
    os.chmod(folder, usual_mode(directory=True))
    return folder


def replace_folder(tmp: str, path: str) -> None:
    """Rename the complete folder ``tmp`` to ``path``; an existing ``path`` is replaced only after the
    new folder is in place (and restored if the swap fails).

    Files and sub-folders inside ``tmp`` get the usual permissions first (some writers, e.g.
    ``save_pretrained``, create their files 0600)."""
    file_mode, folder_mode = usual_mode(), usual_mode(directory=True)
    for root, folders, files in os.walk(tmp):
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)
        for name in folders:
            os.chmod(os.path.join(root, name), folder_mode)
    if not os.path.exists(path):
        os.replace(tmp, path)
        return
    parent, name = os.path.split(path)
    old = tempfile.mkdtemp(prefix=f".old-{name}-", dir=parent)
    os.rmdir(old)  # os.replace needs the target folder name to be free
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
