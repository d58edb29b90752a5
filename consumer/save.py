"""Saving: parsed messages, for each of their users, as rows and content-addressed files.

Files go to storage (durably) before the transaction that references them, so a committed
row always points at a file; an aborted transaction leaves at most an unreferenced file,
which is harmless (the same bytes will be stored under the same name again). The unique key
(user, message_id) makes a repeat a counted duplicate, not a second copy.

Two ways to save, same result: ``save_many`` inserts a whole batch with a few statements
(the fast path), ``save_for_users`` one message at a time inside a savepoint (the fallback
when a batch fails, and for callers with a single message).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable, TypeVar
from pathlib import Path

import peewee

from mailread.parse import ParsedEmail
from consumer.route import Route, Router
from consumer.threads import Wanted, assign
from mailread.thread import ThreadKeys, thread_keys
from mailferry import metrics, outbox
from mailferry.db import UNDERSTOOD_COLUMNS, insert_rows, translated, write_transaction
from mailferry.errors import TransientError
from mailferry.models import EmailAttachment, EmailMessage, db, json_text, utcnow
from mailferry.storage import Blob, BlobStore

log = logging.getLogger(__name__)
R = TypeVar("R")

_UNSAFE = re.compile(r"[^\w.\- ()\[\]@+,=]+", re.UNICODE)


@dataclass
class StoredFiles:
    raw_path: str
    attachment_paths: list[tuple[str, str]]  # (relative path, sha256), one per attachment
    body_paths: tuple[str | None, str | None] = (None, None)  # text, html (body_storage = storage)


@dataclass
class SaveResult:
    stored: list[int]  # EmailMessage ids
    duplicates: int
    kind: str = "unknown"  # the message's, for counting: person, auto_reply, bulk, bounce, complaint


def observe_parse(parsed: ParsedEmail, seconds: float, *, context: str) -> None:
    """The metric and the warning lines of one parse (also of one done in a helper process)."""
    metrics.parse_seconds.observe(seconds)
    for warning in parsed.warnings:
        log.warning("%s message_id=%s: %s", context, parsed.message_id, warning)


def store_batch(store: BlobStore, items: list[tuple[bytes, ParsedEmail]],
                raw_sources: list | None = None, *, bodies: bool = False) -> list[StoredFiles]:
    """``store_files_many`` with storage errors translated to TransientError."""
    try:
        return store_files_many(store, items, raw_sources, bodies=bodies)
    except OSError as exc:
        raise TransientError(f"cannot write to storage: {exc.strerror}") from exc


@dataclass
class SaveRequest:
    parsed: ParsedEmail
    files: StoredFiles
    routes: list[Route]
    source: str
    envelope: dict | None = None


def store_files(store: BlobStore, raw: bytes, parsed: ParsedEmail) -> StoredFiles:
    return store_files_many(store, [(raw, parsed)])[0]


def store_files_many(store: BlobStore, items: list[tuple[bytes, ParsedEmail]],
                     raw_sources: list | None = None, *, bodies: bool = False) -> list[StoredFiles]:
    """Store the raw sources and attachments of a batch with one durability barrier.

    ``raw_sources`` may give, per item, the spool entry (``mailferry.spool.SpoolEntry``)
    holding the raw source behind its envelope record: the message alone is read from it and
    stored. ``bodies``: the text and HTML bodies too, as UTF-8 objects (an empty one is not
    stored), so that the row keeps only their keys.
    """
    blobs: list[Blob] = []
    for index, (raw, parsed) in enumerate(items):
        source = raw_sources[index] if raw_sources else None
        blobs.append(Blob(raw, parsed.sha256, source, raw=True))
        blobs.extend(Blob(a.data) for a in parsed.attachments)
        if bodies:
            blobs.extend(Blob(body.encode("utf-8", "surrogatepass"))
                         for body in (parsed.text, parsed.html) if body)
    paths = iter(store.put_many(blobs))
    out = []
    for _, parsed in items:
        raw_path = next(paths)[0]
        files = StoredFiles(raw_path, [next(paths) for _ in parsed.attachments])
        if bodies:
            files.body_paths = tuple(next(paths)[0] if body else None
                                     for body in (parsed.text, parsed.html))
        out.append(files)
    return out


def save_many(requests: list[SaveRequest]) -> list[SaveResult]:
    """Insert a batch in a few statements; call inside a transaction.

    The unique key (user, message_id) tells what is new: one statement inserts the batch's
    messages, skips those already stored (before, or by another consumer meanwhile) and
    returns the ids of the rows it inserted. A message twice in the batch is skipped here.
    """
    results = [SaveResult([], 0, _kind(r.parsed)) for r in requests]
    pairs, owners, in_batch = [], [], set()
    now = utcnow()
    for index, request in enumerate(requests):
        for route in request.routes:
            key = (route.user_id, request.parsed.message_id)
            if key in in_batch:
                results[index].duplicates += 1
                continue
            in_batch.add(key)
            pairs.append((request, route))
            owners.append((index, key))
    rows = _rows(pairs, now)
    row_of = dict(zip((key for _, key in owners), rows))
    inserted = insert_rows(EmailMessage, MESSAGE_COLUMNS, rows, skip_duplicates=True,
                           returning=("id", "user", "message_id"))
    new_ids = {(user_id, message_id): id_ for id_, user_id, message_id in inserted}
    index_of = {key: index for index, key in owners}
    attachments = []
    for index, key in owners:
        message_id = new_ids.get(key)
        if message_id is None:  # stored before
            results[index].duplicates += 1
            continue
        results[index].stored.append(message_id)
        request = requests[index]
        attachments.extend(_attachment_values(message_id, key[0], request.parsed, request.files))
    insert_rows(EmailAttachment, ATTACHMENT_COLUMNS, attachments)
    outbox.add(_events([(id_, user_id, requests[index_of[(user_id, mid)]].parsed, row_of[(user_id, mid)])
                        for id_, user_id, mid in inserted]))
    return results


# What the database says when it refuses a batch for one of its messages: a key twice (in the
# batch, or committed meanwhile by another consumer), or a value it will not hold (DataError;
# psycopg2's ValueError for a NUL).
REFUSED = (peewee.IntegrityError, peewee.DataError, ValueError)


def commit_batch(what: str, *, fast: Callable[[], R], one_by_one: Callable[[], R],
                 then: Callable[[], None] = lambda: None) -> R:
    """The one save path: a batch's rows in one transaction.

    ``fast`` inserts the whole batch inside a savepoint; if the database refuses it
    (``REFUSED``), ``one_by_one`` does it again message by message, each in its own savepoint,
    so that only the message at fault is left out (its caller decides its outcome). ``then``
    adds what must commit with the batch (the inbound receipts are in ``fast``; the IMAP
    checkpoint is this). ``write_transaction`` keeps SQLite's writers fair; database errors
    that may pass become TransientError (``db.translated``) and the batch is retried whole.
    """
    with translated(what), write_transaction():
        try:
            with db.atomic():  # a savepoint around the fast path
                result = fast()
        except REFUSED:
            result = one_by_one()
        then()
    return result


def save_for_users(parsed: ParsedEmail, files: StoredFiles, routes: list[Route], *,
                   source: str, envelope: dict | None = None) -> SaveResult:
    """Insert the message for every routed user, one savepoint each; call inside a transaction."""
    request = SaveRequest(parsed, files, routes, source, envelope)
    result = SaveResult([], 0, _kind(parsed))
    for route in routes:
        try:
            with db.atomic():  # a savepoint: a duplicate for one user spares the others
                [row] = _rows([(request, route)], utcnow())
                [(message_id,)] = insert_rows(EmailMessage, MESSAGE_COLUMNS, [row],
                                              returning=("id",))
                insert_rows(EmailAttachment, ATTACHMENT_COLUMNS,
                            _attachment_values(message_id, route.user_id, parsed, files))
                outbox.add(_events([(message_id, route.user_id, parsed, row)]))
        except peewee.IntegrityError:
            result.duplicates += 1
            continue
        result.stored.append(message_id)
    return result


# The columns of a message row and of an attachment row, in the order of the tuples below.
MESSAGE_COLUMNS = (
    "user", "message_id", "subject", "sender", "recipients", "cc", "reply_to", "sent_at",
    "received_at", "text_content", "html_content", "text_path", "html_path", "raw_path", "size", "sha256", "source",
    "envelope", "queue_id", "plus_tag", "in_reply_to", "references", "status", "created_at",
    *UNDERSTOOD_COLUMNS,
)
ATTACHMENT_COLUMNS = (
    "user", "email_message", "filename", "safe_filename", "content_type", "file_size",
    "file_path", "sha256", "is_image", "is_inline", "content_id", "position", "enclosed_by",
)


def _rows(pairs: list[tuple[SaveRequest, Route]], now) -> list[tuple]:
    """The rows of (request, route) pairs, in order: their threads found together."""
    readings = _readings([Wanted(route.user_id, request.parsed.message_id, _keys(request.parsed))
                          for request, route in pairs], [request.parsed for request, _ in pairs])
    return [_message_values(request, route, now) + (*values[:4], json_text(values[4]), values[5])
            for (request, route), values in zip(pairs, readings)]


_AUTOMATIC = [MESSAGE_COLUMNS.index(c) for c in ("auto_reply", "bulk", "loop", "bounce")]


def _events(stored: list[tuple[int, int, ParsedEmail, tuple]]) -> list[outbox.NewEvent]:
    """``message.stored`` of each (row id, user id, parse, row), and ``message.bounced`` of
    the bounces, linked to the message they are about when this user has it."""
    events = outbox.stored([(id_, user_id, any(row[i] for i in _AUTOMATIC))
                            for id_, user_id, _, row in stored])
    for id_, user_id, parsed, _ in stored:
        bounce = parsed.understanding.bounce if parsed.understanding else None
        if bounce is not None:
            original = bounce.original_message_id and EmailMessage.get_or_none(
                (EmailMessage.user == user_id) & (EmailMessage.message_id == bounce.original_message_id))
            events.append(outbox.bounced(id_, user_id, bounce.as_dict(), original.id if original else None))
    return events


def understood_columns(rows: list[EmailMessage], parsed: list[ParsedEmail | None]) -> list[dict]:
    """The understanding columns of stored ``rows`` read again (``mailferry reindex``);
    a row whose source could not be read again (None) is threaded by its stored headers."""
    readings = _readings([Wanted(row.user_id, row.message_id, _keys(p) if p else
                                 thread_keys(row.in_reply_to, row.references or [], row.subject))
                          for row, p in zip(rows, parsed)], parsed)
    return [dict(zip(UNDERSTOOD_COLUMNS, values)) for values in readings]


def _readings(wanted: list[Wanted], parsed: list[ParsedEmail | None]) -> list[tuple]:
    """The values of UNDERSTOOD_COLUMNS for each message, in order (the bounce as a dict):
    their threads and loop verdicts found together, one lookup each for the batch."""
    threads = assign(wanted)
    return [_understood_values(p, thread, loop)
            for p, thread, loop in zip(parsed, threads, _looping(parsed))]


def _keys(parsed: ParsedEmail) -> ThreadKeys:
    if parsed.understanding is not None:
        return parsed.understanding.thread
    return thread_keys(parsed.in_reply_to, parsed.references, parsed.subject)


def _looping(messages: list[ParsedEmail | None]) -> list[bool]:
    """Loop verdicts: an X-Loop naming one of this installation's addresses (a user's, or an
    alias), or more Received lines than the limit."""
    readings = [m.understanding if m is not None else None for m in messages]
    named = {a for r in readings if r for a in r.automatic.loop_addresses}
    ours = set(Router().lookup(named)) if named else set()
    return [r is not None and r.automatic.loop(ours.__contains__) for r in readings]


def _kind(parsed: ParsedEmail) -> str:
    return parsed.understanding.kind if parsed.understanding else "unknown"


def _understood_values(parsed: ParsedEmail | None, thread: str, loop: bool) -> tuple:
    reading = parsed.understanding if parsed is not None else None
    if reading is None:  # hostile bytes defeated the reading; the message is stored all the same
        return (None, False, False, loop, None, thread)
    bounce = reading.bounce.as_dict() if reading.bounce else None
    return (reading.reply_text, reading.auto_reply, reading.bulk, loop, bounce, thread)


def _message_values(request: SaveRequest, route: Route, now) -> tuple:
    parsed, envelope = request.parsed, request.envelope
    text_path, html_path = request.files.body_paths
    return (
        route.user_id,
        parsed.message_id,
        parsed.subject,
        parsed.sender,
        json_text(parsed.to),
        json_text(parsed.cc),
        json_text(parsed.reply_to),
        parsed.date,
        now,
        "" if text_path else parsed.text,
        "" if html_path else parsed.html,
        text_path,
        html_path,
        request.files.raw_path,
        parsed.size,
        parsed.sha256,
        request.source,
        json_text(envelope),
        (envelope or {}).get("queue_id"),
        route.tag,
        parsed.in_reply_to,
        json_text(parsed.references),
        "stored" if not parsed.warnings else "partial",  # see warnings in the log
        now,
    )


def _attachment_values(message_id: int, user_id: int, parsed: ParsedEmail,
                       files: StoredFiles) -> list[tuple]:
    rows = []
    for index, (attachment, (path, digest)) in enumerate(zip(parsed.attachments, files.attachment_paths)):
        rows.append((
            user_id,
            message_id,
            attachment.filename,
            safe_filename(attachment.filename, index, attachment.content_type),
            attachment.content_type,
            attachment.size,
            path,
            digest,
            attachment.is_image,
            attachment.is_inline,
            attachment.content_id,
            index,
            attachment.enclosed_by,
        ))
    return rows


def safe_filename(name: str, index: int = 0, content_type: str = "") -> str:
    """A name fit to offer in a download: no path, no control characters, bounded length."""
    name = unicodedata.normalize("NFC", name or "")
    name = name.replace("\\", "/").split("/")[-1]  # the last path component only
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    name = _UNSAFE.sub("_", name).strip(" ._")
    if not name:
        name = f"attachment-{index + 1}{_extension_for(content_type)}"
    if len(name.encode("utf-8")) > 200:
        stem, dot, ext = name.rpartition(".")
        ext = ext[:16] if dot else ""
        stem = (stem if dot else name).encode("utf-8")[:180].decode("utf-8", "ignore")
        name = f"{stem}.{ext}" if ext else stem
    return name


def _extension_for(content_type: str) -> str:
    return {
        "message/rfc822": ".eml", "text/plain": ".txt", "text/html": ".html",
        "image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif",
        "application/pdf": ".pdf",
    }.get(content_type.split(";")[0].strip(), ".bin")
