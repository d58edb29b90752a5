"""Saving: parsed messages, for each of their users, as rows and content-addressed files.

Files go to storage (durably) before the transaction that references them, so a committed
row always points at a file; an aborted transaction leaves at most an unreferenced file,
which is harmless (the same bytes will be stored under the same name again). The unique key
(user, message_id) makes a repeat a counted duplicate, not a second copy.

Two ways to save, same result: ``save_many`` inserts a whole batch with a few statements
(the fast path), ``save_for_users`` one message at a time inside a savepoint (the fallback
when the batch meets a race, and for callers with a single message).
"""

from __future__ import annotations

import logging
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import peewee

from consumer.parse import Limits, ParsedEmail, parse_email
from consumer.route import Route
from mailferry import metrics
from mailferry.db import bulk_insert
from mailferry.errors import TransientError
from mailferry.models import EmailAttachment, EmailMessage, db, utcnow
from mailferry.storage import Blob, BlobStore

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^\w.\- ()\[\]@+,=]+", re.UNICODE)


@dataclass
class StoredFiles:
    raw_path: str
    attachment_paths: list[tuple[str, str]]  # (relative path, sha256), one per attachment


@dataclass
class SaveResult:
    stored: list[int]  # EmailMessage ids
    duplicates: int


def parse_logged(raw: bytes, limits: Limits, *, context: str) -> ParsedEmail:
    """Parse ``raw``, timing it and logging its warnings with ``context`` ("queue_id=…").

    Raises EmailParseError: the caller quarantines the message.
    """
    started = time.perf_counter()
    parsed = parse_email(raw, limits)
    observe_parse(parsed, time.perf_counter() - started, context=context)
    return parsed


def observe_parse(parsed: ParsedEmail, seconds: float, *, context: str) -> None:
    """The metric and the warning lines of one parse (also of one done in a helper process)."""
    metrics.parse_seconds.observe(seconds)
    for warning in parsed.warnings:
        log.warning("%s message_id=%s: %s", context, parsed.message_id, warning)


def store_batch(store: BlobStore, items: list[tuple[bytes, ParsedEmail]],
                raw_sources: list[Path | None] | None = None) -> list[StoredFiles]:
    """``store_files_many`` with storage errors translated to TransientError."""
    try:
        return store_files_many(store, items, raw_sources)
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
                     raw_sources: list[Path | None] | None = None) -> list[StoredFiles]:
    """Store the raw sources and attachments of a batch with one durability barrier.

    ``raw_sources`` may give, per item, a durable file holding the raw source (a spool
    file): it is linked into storage rather than written again.
    """
    blobs: list[Blob] = []
    for index, (raw, parsed) in enumerate(items):
        source = raw_sources[index] if raw_sources else None
        blobs.append(Blob(raw, parsed.sha256, source, raw=True))
        blobs.extend(Blob(a.data) for a in parsed.attachments)
    paths = iter(store.put_many(blobs))
    out = []
    for _, parsed in items:
        raw_path = next(paths)[0]
        out.append(StoredFiles(raw_path, [next(paths) for _ in parsed.attachments]))
    return out


def save_many(requests: list[SaveRequest]) -> list[SaveResult]:
    """Insert a batch in a few statements; call inside a transaction.

    Duplicates (already stored, or twice in this batch) are found with one query first.
    A unique-key race with another consumer raises IntegrityError: the caller rolls back to
    its savepoint and saves the batch message by message instead.
    """
    message_ids = sorted({r.parsed.message_id for r in requests})
    user_ids = sorted({route.user_id for r in requests for route in r.routes})
    seen = _existing_keys(user_ids, message_ids)
    results = [SaveResult([], 0) for _ in requests]
    rows, owners = [], []
    now = utcnow()
    for index, request in enumerate(requests):
        for route in request.routes:
            key = (route.user_id, request.parsed.message_id)
            if key in seen:
                results[index].duplicates += 1
                continue
            seen.add(key)
            rows.append(_message_row(request, route, now))
            owners.append((index, key))
    if not rows:
        return results
    bulk_insert(EmailMessage, rows)
    new_ids = _message_ids(sorted({uid for _, (uid, _) in owners}),
                           sorted({mid for _, (_, mid) in owners}))
    attachments = []
    for index, key in owners:
        message_id = new_ids[key]
        results[index].stored.append(message_id)
        attachments.extend(_attachment_rows(message_id, key[0], requests[index].parsed,
                                            requests[index].files))
    bulk_insert(EmailAttachment, attachments)
    return results


