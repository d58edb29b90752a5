"""The spool sweep (the seed's ``haraka_email_fetch_task``): files in ``spool/incoming`` older
than spool_sweep_age that were never stored are published to ``mailferry.inbound`` again.

A file outlives its job when the job was lost (a broker that lost a queue, a consumer that
died after committing but before removing the file, a job dead-lettered after its retries).
A file whose queue id has an InboundReceipt is done and only removed. Any other is published
again with the job its envelope record holds (``mailferry.spool``): the true SMTP envelope,
Bcc and list recipients included — never one rebuilt from headers. A file without a record,
or one that cannot be read, is quarantined with the reason; a name that is not a regular file
(a FIFO, a folder, a link) is logged and left alone. A republished file's mtime is reset, so
a job still waiting in the queue (a consumer that is down) is not published again every tick;
the consumer treats a repeated queue id as a duplicate anyway. And while mailferry.inbound has
messages waiting, an old file is most likely one of them (a backlog, a consumer that is down):
republishing is deferred to a sweep that finds the queue drained, so a backlog is never
doubled. Each sweep that finds files is recorded as a HARAKA_EMAIL_FETCH task.

Segments (``incoming/*.seg``, many messages each: ``mailferry.spool``) are read once Haraka no
longer writes to them (unwritten for spool_segment_idle). One whose every message is done —
stored (a receipt), quarantined (its copy in ``failed/``), or withdrawn (its sender got 4xx
and sends it again) — is removed: that is routine, not a task. Any other message in it is an
orphan like a file and is republished the same way, with the job its record holds; a torn
tail (a crash before its fdatasync: never acknowledged) is never read.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import peewee

from mailferry import broker, metrics
from mailferry.config import Settings
from mailferry.contracts import InboundJob
from mailferry.errors import ContractError, MailferryError, TransientError
from mailferry.models import InboundReceipt, SpoolFloor, TaskSource, TaskStatus, utcnow
from mailferry.spool import (
    ENVELOPE_MAX, NotRegularFile, Spool, read_regular, read_segment, split_envelope,
)
from mailferry.tasks import complete_task, create_task, fail_task, start_task

log = logging.getLogger(__name__)



@dataclass
class SweepSummary:
    found: int = 0
    already_stored: int = 0
    republished: int = 0
    quarantined: int = 0
    deferred: int = 0
    segments_removed: int = 0
    unread_segments: int = 0
    oldest_kept_receipt: dt.datetime | None = None  # of a message still on the spool
    task_id: str | None = None
    status: str | None = None

    def keeps(self, receipt_times) -> None:
        """Messages with receipts written at ``receipt_times`` are still on the spool."""
        for when in receipt_times:
            if self.oldest_kept_receipt is None or when < self.oldest_kept_receipt:
                self.oldest_kept_receipt = when


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


def envelope_from_file(path: Path, queue_id: str) -> InboundJob | None:
    """The inbound job a spool file carries in its envelope record (its true envelope, as
    Haraka's plugin published it); None when the file has none. Raises ContractError when the
    record does not hold a valid job for this very file."""
    # Never blocks and never follows a link (a FIFO or a link put there meanwhile).
    body, _ = split_envelope(read_regular(path, ENVELOPE_MAX))
    if body is None:
        return None
    job = InboundJob.from_body(body)
    if job.queue_id != queue_id:
        raise ContractError(f"its envelope record names queue id {job.queue_id!r}")
    return job


def _receipts(queue_ids: list[str]) -> dict[str, dt.datetime]:
    """The queue ids of these that have a receipt, with when it was written."""
    done: dict[str, dt.datetime] = {}
    for chunk in peewee.chunked(queue_ids, 500):
        done.update(InboundReceipt.select(InboundReceipt.queue_id, InboundReceipt.created_at)
                    .where(InboundReceipt.queue_id.in_(chunk)).tuples())
    return done


@dataclass
class SegmentOrphans:
    """A segment's messages that are not done, once it is old enough to republish them."""
    path: Path
    jobs: list[InboundJob]


def sweep_segments(spool: Spool, settings: Settings, summary: SweepSummary,
                   now: float | None = None) -> list[SegmentOrphans]:
    """Remove the segments whose every message is done; return the orphans of the others
    that were last written more than spool_sweep_age ago."""
    now = now or time.time()
    orphans = []
    for path in spool.segments():
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(info.st_mode):
            log.warning("spool sweep: %s is not a regular file (mode %o); left alone",
                        path.name, info.st_mode)
            continue
        if info.st_mtime > now - settings.spool_segment_idle:
            continue  # Haraka may still append to it
        try:
            records = read_segment(path)
        except OSError as exc:
            log.error("spool sweep: cannot read segment %s: %s", path.name, exc)
            summary.unread_segments += 1
            continue
        waiting = [job for job in records.jobs if job.queue_id not in records.withdrawn]
        stored = _receipts([job.queue_id for job in waiting])
        left = _not_done(spool, waiting, stored)
        if not left:
            spool.remove(path)
            summary.segments_removed += 1
            continue
        summary.keeps(stored.values())  # the segment stays, and the need for these receipts
        if info.st_mtime < now - settings.spool_sweep_age:
            orphans.append(SegmentOrphans(path, left))
    return orphans


def not_done(spool: Spool, records) -> list[InboundJob]:
    """A segment's messages neither stored, withdrawn nor quarantined."""
    waiting = [job for job in records.jobs if job.queue_id not in records.withdrawn]
    return _not_done(spool, waiting, _receipts([job.queue_id for job in waiting]))


def _not_done(spool: Spool, waiting: list[InboundJob], stored) -> list[InboundJob]:
    return [job for job in waiting if job.queue_id not in stored
            and not (spool.failed / f"{job.queue_id}.eml").exists()]


def sweep_spool(settings: Settings, publisher, now: float | None = None) -> SweepSummary:
    started = utcnow()
    spool = Spool(settings.resolved_spool_dir).ensure()
    files = orphaned_files(spool, settings.spool_sweep_age, now)
    summary = SweepSummary(found=len(files))
    segment_orphans = sweep_segments(spool, settings, summary, now)
    summary.found += sum(len(s.jobs) for s in segment_orphans)
    done = _receipts([p.stem for p in files])
    summary.keeps(done.values())  # removed below, unless that fails
    _report_floor(settings, summary, started)
    if not summary.found:
        return summary  # nothing to record: a task per idle tick would only fill the table
    task = create_task(TaskSource.HARAKA, None, timeout_seconds=settings.task_timeout,
                       details={"files": len(files),
                                "segment_messages": summary.found - len(files)})
    summary.task_id, summary.status = task.task_id, task.status
    if task.status == TaskStatus.SKIPPED or start_task(task.task_id) is None:
        return summary
    try:
        _sweep(settings, spool, files, done, publisher, summary)
        _republish_segments(settings, segment_orphans, publisher, summary)
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
                 summary.deferred, broker.inbound_queue(settings))
    summary.status = TaskStatus.COMPLETED
    return summary


