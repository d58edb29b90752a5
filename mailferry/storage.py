"""Where raw messages and attachments are kept: one interface, ``BlobStore``, and two backends,
chosen by ``storage_url``: folders (``FolderStore``, here; the default, under ``var/storage``)
and S3-compatible object storage (``mailferry.object_storage.S3Store``), for installations
whose consumer and API processes run on more than one host.

Keys are named by content hash, the same in both backends, and filed by the UTC day they
were stored: a message's raw source at ``raw/<YYYY-MM-DD>/<sha256>.eml``, an attachment or a
body kept out of the database at ``parts/<YYYY-MM-DD>/<sha256>``. The same file sent a
thousand times in one day (a logo, a signature) is one object. Filing by day does two jobs:
a batch of messages adds entries to one folder, so one folder fsync makes it durable (spread
over a hash fan-out, those fsyncs were most of the consumer's own cost, docs/BENCHMARKS.md);
and a writer only ever names today's keys, so once every row stored on a day is gone no one
can reference that day's objects again, and retention deletes the day whole
(``scheduler.message_retention``). Attachments stored before 2026-12-07 are at
``ab/cd/<sha256>``, shared across days: they are still read, and deleted one by one once no
row references them. Nothing taken from a message ever becomes part of a key. Every caller —
the consumer that writes, the API that streams, the commands that read, retention that
deletes — goes through the interface, never a path.

Objects are durable before the database commit that points at them, and a present key means
"stored": ``put_many`` returns only when every object of the batch is. In folders, a new
blob's content is durable before its final name exists (temporary file made durable, then
rename), so a crash can never leave a final name over partial content. A batch has two
barriers: its contents, then its names. On Linux each is one ``syncfs(2)`` of the store's
filesystem (one journal commit for the whole batch, where an fsync per file paid one each: ~1
µs of CPU per file instead of ~57, docs/BENCHMARKS.md); elsewhere, or with ``storage_sync =
fsync``, each file and then each changed folder is fsynced.

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
from typing import Iterator


CHUNK = 64 * 1024  # bytes per read when an object is streamed


class DamagedObject(OSError):
    """An object whose bytes do not hash to the name they were stored under."""


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

    def bytes(self) -> bytes:
        return self.data if self.data is not None else _message_in(self.source)


class StoredObject:
    """An open stored object: its length, and its bytes a chunk at a time (never whole in
    memory). Iterating reads it to the end and closes it; ``close`` lets it go early."""

    def __init__(self, size: int, chunks: Iterator[bytes], close=None):
        self.size = size
        self._chunks = chunks
        self._close = close

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._chunks
        finally:
            self.close()

    def head(self, limit: int) -> bytes:
        """The first ``limit`` bytes (fewer if it is shorter); the object is closed after."""
        out = bytearray()
        try:
            for chunk in self._chunks:
                out += chunk
                if len(out) >= limit:
                    break
        finally:
            self.close()
        return bytes(out[:limit])

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None


class BlobStore:
    """The interface every backend gives. A backend implements ``write_new`` (make a batch
    of new objects durable; a key already present is left as it is, since its name is the
    hash of its bytes), ``open``, ``keys`` and ``describe``; it may override ``open_raw``."""

    @staticmethod
    def of(settings) -> "BlobStore":
        """The store ``settings`` name (``storage_url``; empty: the folder ``storage_dir``)."""
        return open_store(settings.storage_url, settings)

    @staticmethod
    def key_of(sha256: str, day: str, *, raw: bool = False) -> str:
        """The key of bytes hashing to ``sha256`` stored on ``day`` (YYYY-MM-DD, UTC)."""
        return f"raw/{day}/{sha256}.eml" if raw else f"parts/{day}/{sha256}"

    @staticmethod
    def sha256_of_key(key: str) -> str | None:
        """The content hash a key names, or None if it is not a key this store makes."""
        match = _KEY.fullmatch(key)
        return (match.group("raw") or match.group("part") or match.group("blob")) if match else None

    @staticmethod
    def day_of_key(key: str) -> str | None:
        """The day a key is filed under; None for a key shared across days (``ab/cd/…``)."""
        match = _KEY.fullmatch(key)
        return (match.group("day") or match.group("pday")) if match else None

    def put(self, data: bytes, sha256: str | None = None) -> tuple[str, str]:
        """Store one blob durably; return (key, sha256)."""
        return self.put_many([Blob(data, sha256)])[0]

    def put_many(self, blobs: list[Blob]) -> list[tuple[str, str]]:
        """Store blobs durably, as one batch; (key, sha256) each, in order."""
        day = today()
        results, new, queued = [], [], set()
        for blob in blobs:
            digest = blob.sha256 or hashlib.sha256(blob.data).hexdigest()
            key = self.key_of(digest, day, raw=blob.raw)
            results.append((key, digest))
            if key not in queued:
                queued.add(key)
                new.append((key, blob))
        self.write_new(new)
        return results

    def write_new(self, items: list[tuple[str, Blob]]) -> int:
        """Make every (key, blob) durable under its key; how many were written (not present)."""
        raise NotImplementedError

    def open(self, key: str) -> StoredObject:
        """The object at ``key``; FileNotFoundError if there is none, OSError if the store
        cannot be read."""
        raise NotImplementedError

    def open_raw(self, key: str) -> StoredObject:
        """A raw source as the sender's MTA handed it over."""
        return self.open(key)

    def read(self, key: str) -> bytes:
        return b"".join(self.open(key))

    def read_raw(self, key: str) -> bytes:
        return b"".join(self.open_raw(key))

    def read_sound(self, key: str) -> bytes:
        """The object's bytes (a raw source: its message), checked against the hash its key
        names; DamagedObject if they differ, FileNotFoundError if there is none."""
        data = self.read_raw(key) if key.startswith("raw/") else self.read(key)
        if hashlib.sha256(data).hexdigest() != self.sha256_of_key(key):
            raise DamagedObject(f"{key}: stored bytes do not hash to their name")
        return data

    def keys(self) -> Iterator[str]:
        """Every stored key (for migration), in no particular order."""
        raise NotImplementedError

    def days(self) -> set[str]:
        """The days (YYYY-MM-DD) objects are filed under; an object store may still list one
        emptied a moment ago (its folder is removed after)."""
        raise NotImplementedError

    def delete_day(self, day: str) -> int:
        """Delete every object filed under ``day``; how many there were."""
        raise NotImplementedError

    def delete(self, keys: list[str]) -> None:
        """Delete these objects; a key already gone is no error."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def today() -> str:
    """The day new objects are filed under: today's UTC date."""
    return time.strftime("%Y-%m-%d", time.gmtime())


