"""The spool shared with Haraka: ``incoming/`` holds mail not yet stored, ``failed/`` holds
quarantined mail beside a ``.reason`` file. Paths in queue messages are relative to the
spool root. A message waits in one of two forms:

- a file of its own, ``incoming/<queue id>.eml`` (``mailferry inject``, and Haraka before
  segments): the job may name only that file;
- a record in a **segment**, ``incoming/<name>.seg``, a file Haraka's plugin appends the
  messages of many SMTP sessions to and makes durable with one fdatasync per group (group
  commit: docs/DESIGN.md). The job names the segment, where its record starts, and the
  message's sha256; the record is read only if it is whole and names that very job.
  Segments are never changed once written: the spool sweep removes one when every message in
  it is stored (scheduler/sweep.py).

A record is the envelope line (below) followed by the message's ``size`` bytes. A message its
plugin answered 4xx after writing its record is followed by a withdrawal line, so the sweep
never publishes it (the sender sends it again).
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import os
import stat
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from mailferry.contracts import InboundJob, spool_path_for
from mailferry.errors import ContractError, PermanentError
from mailferry.storage import fsync_dir, write_durably

INCOMING = "incoming"
FAILED = "failed"
SEGMENT_SUFFIX = ".seg"


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..")


def read_regular(path: Path, limit: int = -1, offset: int = 0) -> bytes:
    """The bytes of ``path`` from ``offset`` on (at most ``limit`` of them, if given), which
    must be a regular file and not a symbolic link.

    Opened without following links and without blocking: a FIFO named ``x.eml`` would block
    a plain ``open()`` forever, a folder or a device is refused, a link could point anywhere.
    Raises FileNotFoundError when it is gone and OSError (``NotRegularFile`` among them) when
    it cannot be read: both are that one message's outcome.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", str(path))
        with os.fdopen(fd, "rb", closefd=False) as fh:
            if offset:
                fh.seek(offset)
            return fh.read(limit)
    finally:
        os.close(fd)


class NotRegularFile(OSError):
    """A spool name that is a folder, a FIFO, a device or a socket."""


# A spool file keeps its SMTP envelope ahead of the message, as Postfix and qmail keep it
# inside the queue file: one file, one fsync, and a job lost with the broker is republished
# with its true envelope (Bcc and list recipients included), never one rebuilt from headers.
# The record is one line: this mark, the job's JSON (the inbound contract, as published),
# CRLF. No message starts this way (an MTA puts Received: first; a header has a colon).
ENVELOPE_MARK = b"MAILFERRY-ENVELOPE-1 "
ENVELOPE_MAX = 2 * 1024 * 1024  # bytes: 1,000 recipients of 320 characters fit


def envelope_record(job_body: bytes) -> bytes:
    """The line that goes ahead of the message in a spool file (``job_body``: compact JSON)."""
    if b"\n" in job_body or b"\r" in job_body:
        raise ValueError("an envelope record is one line")
    return ENVELOPE_MARK + job_body + b"\r\n"


def split_envelope(data: bytes) -> tuple[bytes | None, int]:
    """(the job JSON of ``data``'s envelope record or None, where the message starts)."""
    if not data.startswith(ENVELOPE_MARK):
        return None, 0  # a file written without one (by hand, or by an older version)
    end = data.find(b"\n", len(ENVELOPE_MARK), ENVELOPE_MAX)
    if end < 0:
        return None, 0
    return data[len(ENVELOPE_MARK):end].rstrip(b"\r"), end + 1


WITHDRAWN_MARK = b"MAILFERRY-WITHDRAWN-1 "  # then the queue id, CRLF
FIRST_READ = 64 * 1024  # bytes read at a record's offset: its envelope line fits, mostly


class TornRecord(OSError):
    """A segment record that is not whole (the segment ends inside it, or its bytes are not
    the message's sha256): written when a crash came before the group's fdatasync, so its
    message never got a 250."""


@dataclass(frozen=True)
class SpoolEntry:
    """Where one message waits: a file of its own (``offset`` None), or the record at
    ``offset`` in a segment."""
    path: Path
    queue_id: str
    offset: int | None = None
    size: int = 0
    sha256: str = ""

    @property
    def in_segment(self) -> bool:
        return self.offset is not None

    @property
    def failed_name(self) -> str:
        """Its name in ``failed/`` once quarantined: a record leaves its segment as a file."""
        return f"{self.queue_id}.eml" if self.in_segment else self.path.name

    def record(self) -> bytes:
        """Envelope record and message, as a file of its own holds them. Raises OSError
        (FileNotFoundError, NotRegularFile, TornRecord) when it cannot be read whole."""
        if not self.in_segment:
            return read_regular(self.path)
        head = read_regular(self.path, FIRST_READ, offset=self.offset)
        end = head.find(b"\n")
        if end < 0 and len(head) == FIRST_READ:
            head = read_regular(self.path, ENVELOPE_MAX, offset=self.offset)
            end = head.find(b"\n")
        if not head.startswith(ENVELOPE_MARK) or end < 0:
            raise TornRecord(errno.EIO, "no whole envelope record at its offset", str(self.path))
        try:
            job = InboundJob.from_body(head[len(ENVELOPE_MARK):end].rstrip(b"\r"))
        except PermanentError as exc:
            raise TornRecord(errno.EIO, f"its envelope record is not a job: {exc}", str(self.path))
        if job.queue_id != self.queue_id or job.spool_offset != self.offset:
            raise TornRecord(errno.EIO, f"the record at its offset is {job.queue_id}'s", str(self.path))
        need = end + 1 + self.size
        data = head if len(head) >= need else read_regular(self.path, need, offset=self.offset)
        data = data[:need]
        if len(data) < need:
            raise TornRecord(errno.EIO, "the segment ends inside the message", str(self.path))
        if hashlib.sha256(memoryview(data)[end + 1:]).hexdigest() != self.sha256:
            raise TornRecord(errno.EIO, "the message's bytes do not match its sha256", str(self.path))
        return data

    def message(self) -> bytes:
        return message_of(self.record())


