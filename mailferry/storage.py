"""File storage for raw messages and attachments, named by content hash.

Attachments live at ``ab/cd/<sha256>``: the same file sent a thousand times (a logo, a
signature) is one file. A message's raw source lives at ``raw/<YYYY-MM-DD>/<sha256>.eml``,
filed by the UTC day it was stored: a batch of messages then adds entries to one folder, and
one folder fsync makes the whole batch durable — spread over ``ab/cd/`` the same batch touched
a folder per message, and those fsyncs were most of the consumer's own cost (docs/BENCHMARKS.md).
Nothing taken from a message ever becomes part of a path here.

Files are durable before the database commit that points at them. A new blob's content is
durable before its final name exists (temporary file made durable, then rename), so a crash
can never leave a final name over partial content — which matters because a present name
means "stored". A batch has two barriers: its contents, then its names. On Linux each is one
``syncfs(2)`` of the store's filesystem (one journal commit for the whole batch, where an
fsync per file paid one each: ~1 µs of CPU per file instead of ~57, docs/BENCHMARKS.md);
elsewhere, or with ``storage_sync = fsync``, each file and then each changed folder is fsynced.

A stored raw source is the message's own bytes, an RFC 5322 message any tool can open. It is
never linked from the spool file: that begins with the envelope record, whose RCPT list
(Bcc included) is the whole transaction's, not one recipient's (docs/DESIGN.md, "Spool").
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Blob:
    """Bytes to store. ``source``: a spool entry (``mailferry.spool.SpoolEntry``) holding these
    bytes behind its envelope record, read here when ``data`` is None (the inbound worker parses in a helper process, so the
    bytes are not in this one).
    ``raw``: a message's raw source, filed by day rather than by hash prefix."""

    data: bytes | None
    sha256: str | None = None
    source: object | None = None  # has .message()
    raw: bool = False


