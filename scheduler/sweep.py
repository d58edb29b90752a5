"""The spool sweep (the seed's ``haraka_email_fetch_task``): files in ``spool/incoming`` older
than spool_sweep_age that were never stored are published to ``mailferry.inbound`` again.

A file outlives its job when the job was lost (a broker that lost a queue, a consumer that
died after committing but before removing the file). A file whose queue id has an
InboundReceipt is done and only removed. The spool file holds the message without its SMTP
envelope, so the recipients come from the envelope headers an MTA may have added
(Delivered-To, X-Original-To, Envelope-To), else from To/Cc/Bcc: a Bcc recipient of a lost
job cannot be recovered. A file with no recipient at all is quarantined with the reason.
A republished file's mtime is reset, so a job still waiting in the queue (a consumer that is
down) is not published again every tick; the consumer treats a repeated queue id as a
duplicate anyway. And while mailferry.inbound has messages waiting, an old file is most
likely one of them (a backlog, a consumer that is down): republishing is deferred to a sweep
that finds the queue drained, so a backlog is never doubled. Each sweep that finds files is recorded as a HARAKA_EMAIL_FETCH task.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import stat
import time
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from pathlib import Path

import peewee

from mailferry import broker, metrics
from mailferry.config import Settings
from mailferry.contracts import QUEUE_ID_RE, InboundJob
from mailferry.errors import MailferryError, TransientError
from mailferry.models import InboundReceipt, TaskSource, TaskStatus
from mailferry.spool import INCOMING, NotRegularFile, Spool
from mailferry.tasks import complete_task, create_task, fail_task, start_task

log = logging.getLogger(__name__)

HEADER_READ_MAX = 256 * 1024  # bytes read to find a spooled message's headers
ENVELOPE_HEADERS = ("delivered-to", "x-original-to", "envelope-to")
MESSAGE_HEADERS = ("to", "cc", "bcc")


@dataclass
class SweepSummary:
    found: int = 0
    already_stored: int = 0
    republished: int = 0
    quarantined: int = 0
    deferred: int = 0
    task_id: str | None = None
    status: str | None = None


def orphaned_files(spool: Spool, age: int, now: float | None = None) -> list[Path]:
    """Regular files in incoming/ older than ``age``; anything else there is logged and left."""
    cutoff = (now or time.time()) - age
    found = []
    for path in spool.incoming.glob("*.eml"):
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue  # stored and removed while we looked
        if not stat.S_ISREG(info.st_mode):
            # A FIFO would block a read forever, a folder cannot be read, a link leads
            # anywhere: none of them is mail that Haraka spooled.
            log.warning("spool sweep: %s is not a regular file (mode %o); left alone",
                        path.name, info.st_mode)
            continue
        if info.st_mtime < cutoff:
            found.append(path)
    return sorted(found)


def envelope_from_file(path: Path, queue_id: str, max_addresses: int) -> InboundJob | None:
    """An inbound job for a spooled file, its envelope rebuilt from headers; None if no recipient."""
    head, size, mtime = _head_of(path)
    end = min((i for i in (head.find(b"\r\n\r\n"), head.find(b"\n\n")) if i >= 0), default=len(head))
    headers = BytesHeaderParser(policy=compat32).parsebytes(head[:end] + b"\r\n\r\n")
    rcpt_to = _addresses(headers, ENVELOPE_HEADERS) or _addresses(headers, MESSAGE_HEADERS)
    if not rcpt_to:
        return None
    senders = _addresses(headers, ("return-path",)) or _addresses(headers, ("from",))
    received = dt.datetime.fromtimestamp(mtime, dt.timezone.utc)
    return InboundJob(
        spool_path=f"{INCOMING}/{path.name}", queue_id=queue_id,
        mail_from=senders[0] if senders else "", rcpt_to=rcpt_to[:max_addresses], size=size,
        received_at=received.isoformat(timespec="milliseconds").replace("+00:00", "Z"))


def _head_of(path: Path) -> tuple[bytes, int, float]:
    """The first HEADER_READ_MAX bytes of a regular file, its size and mtime; never blocks
    and never follows a link (a FIFO or a link put there meanwhile is refused)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", str(path))
        return os.read(fd, HEADER_READ_MAX), info.st_size, info.st_mtime
    finally:
        os.close(fd)