def open_store(url: str, settings) -> BlobStore:
    """The store at ``url`` (``file://PATH``, ``s3://BUCKET/PREFIX``, or empty for the folder
    ``settings.storage_dir``), with the rest of its settings taken from ``settings``."""
    if url.startswith("s3://"):
        from mailferry.object_storage import S3Store  # only installations that use it load it
        return S3Store.from_url(url, settings)
    root = Path(url[len("file://"):]) if url.startswith("file://") else settings.resolved_storage_dir
    return FolderStore(root, settings.storage_sync)


class FolderStore(BlobStore):
    """Objects as files under one folder (the single-machine default)."""

    def __init__(self, root: Path, sync: str = "auto"):
        """``sync``: "auto" (one syncfs per barrier where it reports errors) or "fsync"."""
        self.root = Path(root)
        self._folders: set[str] = set()
        self._syncfs = _SYNCFS if sync == "auto" else None

    def describe(self) -> str:
        return f"folders under {self.root}"

    def write_new(self, items: list[tuple[str, Blob]]) -> int:
        """Blobs are written under temporary names, made durable, and renamed. Then every
        folder that gained an entry is made durable once, however many files it gained."""
        # Plain strings, not Paths, below: this runs for every message and every attachment.
        root = str(self.root)
        pending = []
        touched: set[str] = set()  # folders whose entries changed
        for key, blob in items:
            target = f"{root}/{key}"
            folder = target.rpartition("/")[0]
            if os.path.exists(target):
                continue  # stored before: the name is the hash of the bytes
            touched.update(self._ensure_folder(folder))
            pending.append((target, folder, blob.bytes()))
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
            _on_folder(self.root, self._syncfs)  # the batch's names and new folders
            return len(pending)
        # Deepest first: a new folder's entries are durable before its name is.
        for folder in sorted(touched, key=lambda f: f.count("/"), reverse=True):
            fsync_dir(folder)
        return len(pending)

    def open(self, key: str) -> StoredObject:
        return self._open_span(key, raw=False)

    def open_raw(self, key: str) -> StoredObject:
        """Sources stored before 2026-12-06 were linked from their spool file and begin with
        its envelope record (``mailferry.spool``): that is left out here."""
        return self._open_span(key, raw=True)

    def _open_span(self, key: str, raw: bool) -> StoredObject:
        handle = open(self.root / checked_key(key), "rb")
        try:
            size = os.fstat(handle.fileno()).st_size
            start = _envelope_length(handle) if raw else 0
        except BaseException:
            handle.close()
            raise
        return StoredObject(size - start, _file_chunks(handle, start, size - start), handle.close)

    def keys(self) -> Iterator[str]:
        root = str(self.root)
        for folder, subfolders, files in os.walk(root):
            subfolders.sort()
            for name in sorted(files):
                if not name.startswith(".tmp-"):  # a batch's temporary file, never a key
                    yield os.path.relpath(os.path.join(folder, name), root)

    def days(self) -> set[str]:
        return {name for kind in DAY_FILED if (self.root / kind).is_dir()
                for name in os.listdir(self.root / kind) if DAY.fullmatch(name)}

    def delete_day(self, day: str) -> int:
        """A deletion need not be durable: a file that comes back after a crash is no row's,
        and the next run deletes it again."""
        if not DAY.fullmatch(day):
            raise ValueError(f"not a day: {day!r}")
        deleted = 0
        for kind in DAY_FILED:
            folder = self.root / kind / day
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                os.unlink(entry.path)
                deleted += not entry.name.startswith(".tmp-")
            folder.rmdir()
        return deleted

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            (self.root / checked_key(key)).unlink(missing_ok=True)

    def _ensure_folder(self, folder: str) -> list[str]:
        """Create ``folder`` if needed; the folders whose entries that changed."""
        if folder in self._folders:
            return []
        changed = []
        parent = os.path.dirname(folder)
        for level in (parent, folder):  # raw/ then raw/<day>/, or parts/ then parts/<day>/
            if not os.path.isdir(level):
                os.makedirs(level, exist_ok=True)
                changed.append(os.path.dirname(level))
        self._folders.add(folder)
        return changed


