"""Content-addressed file storage for raw messages and attachments: ``ab/cd/<sha256>``.

Nothing taken from a message ever becomes part of a path here. Files are durable before the
database commit that points at them, and the same bytes stored twice are one file.

A new blob's content is durable before its final name exists (fsynced temporary file, then
rename; or a hard link to a spool file that is durable already), so a crash can never leave a
final name over partial content — which matters because a present name means "stored".
Folder entries are made durable per batch: each folder that changed is fsynced once.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
import tempfile
from pathlib import Path

FSYNC_THREADS = 8  # folder fsyncs in flight at once


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

    def put_many(self, blobs: list[tuple[bytes | None, str | None]],
                 sources: list[Path | None] | None = None) -> list[tuple[str, str]]:
        """Store blobs durably; (relative path, sha256) each.

        ``sources`` may name, per blob, a file that already holds exactly those bytes durably
        (a spool file Haraka fsynced): it is hard-linked into place instead of copied — no
        second write of the message, and a link is as atomic as a rename. Other blobs are
        written under temporary names, fsynced, and renamed. Then every folder that gained an
        entry is fsynced once, however many files it gained.
        """
        results, pending, queued = [], [], set()
        touched: set[Path] = set()  # folders whose entries changed
        for index, (data, digest) in enumerate(blobs):
            digest = digest or hashlib.sha256(data).hexdigest()
            relative = self.relative_path(digest)
            results.append((relative, digest))
            target = self.root / relative
            if target in queued or target.exists():
                continue
            touched.update(self._ensure_folder(target.parent))
            queued.add(target)
            source = sources[index] if sources else None
            if source is not None and _link(source, target):
                touched.add(target.parent)
                continue
            if data is None:  # the caller had only the source file: copy it
                data = Path(source).read_bytes()
            pending.append((target, _write_temporary(target.parent, data)))
        for target, tmp in pending:
            os.replace(tmp, target)
            touched.add(target.parent)
        # Deepest first, a level at a time: a new folder's entries are durable before its name
        # is. Within a level the fsyncs are independent and run side by side — each waits on
        # the disk, and a batch touches dozens of folders.
        for depth in sorted({len(f.parts) for f in touched}, reverse=True):
            level = [f for f in touched if len(f.parts) == depth]
            if len(level) == 1:
                fsync_dir(level[0])
            else:
                list(_fsync_pool().map(fsync_dir, level))
        return results

    def read(self, relative: str) -> bytes:
        return (self.root / relative).read_bytes()

    def _ensure_folder(self, folder: Path) -> list[Path]:
        """Create ``folder`` if needed; the folders whose entries that changed."""
        if folder in self._folders:
            return []
        changed = []
        for level in (folder.parent, folder):  # ab/ then ab/cd/
            if not level.is_dir():
                level.mkdir(parents=True, exist_ok=True)
                changed.append(level.parent)
        self._folders.add(folder)
        return changed


_pool: ThreadPoolExecutor | None = None


def _fsync_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=FSYNC_THREADS, thread_name_prefix="fsync")
    return _pool


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
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
