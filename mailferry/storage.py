"""Content-addressed file storage for raw messages and attachments: ``ab/cd/<sha256>``.

Nothing taken from a message ever becomes part of a path here. A file is written to a
temporary name, fsynced, renamed, and its folder fsynced, before the database commit that
points at it; the same bytes stored twice are one file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def relative_path(self, sha256: str) -> str:
        return f"{sha256[:2]}/{sha256[2:4]}/{sha256}"

    def path_of(self, relative: str) -> Path:
        return self.root / relative

    def put(self, data: bytes, sha256: str | None = None) -> tuple[str, str]:
        """Store ``data`` durably; return (relative path, sha256)."""
        digest = sha256 or hashlib.sha256(data).hexdigest()
        relative = self.relative_path(digest)
        target = self.root / relative
        if target.exists():
            return relative, digest
        target.parent.mkdir(parents=True, exist_ok=True)
        write_durably(target, data)
        return relative, digest

    def read(self, relative: str) -> bytes:
        return (self.root / relative).read_bytes()


def write_durably(target: Path, data: bytes) -> None:
    """Write tmp, fsync, rename over ``target``, fsync the folder: all or nothing on disk."""
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