DAY_FILED = ("raw", "parts")  # the top folders whose entries are days
DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_KEY = re.compile(rf"(?:raw/(?P<day>{DAY.pattern})/(?P<raw>[0-9a-f]{{64}})\.eml"
                  rf"|parts/(?P<pday>{DAY.pattern})/(?P<part>[0-9a-f]{{64}}))"
                  r"|(?P<a>[0-9a-f]{2})/(?P<b>[0-9a-f]{2})/(?P<blob>(?P=a)(?P=b)[0-9a-f]{60})")


def checked_key(key: str) -> str:
    """``key`` if it is one this store names (a database row is read as hostile too: a key
    that could climb out of the store is refused, not opened)."""
    if BlobStore.sha256_of_key(key) is None:
        raise FileNotFoundError(f"not a storage key: {key!r}")
    return key


def _envelope_length(handle) -> int:
    """How many bytes of an envelope record begin the file (0 if none); the handle is left
    at its start."""
    from mailferry.spool import ENVELOPE_MARK, ENVELOPE_MAX, split_envelope  # spool builds on storage
    head = handle.read(len(ENVELOPE_MARK))
    if head == ENVELOPE_MARK:  # only then is the rest of the record read
        head += handle.read(ENVELOPE_MAX)
    handle.seek(0)
    return split_envelope(head)[1]


def _file_chunks(handle, offset: int, length: int) -> Iterator[bytes]:
    handle.seek(offset)
    left = length
    while left > 0:
        chunk = handle.read(min(CHUNK, left))
        if not chunk:
            return
        left -= len(chunk)
        yield chunk


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