def as_file_job(job: InboundJob) -> InboundJob:
    """``job`` naming a file of its own (``incoming/<queue id>.eml``) instead of a record."""
    return replace(job, spool_path=spool_path_for(job.queue_id), spool_offset=None, sha256="")


@dataclass
class SegmentRecords:
    """What a segment holds, read in order up to its end or its first record that is not
    whole (a torn tail: nothing after it was ever acknowledged)."""
    jobs: list[InboundJob] = field(default_factory=list)  # the whole records, in order
    withdrawn: set[str] = field(default_factory=set)  # queue ids answered 4xx after writing
    torn_at: int | None = None  # where the readable part ends, if before the segment's end


def read_segment(path: Path) -> SegmentRecords:
    data = read_regular(path)
    out, position = SegmentRecords(), 0
    while position < len(data):
        end = data.find(b"\n", position, position + ENVELOPE_MAX)
        line = data[position:end + 1] if end >= 0 else b""
        if line.startswith(WITHDRAWN_MARK):
            out.withdrawn.add(line[len(WITHDRAWN_MARK):].strip().decode("ascii", "replace"))
            position = end + 1
            continue
        job = _whole_record(data, position, line)
        if job is None:
            out.torn_at = position
            break
        out.jobs.append(job)
        position = end + 1 + job.size
    return out


def _whole_record(data: bytes, position: int, line: bytes) -> InboundJob | None:
    if not line.startswith(ENVELOPE_MARK):
        return None
    try:
        job = InboundJob.from_body(line[len(ENVELOPE_MARK):].rstrip(b"\r\n"))
    except PermanentError:
        return None
    start = position + len(line)
    message = memoryview(data)[start:start + job.size]
    if job.spool_offset != position or len(message) < job.size or \
            hashlib.sha256(message).hexdigest() != job.sha256:
        return None
    return job


def message_of(data: bytes) -> bytes:
    """The message in a spool file's bytes (or a raw source stored, before 2026-12-06, as a link to one)."""
    _, start = split_envelope(data)
    return data[start:] if start else data


class Spool:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.incoming = self.root / INCOMING
        self.failed = self.root / FAILED

    def ensure(self) -> "Spool":
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.failed.mkdir(parents=True, exist_ok=True)
        return self

    def entry(self, job: InboundJob) -> SpoolEntry:
        """Where ``job``'s message waits (the contract checked its path's form already)."""
        path = self.resolve(job.spool_path)
        if job.in_segment:
            return SpoolEntry(path, job.queue_id, job.spool_offset, job.size, job.sha256)
        return SpoolEntry(path, job.queue_id)

    def segments(self) -> list[Path]:
        return sorted(self.incoming.glob(f"*{SEGMENT_SUFFIX}"))

    def resolve(self, relative: str) -> Path:
        """The absolute path of ``relative``, a file right in ``incoming/``; ContractError for
        anything else (another folder, ``incoming`` itself, ``..``, a link, a NUL)."""
        folder, _, name = (relative or "").partition("/")
        if folder != INCOMING or not _plain_name(name) or "\x00" in name:
            raise ContractError(f"spool_path {relative!r} is not a file in {INCOMING}/")
        if self.incoming.is_symlink():
            raise ContractError(f"spool folder {INCOMING}/ is a symbolic link: refused")
        path = self.incoming / name
        if path.is_symlink():
            raise ContractError(f"spool_path {relative!r} is a symbolic link: refused")
        return path

    def write_incoming(self, raw: bytes, queue_id: str | None = None, *,
                       envelope: bytes | None = None) -> tuple[str, str]:
        """Spool ``raw`` as Haraka's plugin does, behind the ``envelope`` record (the job's
        JSON) when given; return (queue_id, relative path)."""
        queue_id = queue_id or str(uuid.uuid4()).upper()
        target = self.incoming / f"{queue_id}.eml"
        write_durably(target, envelope_record(envelope) + raw if envelope is not None else raw)
        return queue_id, f"{INCOMING}/{target.name}"

    def quarantine(self, path: Path, reason: str, raw: bytes | None = None, name: str | None = None) -> Path:
        """Move (or write) a message into ``failed/`` with its reason beside it."""
        name = name or path.name
        target = self.failed / name
        reason_file = target.with_suffix(target.suffix + ".reason")
        stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        write_durably(reason_file, f"{stamp} {reason}\n".encode("utf-8"))
        if raw is not None:
            write_durably(target, raw)
        elif path.exists():
            os.replace(path, target)
            fsync_dir(self.failed)
        return target

    def quarantine_entry(self, entry: SpoolEntry, reason: str) -> Path:
        """A file is moved to ``failed/``; a segment record is copied there as a file (its
        segment stays, and the sweep reclaims it once nothing in it waits)."""
        if not entry.in_segment:
            return self.quarantine(entry.path, reason)
        try:
            record = entry.record()
            envelope, start = split_envelope(record)
            job = as_file_job(InboundJob.from_body(envelope))
            raw = envelope_record(job.to_body()) + record[start:]  # a file's own record
        except (OSError, PermanentError):
            raw = b""  # unreadable: the reason says so; there are no bytes to keep
        return self.quarantine(entry.path, reason, raw=raw, name=entry.failed_name)

    def release(self, entry: SpoolEntry) -> None:
        """The message is stored: its file goes; a segment record stays for the sweep."""
        if not entry.in_segment:
            self.remove(entry.path)

    def remove(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
