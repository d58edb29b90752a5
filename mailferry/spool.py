"""The spool shared with Haraka: ``incoming/`` holds mail not yet stored, ``failed/`` holds
quarantined mail beside a ``.reason`` file. Paths in queue messages are relative to the
spool root; the only one a job may name is its own file, ``incoming/<queue id>.eml``.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import stat
import uuid
from pathlib import Path

from mailferry.errors import ContractError
from mailferry.storage import fsync_dir, write_durably

INCOMING = "incoming"
FAILED = "failed"


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..")


def read_regular(path: Path, limit: int = -1) -> bytes:
    """The bytes of ``path`` (at most ``limit`` of them, if given), which must be a regular
    file and not a symbolic link.

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

    def remove(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
