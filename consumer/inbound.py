"""The inbound worker: ``mailferry.inbound`` jobs (a spooled file + its SMTP envelope) become
stored messages, one per routed user, in one transaction per batch.

Per batch, in two stages the runner overlaps: ``prepare`` checks each job (contract, path,
receipt) and starts parsing its spooled file (in the parser process when there is one);
``commit`` collects the parse, links the raw files and writes the attachments into storage,
saves everything in one transaction, and after the commit removes the spool files. The
runner acks only after ``commit`` returned.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import peewee

from mailread.parse import Limits, ParsedEmail
from consumer.route import Route, Router
from consumer.parse_pool import parser_for
from consumer.save import (
    SaveRequest, SaveResult, StoredFiles, commit_batch, observe_parse, save_for_users, save_many,
    store_batch,
)
from mailferry import broker, metrics, outbox
from mailferry.config import Settings
from mailferry.contracts import InboundJob
from mailferry.errors import PermanentError
from mailferry.db import UNAVAILABLE, bulk_insert, insert_rows, translated
from mailferry.models import InboundReceipt, UnroutedMessage, db, utcnow
from consumer.handler import Delivery, Handler, Outcome
from mailferry.spool import Spool, SpoolEntry
from mailferry.storage import BlobStore

log = logging.getLogger(__name__)
SOURCE = "smtp"
# A batch closes at a quarter of the prefetch or once it stands for this much mail (the
# contracts' sizes), whichever comes first: what a consumer holds parsed stays bounded.
BATCH_BYTES = 16 * 1024 * 1024
RECEIPT_COLUMNS = ("queue_id", "outcome", "stored_count", "created_at", "node")


@dataclass
class _Prepared:
    index: int
    job: InboundJob
    entry: SpoolEntry
    parsed: ParsedEmail | None
    files: StoredFiles | None = None
    routes: list[Route] | None = None


@dataclass
class _Batch:
    started: float
    outcomes: list[Outcome | None]
    prepared: list[_Prepared]
    parsing: object = None  # the parser process's Future, until commit collects it


class InboundHandler(Handler):
    queue = broker.INBOUND
    pipelined = True
    batch_bytes = BATCH_BYTES

    def __init__(self, settings: Settings, spool: Spool | None = None, store: BlobStore | None = None):
        self.settings = settings
        self.queue = broker.inbound_queue(settings)  # this host's own, when it is one of several
        self.prefetch = settings.prefetch
        self.spool = (spool or Spool(settings.resolved_spool_dir)).ensure()
        self.store = store or BlobStore.of(settings)
        self.limits = Limits.from_settings(settings)
        self.router = Router()
        # Parsing is the CPU-bound part: in a helper process it runs on its own core while
        # this process reads, stores and commits (see consumer/parse_pool.py).
        self.parser = parser_for(settings.parse_process)
        self.parser.start()  # a helper boots while the runner connects

    def warm_up(self) -> None:
        """Called by the runner before it consumes: the parser process is up before the first
        batch, not during it (it takes ~0.3 s to import the parser)."""
        self.parser.start(wait=True)

    def close(self) -> None:
        self.parser.close()

    def weigh(self, delivery: Delivery) -> int:
        """The size of the mail ``delivery`` stands for, for the runner's batches; the job
        read from it is kept for ``prepare``."""
        try:
            delivery.decoded = InboundJob.from_body(delivery.body)
        except PermanentError:
            return 0  # prepare dead-letters it, with the reason
        return delivery.decoded.size

    def prepare(self, deliveries: list[Delivery]) -> "_Batch":
        """Stage one: check each job, read its file, start parsing it (quarantine the bad)."""
        batch = _Batch(time.perf_counter(), [None] * len(deliveries), [])
        jobs: dict[int, InboundJob] = {}
        redelivered: set[str] = set()
        for i, delivery in enumerate(deliveries):
            try:
                jobs[i] = (delivery.decoded if isinstance(delivery.decoded, InboundJob)
                           else InboundJob.from_body(delivery.body))
            except PermanentError as exc:
                batch.outcomes[i] = Outcome.dead(f"malformed job: {exc}")
                metrics.record(SOURCE, "failed")
                continue
            if delivery.redelivered:
                redelivered.add(jobs[i].queue_id)
        # Only a job RabbitMQ delivered before can have been committed already (the ack was
        # lost): those are looked up here, before parsing. Any other repeat still meets the
        # receipt's unique key at the commit, and a missing file is looked up in _missing.
        done = self._already_handled(redelivered)
        for i, job in jobs.items():
            if job.queue_id in done:
                batch.outcomes[i] = Outcome.ack()  # a redelivery of work already committed
                self._remove_spool_file(job)
                metrics.record(SOURCE, "duplicate")
                continue
            result = self._read(i, job)
            if isinstance(result, Outcome):
                batch.outcomes[i] = result
            else:
                batch.prepared.append(result)
        if batch.prepared:
            # Handed to the parser, which reads and parses the files (in its own process
            # when there is one: this thread goes on with the next batch, and commit()
            # collects the result).
            batch.parsing = self.parser.submit_files([p.entry for p in batch.prepared], self.limits)
        return batch

    def _take_parsed(self, batch: "_Batch", results) -> None:
        """Keep what parsed; quarantine what was refused, with its reason."""
        kept = []
        for item, result in zip(batch.prepared, results):
            if result.missing:
                batch.outcomes[item.index] = self._missing(item.job, result.error)
                continue
            if result.unreadable:
                # One file that cannot be read (a folder, a FIFO, no permission) is that
                # message's outcome, never its batch's.
                batch.outcomes[item.index] = self._quarantine(
                    item.job, item.entry, f"spool file cannot be read: {result.error}")
                continue
            if result.email is None:
                batch.outcomes[item.index] = self._quarantine(item.job, item.entry, result.error)
                continue
            observe_parse(result.email, result.seconds, context=f"queue_id={item.job.queue_id}")
            item.parsed = result.email
            kept.append(item)
        batch.prepared = kept

    def commit(self, batch: "_Batch") -> list[Outcome]:
        """Stage two (disk): blobs, one transaction, spool cleanup."""
        if batch.parsing is not None:
            waited = time.perf_counter()
            parsed = self.parser.collect(batch.parsing)
            metrics.worker_wait_seconds.labels(self.queue, "parse").inc(time.perf_counter() - waited)
            self._take_parsed(batch, parsed)
        prepared, outcomes = batch.prepared, batch.outcomes
        # The raw sources are read from the spool files (parsing ran in a helper process) and
        # stored without their envelope records: the record stays in the spool and the row.
        stored = store_batch(self.store, [(None, p.parsed) for p in prepared],
                             [p.entry for p in prepared],
                             bodies=self.settings.body_storage == "storage")
        for item, files in zip(prepared, stored):
            item.files = files
        for item, routes in zip(prepared, self.router.route_many([p.job.rcpt_to for p in prepared])):
            item.routes = routes
        for index, outcome in self._commit(prepared).items():
            outcomes[index] = outcome
        for item in prepared:
            if outcomes[item.index].action == "ack":
                self.spool.release(item.entry)
        metrics.batch_seconds.labels(self.queue).observe(time.perf_counter() - batch.started)
        return outcomes  # type: ignore[return-value]

    def _already_handled(self, queue_ids: set[str]) -> set[str]:
        if not queue_ids:
            return set()
        with translated("looking up receipts"):
            query = InboundReceipt.select(InboundReceipt.queue_id).where(
                InboundReceipt.queue_id.in_(list(queue_ids)))
            return {row.queue_id for row in query}

    def _read(self, index: int, job: InboundJob) -> _Prepared | Outcome:
        try:
            entry = self.spool.entry(job)
        except PermanentError as exc:
            metrics.record(SOURCE, "failed")
            return Outcome.dead(str(exc))
        if len(job.rcpt_to) > self.limits.max_addresses:
            return self._quarantine(job, entry, f"{len(job.rcpt_to)} envelope recipients, over "
                                                f"the limit of {self.limits.max_addresses}")
        return _Prepared(index, job, entry, None)  # the parser reads it

    def _missing(self, job: InboundJob, error: str = "") -> Outcome:
        if self._already_handled({job.queue_id}):
            metrics.record(SOURCE, "duplicate")
            return Outcome.ack()  # stored before, and its file removed after that commit
        metrics.record(SOURCE, "failed")
        if job.in_segment:
            # A crash before the group's fdatasync: the sender got no 250 and sends it again.
            return Outcome.dead(f"spool record {job.spool_path}@{job.spool_offset} is not whole "
                                f"({error}): never accepted, never stored")
        return Outcome.dead(f"spool file {job.spool_path} is missing and was never stored")

    def _quarantine(self, job: InboundJob, entry: SpoolEntry, reason: str) -> Outcome:
        log.warning("queue_id=%s quarantined: %s", job.queue_id, reason)
        # The event first: if the database is down, the job is requeued with its file still
        # in place; a second quarantine of the same job is the same event, written once.
        outbox.write([outbox.NewEvent(outbox.QUARANTINED, job.queue_id, {
            "source": SOURCE, "queue_id": job.queue_id, "mail_from": job.mail_from,
            "rcpt_to": job.rcpt_to, "file": f"spool/failed/{entry.failed_name}", "reason": reason})])
        try:
            self.spool.quarantine_entry(entry, reason)
        except OSError as exc:  # the message's outcome stays the same; say where it is
            log.error("queue_id=%s cannot be moved to spool/failed: %s", job.queue_id, exc)
            reason = f"{reason} (left in {job.spool_path}: cannot move it: {exc.strerror})"
        metrics.record(SOURCE, "quarantined")
        return Outcome.dead(f"quarantined in spool/failed/{entry.failed_name}: {reason}")

    def _commit(self, prepared: list[_Prepared]) -> dict[int, Outcome]:
        if not prepared:
            return {}

        def fast() -> tuple[dict[int, Outcome], list[tuple]]:
            return {item.index: Outcome.ack() for item in prepared}, self._save_bulk(prepared)

        def one_by_one() -> tuple[dict[int, Outcome], list[tuple]]:
            # A queue id twice (a message stored meanwhile is only a duplicate), or a value
            # the database refuses: found here, and only that message is quarantined.
            outcomes, counts = {}, []
            for item in prepared:
                outcomes[item.index], item_counts = self._save_one(item)
                counts.extend(item_counts)
            return outcomes, counts

        outcomes, counts = commit_batch("committing a batch", fast=fast, one_by_one=one_by_one)
        for count in counts:  # (outcome, number[, kind])
            metrics.record(SOURCE, *count)
        return outcomes

    def _save_bulk(self, prepared: list[_Prepared]) -> list[tuple]:
        routed = [item for item in prepared if item.routes]
        results = save_many([SaveRequest(item.parsed, item.files, item.routes, SOURCE,
                                         item.job.envelope()) for item in routed])
        counts, receipts, now = [], [], utcnow()
        for item, result in zip(routed, results):
            outcome, result_counts = _outcome_of(result)
            counts.extend(result_counts)
            receipts.append((item.job.queue_id, outcome, len(result.stored), now, self.settings.node))
        unrouted = [item for item in prepared if not item.routes]
        for item in unrouted:
            self._log_unrouted(item)
            counts.append(("unrouted", 1))
            receipts.append((item.job.queue_id, "unrouted", 0, now, self.settings.node))
        if unrouted:
            bulk_insert(UnroutedMessage, [self._unrouted_row(item) for item in unrouted])
            outbox.add([_unrouted_event(item) for item in unrouted])
        insert_rows(InboundReceipt, RECEIPT_COLUMNS, receipts)
        return counts

    @staticmethod
    def _unrouted_row(item: _Prepared) -> dict:
        job, parsed = item.job, item.parsed
        return {"queue_id": job.queue_id, "message_id": parsed.message_id,
                "mail_from": job.mail_from, "rcpt_to": job.rcpt_to,
                "raw_path": item.files.raw_path, "sha256": parsed.sha256, "size": parsed.size}

    @staticmethod
    def _log_unrouted(item: _Prepared) -> None:
        log.warning("queue_id=%s message_id=%s unrouted: no user for %s",
                    item.job.queue_id, item.parsed.message_id, ", ".join(item.job.rcpt_to))

    def _save_one(self, item: _Prepared) -> tuple[Outcome, list[tuple]]:
        job = item.job
        try:
            with db.atomic():  # savepoint: this message alone rolls back on error
                if not item.routes:
                    outcome, counts, stored_count = "unrouted", [("unrouted", 1)], 0
                    UnroutedMessage.create(**self._unrouted_row(item))
                    outbox.add([_unrouted_event(item)])
                    self._log_unrouted(item)
                else:
                    result = save_for_users(item.parsed, item.files, item.routes, source=SOURCE,
                                            envelope=job.envelope())
                    outcome, counts = _outcome_of(result)
                    stored_count = len(result.stored)
                InboundReceipt.create(queue_id=job.queue_id, outcome=outcome,
                                      stored_count=stored_count, node=self.settings.node)
        except peewee.IntegrityError:
            # The same queue id twice in flight (a sweep republished it): already handled.
            return Outcome.ack(), [("duplicate", 1)]
        except UNAVAILABLE:
            raise  # the batch's, not this message's
        except (peewee.PeeweeException, ValueError) as exc:
            # The database refused this message (DataError, a NUL psycopg2 will not send):
            # its outcome alone; the message waits in spool/failed for a person.
            reason = f"the database refused it: {type(exc).__name__}: {exc}"[:500]
            return self._quarantine(job, item.entry, reason), []  # counted there
        return Outcome.ack(), counts

    def _remove_spool_file(self, job: InboundJob) -> None:
        try:
            self.spool.release(self.spool.entry(job))
        except PermanentError:
            pass


def _unrouted_event(item: _Prepared) -> outbox.NewEvent:
    job = item.job
    return outbox.NewEvent(outbox.UNROUTED, job.queue_id, {
        "queue_id": job.queue_id, "message_id": item.parsed.message_id,
        "mail_from": job.mail_from, "rcpt_to": job.rcpt_to, "size": item.parsed.size})


def _outcome_of(result: SaveResult) -> tuple[str, list[tuple]]:
    """A routed message's receipt outcome and its metric counts: stored for the users who got
    it, duplicate for those who had it already."""
    if not result.stored:
        return "duplicate", [("duplicate", result.duplicates, result.kind)]
    counts = [("stored", len(result.stored), result.kind)]
    if result.duplicates:
        counts.append(("duplicate", result.duplicates, result.kind))
    return "stored", counts
