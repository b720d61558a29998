"""Atomic writes: a file or folder appears complete under its final name or not at all.

Everything is written beside its destination under a temporary name, flushed to disk, given the
permissions a plain ``open()``/``mkdir()`` would have given it (``tempfile`` creates 0600 files and 0700
folders, unreadable to the rest of a group on a shared cluster), then renamed into place, and the
folder holding the new name is flushed too.

Temporary names carry their writer: ``.tmp-<label>-wagle-<pid>-<host>-<random>`` (``.old-...`` for the
previous version of a folder being replaced). A crash (kill -9, power loss) leaves them behind;
:func:`remove_stale_temporaries` removes those whose process is gone, and every writer here calls it
on its folder first.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable

from wagle.errors import UserError

logger = logging.getLogger(__name__)

# <prefix>wagle-<pid>-<host>-<random>: the host has no '-', so the match from the end is unambiguous
_OWNED = re.compile(
    r"^\.(?P<kind>tmp|old)-(?P<label>.*?)-?wagle-(?P<pid>\d+)-(?P<host>[A-Za-z0-9_]+)-[a-z0-9_]+$"
)


def usual_mode(directory: bool = False) -> int:
    """``0o666`` (files) or ``0o777`` (folders) minus the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def owner_tag() -> str:
    """``wagle-<pid>-<host>-``: the part of a temporary name that identifies the process writing it."""
    return f"wagle-{os.getpid()}-{_host()}-"


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: str) -> None:
    """Flush a folder's entries (the renames in it); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the data files themselves were flushed
    finally:
        os.close(fd)


def _process_is_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        return False
    return False


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Remove wagle's temporary files and folders in ``folder`` left by a process that no longer runs.

    Only names wagle's writers create (``.tmp-...wagle-<pid>-<host>-...``, ``.old-...``) are touched,
    and only when ``<host>`` is this machine and process ``<pid>`` is gone (POSIX only; elsewhere
    nothing is removed). A stale ``.old-<name>-...`` (the previous version of a folder, moved aside
    during a replace) is put back as ``<name>`` when ``<name>`` is missing, else removed.
    Returns the paths removed or restored."""
    folder = os.fspath(folder)
    if os.name != "posix" or not os.path.isdir(folder):
        return []
    host, done = _host(), []
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for name in names:
        match = _OWNED.match(name)
        if not match or match["host"] != host or not _process_is_gone(int(match["pid"])):
            continue
        path = os.path.join(folder, name)
        original = os.path.join(folder, match["label"])
        try:
            if match["kind"] == "old" and match["label"] and not os.path.exists(original):
                os.replace(path, original)
                logger.warning("restored %s from %s (left by an interrupted replace)", original, name)
            elif os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
                logger.info("removed stale temporary folder %s", path)
            else:
                os.unlink(path)
                logger.info("removed stale temporary file %s", path)
        except FileNotFoundError:
            continue  # another process cleaned it first
        done.append(path)
    return done


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
        remove_stale_temporaries(folder)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}-{owner_tag()}", dir=folder)
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
    _fsync_folder(folder)


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
        fd, probe = tempfile.mkstemp(prefix=f".tmp-write-check-{owner_tag()}", dir=ancestor)
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
    """A new empty folder ``<prefix>wagle-<pid>-<host>-<random>`` in ``parent`` with the usual
    permissions, to be filled, then renamed (stale ones from dead processes are removed first)."""
    remove_stale_temporaries(parent)
    folder = tempfile.mkdtemp(prefix=prefix + owner_tag(), dir=os.fspath(parent))
    os.chmod(folder, usual_mode(directory=True))
    return folder


def replace_folder(tmp: str, path: str) -> None:
    """Rename the complete folder ``tmp`` to ``path``; an existing ``path`` is replaced only after the
    new folder is in place (and restored if the swap fails).

    Files and sub-folders inside ``tmp`` get the usual permissions first (some writers, e.g.
    ``save_pretrained``, create their files 0600), and every file is flushed to disk before the
    rename that publishes them."""
    file_mode, folder_mode = usual_mode(), usual_mode(directory=True)
    for root, folders, files in os.walk(tmp):
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)
            _fsync(os.path.join(root, name))
        for name in folders:
            os.chmod(os.path.join(root, name), folder_mode)
        _fsync_folder(root)
    parent, name = os.path.split(os.path.abspath(path))
    if not os.path.exists(path):
        os.replace(tmp, path)
        _fsync_folder(parent)
        return
    old = tempfile.mkdtemp(prefix=f".old-{name}-{owner_tag()}", dir=parent)
    os.rmdir(old)  # os.replace needs the target folder name to be free
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    _fsync_folder(parent)
    shutil.rmtree(old, ignore_errors=True)


def ensure_writable_folder(path: str | os.PathLike) -> str:
    """Create folder ``path`` if needed and check a file can be created in it; returns its absolute path.

    Raises ``NotADirectoryError`` when ``path`` or a folder above it is a regular file, and the
    ``OSError`` of the failed creation (e.g. ``PermissionError``, read-only file system) otherwise."""
    path = os.path.abspath(os.fspath(path))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == path else f"is under {existing}, which is a file"
        raise NotADirectoryError(f"{path} {where}, not a folder")
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=f".tmp-write-check-{owner_tag()}", dir=path)
    os.close(fd)
    os.unlink(probe)
    return path
