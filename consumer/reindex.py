"""Backfill: what ``mailread.understand`` makes of mail stored before it existed.

A row whose ``thread_id`` is null has not been read yet. Rows are read oldest first, in
batches, each batch committed on its own: a kill loses at most the batch in flight, and the
next run starts where this one stopped. Oldest first, so parents are mostly threaded before
their replies; the save path's thread moves take care of the rest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from consumer.save import understood_columns
from mailread.parse import parse_email
from mailferry.db import translated, write_transaction
from mailferry.models import EmailMessage
from mailferry.storage import BlobStore

log = logging.getLogger(__name__)

BATCH = 200


@dataclass
class Counts:
    read: int = 0
    unreadable: int = 0  # raw source gone (retention) or not parseable: thread only


def pending(user_id: int | None = None):
    query = EmailMessage.select().where(EmailMessage.thread_id.is_null())
    return query.where(EmailMessage.user == user_id) if user_id is not None else query


def reindex(store: BlobStore, user_id: int | None = None,
            progress: Callable[[int], None] = lambda n: None) -> Counts:
    counts = Counts()
    while True:
        with translated("reading a batch to reindex"):
            batch = list(pending(user_id).order_by(EmailMessage.received_at, EmailMessage.id)
                         .limit(BATCH))
        if not batch:
            return counts
        parsed = [_parse(store, row, counts) for row in batch]
        with write_transaction():
            for row, values in zip(batch, understood_columns(batch, parsed)):
                EmailMessage.update(**values).where(EmailMessage.id == row.id).execute()
        counts.read += len(batch)
        progress(len(batch))


def _parse(store: BlobStore, row: EmailMessage, counts: Counts):
    try:
        return parse_email(store.read_raw(row.raw_path))
    except Exception as exc:  # noqa: BLE001 - a missing file or hostile bytes: this row only
        log.warning("message %s: not read again (%s); threaded by its stored headers",
                    row.id, type(exc).__name__)
        counts.unreadable += 1
        return None