def _addresses(headers, names: tuple[str, ...]) -> list[str]:
    values = [str(v) for name in names for v in (headers.get_all(name) or [])]
    seen, found = set(), []
    for _, address in getaddresses(values):
        address = address.strip()
        if "@" in address and address.lower() not in seen:
            seen.add(address.lower())
            found.append(address)
    return found


def _receipts(queue_ids: list[str]) -> set[str]:
    done: set[str] = set()
    for chunk in peewee.chunked(queue_ids, 500):
        done.update(row[0] for row in InboundReceipt.select(InboundReceipt.queue_id)
                    .where(InboundReceipt.queue_id.in_(chunk)).tuples())
    return done


def sweep_spool(settings: Settings, publisher, now: float | None = None) -> SweepSummary:
    spool = Spool(settings.resolved_spool_dir).ensure()
    files = orphaned_files(spool, settings.spool_sweep_age, now)
    summary = SweepSummary(found=len(files))
    if not files:
        return summary  # nothing to record: a task per idle tick would only fill the table
    task = create_task(TaskSource.HARAKA, None, timeout_seconds=settings.task_timeout,
                       details={"files": len(files)})
    summary.task_id, summary.status = task.task_id, task.status
    if task.status == TaskStatus.SKIPPED or start_task(task.task_id) is None:
        return summary
    try:
        _sweep(settings, spool, files, publisher, summary)
    except (MailferryError, peewee.PeeweeException, OSError) as exc:
        fail_task(task.task_id, f"spool sweep failed: {exc}", fetched=summary.found,
                  saved=summary.republished, failed=summary.quarantined,
                  processed=summary.already_stored + summary.republished + summary.quarantined)
        summary.status = TaskStatus.FAILED
        if isinstance(exc, peewee.PeeweeException):
            raise TransientError(f"spool sweep: database unavailable: {exc}") from exc
        raise
    complete_task(task.task_id, fetched=summary.found, saved=summary.republished,
                  failed=summary.quarantined,
                  processed=summary.already_stored + summary.republished + summary.quarantined,
                  details={"files": summary.found, "already_stored": summary.already_stored,
                           "republished": summary.republished, "quarantined": summary.quarantined,
                           "deferred": summary.deferred})
    if summary.deferred:
        log.info("spool sweep: %d old files not republished while %s has messages waiting",
                 summary.deferred, broker.INBOUND)
    summary.status = TaskStatus.COMPLETED
    return summary


def _sweep(settings: Settings, spool: Spool, files: list[Path], publisher, summary: SweepSummary) -> None:
    done = _receipts([p.stem for p in files])
    key = broker.ROUTING_KEYS[broker.INBOUND]
    waiting = publisher.queue_depth(broker.INBOUND)
    for path in files:
        queue_id = path.stem
        if queue_id in done:
            spool.remove(path)  # stored; the consumer died before removing the file
            summary.already_stored += 1
            continue
        try:
            job = envelope_from_file(path, queue_id, settings.max_addresses)
            why = ("no recipient in its headers" if job is None else
                   None if QUEUE_ID_RE.fullmatch(queue_id) else "its name is not a queue id")
        except FileNotFoundError:
            continue  # stored and removed meanwhile
        except NotRegularFile:
            log.warning("spool sweep: %s is no longer a regular file; left alone", path.name)
            continue
        except Exception as exc:  # noqa: BLE001 - a hostile or unreadable file is its own outcome
            why = f"cannot read its headers: {type(exc).__name__}: {exc}"[:300]
        if why:
            _quarantine(spool, path, f"orphaned spool file, cannot be republished: {why}", summary)
            continue
        if waiting:
            summary.deferred += 1
            continue
        publisher.publish(key, job.to_body(), message_id=queue_id)
        os.utime(path)  # not again before another spool_sweep_age
        summary.republished += 1
        metrics.spool_republished.inc()
        log.info("spool sweep: republished %s to %s", path.name, ", ".join(job.rcpt_to))


def _quarantine(spool: Spool, path: Path, reason: str, summary: SweepSummary) -> None:
    try:
        spool.quarantine(path, reason)
    except OSError as exc:
        log.error("spool sweep: cannot quarantine %s (%s): %s", path.name, reason, exc)
        return
    summary.quarantined += 1
    log.warning("spool sweep: %s quarantined: %s", path.name, reason)