class BlobStore:
    def __init__(self, root: Path, sync: str = "auto"):
        """``sync``: "auto" (one syncfs per barrier where it reports errors) or "fsync"."""
        self.root = Path(root)
        self._folders: set[str] = set()
        self._syncfs = _SYNCFS if sync == "auto" else None

    @classmethod
    def of(cls, settings) -> "BlobStore":
        """The store ``settings`` name: its folder and its barrier."""
        return cls(settings.resolved_storage_dir, settings.storage_sync)

    def relative_path(self, sha256: str, raw_day: str | None = None) -> str:
        if raw_day:
            return f"raw/{raw_day}/{sha256}.eml"
        return f"{sha256[:2]}/{sha256[2:4]}/{sha256}"

    def path_of(self, relative: str) -> Path:
        return self.root / relative

    def put(self, data: bytes, sha256: str | None = None) -> tuple[str, str]:
        """Store one blob durably; return (relative path, sha256)."""
        return self.put_many([Blob(data, sha256)])[0]

    def put_many(self, blobs: list[Blob]) -> list[tuple[str, str]]:
        """Store blobs durably; (relative path, sha256) each.

        Blobs are written under temporary names, fsynced, and renamed. Then every folder that
        gained an entry is fsynced once, however many files it gained.
        """
        # Plain strings, not Paths, below: this runs for every message and every attachment.
        day = time.strftime("%Y-%m-%d", time.gmtime())
        root = str(self.root)
        results, pending, queued = [], [], set()
        touched: set[str] = set()  # folders whose entries changed
        for blob in blobs:
            digest = blob.sha256 or hashlib.sha256(blob.data).hexdigest()
            relative = self.relative_path(digest, day if blob.raw else None)
            results.append((relative, digest))
            if relative in queued:
                continue
            queued.add(relative)
            target = f"{root}/{relative}"
            folder = target.rpartition("/")[0]
            if os.path.exists(target):
                continue  # stored before: the name is the hash of the bytes
            touched.update(self._ensure_folder(folder))
            data = blob.data if blob.data is not None else _message_in(blob.source)
            pending.append((target, folder, data))
        # Write every file first, then fsync them in turn, in this thread. (fsyncs side by
        # side in a thread pool cost the process more CPU in thread hand-offs than the
        # fsyncs themselves: docs/BENCHMARKS.md.)
        temporaries: list[str] = []
        try:
            files = []
            try:
                for _, folder, data in pending:
                    fd, tmp = _open_temporary(folder)
                    temporaries.append(tmp)
                    files.append(fd)
                    _write_all(fd, data)
                if self._syncfs and files:
                    self._syncfs(files[0])  # the batch's contents, all on the store's filesystem
                else:
                    for fd in files:
                        os.fsync(fd)
            finally:
                for fd in files:
                    os.close(fd)
        except BaseException:  # no temporary file outlives a failed batch
            for tmp in temporaries:
                Path(tmp).unlink(missing_ok=True)
            raise
        for (target, folder, _), tmp in zip(pending, temporaries):
            os.replace(tmp, target)
            touched.add(folder)
        if self._syncfs and touched:
            self._sync_root()  # the batch's names and new folders
            return results
        # Deepest first: a new folder's entries are durable before its name is.
        for folder in sorted(touched, key=lambda f: f.count("/"), reverse=True):
            fsync_dir(folder)
        return results

    def _sync_root(self) -> None:
        _on_folder(self.root, self._syncfs)

    def read(self, relative: str) -> bytes:
        return (self.root / relative).read_bytes()

    def read_raw(self, relative: str) -> bytes:
        """A message's raw source as the sender's MTA handed it over. Sources stored before
        2026-12-06 were linked from their spool file and begin with its envelope record
        (``mailferry.spool``): that is left out here."""
        from mailferry.spool import message_of  # spool builds on storage's durable writes
        return message_of(self.read(relative))

    def _ensure_folder(self, folder: str) -> list[str]:
        """Create ``folder`` if needed; the folders whose entries that changed."""
        if folder in self._folders:
            return []
        changed = []
        parent = os.path.dirname(folder)
        for level in (parent, folder):  # ab/ then ab/cd/, or raw/ then raw/<day>/
            if not os.path.isdir(level):
                os.makedirs(level, exist_ok=True)
                changed.append(os.path.dirname(level))
        self._folders.add(folder)
        return changed


def _message_in(source) -> bytes:
    """The message a spool entry (``mailferry.spool.SpoolEntry``) holds behind its envelope."""
    return source.message()


def _open_temporary(folder: str) -> tuple[int, str]:
    """A new, empty file with a unique hidden name in ``folder``: (fd, path)."""
    return tempfile.mkstemp(dir=folder, prefix=".tmp-")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_temporary(folder: Path | str, data: bytes) -> str:
    """A durable temporary file holding ``data`` in ``folder``; its path."""
    fd, tmp = _open_temporary(str(folder))
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def write_durably(target: Path, data: bytes) -> None:
    """Write tmp, fsync, rename over ``target``, fsync the folder: for single files."""
    tmp = _write_temporary(target.parent, data)
    try:
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def _load_syncfs():
    """libc's syncfs(fd), where it reports write-back errors (Linux 5.8 and later); else None:
    an older kernel's syncfs returned 0 whatever happened, which no barrier may do."""
    if sys.platform != "linux":
        return None
    release = tuple(int(n) for n in re.findall(r"\d+", os.uname().release)[:2])
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    if release < (5, 8):
        return None
    function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int

    def syncfs(fd: int) -> None:
        if function(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
    return syncfs


_SYNCFS = _load_syncfs()


def fsync_dir(folder: Path | str) -> None:
    _on_folder(folder, os.fsync)


def _on_folder(folder: Path | str, sync) -> None:
    """``sync`` (fsync or syncfs) on an fd of ``folder``."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sync(fd)
    finally:
        os.close(fd)