def _report_floor(settings: Settings, summary: SweepSummary, started: dt.datetime) -> None:
    """Tell delivery retention which of this node's receipts the spool may still need: those
    of the messages it holds, and any written from now on. A receipt of a file or a segment
    too young to be read here was written after that file or segment was (the
    sweep never republishes what has a receipt), so minutes before ``started``: the retention's
    margin of a day covers it. A segment that could not be read may need any receipt: no
    floor then."""
    if summary.unread_segments:
        return
    floor = min(filter(None, [started, summary.oldest_kept_receipt]))
    SpoolFloor.report(settings.node, floor, started)


def _sweep(settings: Settings, spool: Spool, files: list[Path], done, publisher,
           summary: SweepSummary) -> None:
    key = broker.inbound_key(settings)
    waiting = publisher.queue_depth(broker.inbound_queue(settings))
    for path in files:
        queue_id = path.stem
        if queue_id in done:
            spool.remove(path)  # stored; the consumer died before removing the file
            summary.already_stored += 1
            continue
        try:
            job = envelope_from_file(path, queue_id)
            why = None if job is not None else (
                "it has no envelope record (written by hand or by a Mailferry before 0.2); "
                "re-inject it with `mailferry inject FILE --rcpt …`")
        except FileNotFoundError:
            continue  # stored and removed meanwhile
        except NotRegularFile:
            log.warning("spool sweep: %s is no longer a regular file; left alone", path.name)
            continue
        except Exception as exc:  # noqa: BLE001 - a hostile or unreadable file is its own outcome
            why = f"cannot read its envelope record: {type(exc).__name__}: {exc}"[:300]
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


def _republish_segments(settings: Settings, orphans: list[SegmentOrphans], publisher,
                        summary: SweepSummary) -> None:
    if not orphans:
        return
    key = broker.inbound_key(settings)
    if publisher.queue_depth(broker.inbound_queue(settings)):
        summary.deferred += sum(len(s.jobs) for s in orphans)
        return
    for segment in orphans:
        for job in segment.jobs:
            publisher.publish(key, job.to_body(), message_id=job.queue_id)
            summary.republished += 1
            metrics.spool_republished.inc()
            log.info("spool sweep: republished %s@%d to %s", segment.path.name,
                     job.spool_offset, ", ".join(job.rcpt_to))
        os.utime(segment.path)  # not again before another spool_sweep_age


def _quarantine(spool: Spool, path: Path, reason: str, summary: SweepSummary) -> None:
    try:
        spool.quarantine(path, reason)
    except OSError as exc:
        log.error("spool sweep: cannot quarantine %s (%s): %s", path.name, reason, exc)
        return
    summary.quarantined += 1
    log.warning("spool sweep: %s quarantined: %s", path.name, reason)