def _existing_keys(user_ids: list[int], message_ids: list[str]) -> set[tuple[int, str]]:
    if not user_ids:
        return set()
    found = set()
    for chunk in peewee.chunked(message_ids, 500):
        query = (EmailMessage.select(EmailMessage.user, EmailMessage.message_id)
                 .where(EmailMessage.user.in_(user_ids), EmailMessage.message_id.in_(chunk)))
        found.update((row.user_id, row.message_id) for row in query)
    return found


def _message_ids(user_ids: list[int], message_ids: list[str]) -> dict[tuple[int, str], int]:
    found = {}
    for chunk in peewee.chunked(message_ids, 500):
        query = (EmailMessage.select(EmailMessage.id, EmailMessage.user, EmailMessage.message_id)
                 .where(EmailMessage.user.in_(user_ids), EmailMessage.message_id.in_(chunk)))
        found.update({(row.user_id, row.message_id): row.id for row in query})
    return found


def save_for_users(parsed: ParsedEmail, files: StoredFiles, routes: list[Route], *,
                   source: str, envelope: dict | None = None) -> SaveResult:
    """Insert the message for every routed user, one savepoint each; call inside a transaction."""
    request = SaveRequest(parsed, files, routes, source, envelope)
    result = SaveResult([], 0)
    for route in routes:
        try:
            with db.atomic():  # a savepoint: a duplicate for one user spares the others
                message = EmailMessage.create(**_message_row(request, route, utcnow()))
                rows = _attachment_rows(message.id, route.user_id, parsed, files)
                if rows:
                    EmailAttachment.insert_many(rows).execute()
        except peewee.IntegrityError:
            result.duplicates += 1
            continue
        result.stored.append(message.id)
    return result


def _message_row(request: SaveRequest, route: Route, now) -> dict:
    parsed, envelope = request.parsed, request.envelope
    return {
        "user": route.user_id,
        "message_id": parsed.message_id,
        "subject": parsed.subject,
        "sender": parsed.sender,
        "recipients": parsed.to,
        "cc": parsed.cc,
        "reply_to": parsed.reply_to,
        "sent_at": parsed.date,
        "received_at": now,
        "text_content": parsed.text,
        "html_content": parsed.html,
        "raw_path": request.files.raw_path,
        "size": parsed.size,
        "sha256": parsed.sha256,
        "source": request.source,
        "envelope": envelope,
        "queue_id": (envelope or {}).get("queue_id"),
        "plus_tag": route.tag,
        "in_reply_to": parsed.in_reply_to,
        "references": parsed.references,
        "status": "stored" if not parsed.warnings else "partial",  # see warnings in the log
        "created_at": now,
    }


def _attachment_rows(message_id: int, user_id: int, parsed: ParsedEmail, files: StoredFiles) -> list[dict]:
    rows = []
    for index, (attachment, (path, digest)) in enumerate(zip(parsed.attachments, files.attachment_paths)):
        rows.append({
            "user": user_id,
            "email_message": message_id,
            "filename": attachment.filename,
            "safe_filename": safe_filename(attachment.filename, index, attachment.content_type),
            "content_type": attachment.content_type,
            "file_size": attachment.size,
            "file_path": path,
            "sha256": digest,
            "is_image": attachment.is_image,
            "is_inline": attachment.is_inline,
            "content_id": attachment.content_id,
        })
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
