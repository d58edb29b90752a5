"""The events outbox: rows written in the transaction that made the event happen, so an
event exists exactly when what it tells of was committed. The relay (``relay/``) publishes
them to ``mailferry.events`` and marks them published.

Each event's id is a UUID made from what happened (its type and the row it is about), so
the same happening written twice is one row, and one row published twice — the relay died
between the broker's confirm and its update — reaches every consumer under one id.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from mailferry.contracts import iso_utc
from mailferry.db import insert_rows, is_postgres, translated
from mailferry.models import Event, db, json_text, utcnow

STORED = "message.stored"
UNROUTED = "message.unrouted"
QUARANTINED = "message.quarantined"
TASK_FAILED = "task.failed"
BOUNCED = "message.bounced"
TYPES = (STORED, UNROUTED, QUARANTINED, TASK_FAILED, BOUNCED)

# Fixed for ever: changing it would give every future event a new id.
_NAMESPACE = uuid.UUID("6f1d3c1e-8d1b-4c55-9d0e-5a2f0c7b9e41")
_COLUMNS = ("event_id", "type", "user", "data", "created_at")


def event_id(type_: str, key: object) -> str:
    """The stable id of the event ``type_`` about ``key`` (a row id, a queue id, a task id)."""
    return str(uuid.uuid5(_NAMESPACE, f"{type_}:{key}"))


@dataclass(frozen=True)
class NewEvent:
    type: str
    key: object  # what makes it this event and no other
    data: dict
    user_id: int | None = None


def add(events: list[NewEvent]) -> None:
    """Write ``events`` into the outbox; call inside the transaction of what they tell of.
    An event already there (the same type and key) is left as it is."""
    if not events:
        return
    now = utcnow()
    insert_rows(Event, _COLUMNS, [
        (event_id(e.type, e.key), e.type, e.user_id, json_text(e.data), now) for e in events
    ], skip_duplicates=True)


def write(events: list[NewEvent]) -> None:
    """``add`` in a transaction of its own: for an event nothing else is committed with (a
    quarantine moves a file, not a row)."""
    with translated("writing an event"), db.atomic():
        add(events)


def stored(messages: list[tuple[int, int, bool]]) -> list[NewEvent]:
    """``message.stored`` of each (message row id, user id, automatic): ``automatic`` lets
    the webhook worker leave such mail out (``webhook_automatic``) without reading the row."""
    return [NewEvent(STORED, message_id, {"message_id": message_id, "user_id": user_id,
                                          "automatic": automatic}, user_id)
            for message_id, user_id, automatic in messages]


def bounced(message_id: int, user_id: int, bounce: dict, original_id: int | None) -> NewEvent:
    """``message.bounced``: a delivery report or complaint, and the stored message it is
    about (``original``: its row id, when this user has it)."""
    return NewEvent(BOUNCED, message_id, {"message_id": message_id, "user_id": user_id,
                                          "original": original_id, **bounce}, user_id)


def envelope_of(event: Event) -> dict:
    """What is published and POSTed: the Standard Webhooks shape (type, timestamp, data) and
    the id, which becomes ``webhook-id``."""
    return {"id": event.event_id, "type": event.type,
            "timestamp": iso_utc(event.created_at, "milliseconds"),
            "data": event.data}


def pending(limit: int) -> list[Event]:
    """The oldest events not yet published."""
    return list(Event.select().where(Event.published_at.is_null()).order_by(Event.id).limit(limit))


@contextmanager
def claimed(limit: int) -> Iterator[list[Event]]:
    """The oldest events not yet published, held by this relay for the block, and marked
    published when the block ends without raising (after the broker took them).

    On PostgreSQL they are read ``FOR UPDATE SKIP LOCKED`` in a transaction that lasts the
    block: relays side by side (one per host) take disjoint batches, and a relay that dies
    mid-batch lets its rows go to the next. SQLite is one host and one relay: a plain read,
    so the consumers' commits never wait on a publish."""
    if not is_postgres():
        events = pending(limit)
        yield events
        mark_published([event.id for event in events])
        return
    with db.atomic():
        events = list(Event.select().where(Event.published_at.is_null()).order_by(Event.id)
                      .limit(limit).for_update(skip_locked=True))
        yield events
        mark_published([event.id for event in events])


def mark_published(ids: list[int]) -> None:
    if ids:
        Event.update(published_at=utcnow()).where(Event.id.in_(ids)).execute()


def backlog() -> int:
    return Event.select().where(Event.published_at.is_null()).count()
