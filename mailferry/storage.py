"""Content-addressed file storage for raw messages and attachments: ``ab/cd/<sha256>``.

Nothing taken from a message ever becomes part of a path here. Files are durable before the
database commit that points at them, and the same bytes stored twice are one file.

Durability is paid per batch, not per file: a batch's files are written under temporary
names, the filesystem is flushed once (``syncfs``), the files are renamed into place, and the
filesystem is flushed again. A crash can therefore never leave a final name over partial
content — which matters because a present name is taken as "already stored".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import tempfile
from pathlib import Path

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)


def flush_filesystem(folder: Path) -> None:
    """Make everything written on ``folder``'s filesystem durable, in one call."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _syncfs is None or _syncfs(fd) != 0:
            os.sync()  # no syncfs (not Linux): flush everything
    finally:
        os.close(fd)


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._folders: set[Path] = set()

    def relative_path(self, sha256: str) -> str:
        return f"{sha256[:2]}/{sha256[2:4]}/{sha256}"

    def path_of(self, relative: str) -> Path:
        return self.root / relative

    def put(self, data: bytes, sha256: str | None = None) -> tuple[str, str]:
        """Store one blob durably; return (relative path, sha256)."""
        return self.put_many([(data, sha256)])[0]

    def put_many(self, blobs: list[tuple[bytes, str | None]],
                 sources: list[Path | None] | None = None) -> list[tuple[str, str]]:
        """Store blobs durably with two filesystem flushes in all; (relative path, sha256) each.

        ``sources`` may name, per blob, a file that already holds exactly those bytes durably
        (a spool file Haraka fsynced): it is hard-linked into place instead of copied — no
        second write of the message, and the link is as atomic as a rename. Across
        filesystems the bytes are written as usual.
        """
        results, pending, queued, linked = [], [], set(), False
        for index, (data, digest) in enumerate(blobs):
            digest = digest or hashlib.sha256(data).hexdigest()
            relative = self.relative_path(digest)
            results.append((relative, digest))
            target = self.root / relative
            if target in queued or target.exists():
                continue
            self._ensure_folder(target.parent)
            queued.add(target)
            source = sources[index] if sources else None
            if source is not None and _link(source, target):
                linked = True
                continue
            pending.append((target, _write_temporary(target.parent, data)))
        if pending:
            flush_filesystem(self.root)
            for target, tmp in pending:
                os.replace(tmp, target)
        if pending or linked:
            flush_filesystem(self.root)
        return results

    def read(self, relative: str) -> bytes:
        return (self.root / relative).read_bytes()

    def _ensure_folder(self, folder: Path) -> None:
        if folder not in self._folders:
            folder.mkdir(parents=True, exist_ok=True)
            self._folders.add(folder)


def _link(source: Path, target: Path) -> bool:
    try:
        os.link(source, target)
        return True
    except FileExistsError:
        return True  # the same content, stored meanwhile by another consumer
    except OSError:
        return False  # another filesystem, or links not allowed: copy instead


def _write_temporary(folder: Path, data: bytes) -> str:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def write_durably(target: Path, data: bytes) -> None:
    """Write tmp, fsync, rename over ``target``, fsync the folder: for single files."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
