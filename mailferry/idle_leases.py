"""Which consumer holds which mailbox in IDLE: a lease per mailbox in the database, renewed
by its holder, so mailboxes move when a consumer dies and spread when one is added.

Each IDLE lane, every time it reads the mailbox list (``consumer.imap_idle``), calls
``balance``: it renews its own leases, counts the consumers holding any (itself included),
(each renews its presence, ``IdleHolder``, with its leases, so a consumer that holds
nothing yet counts), and aims at its fair share of the mailboxes that want IDLE, at most
``limit``. Over its share
it lets the highest user ids go; under it, it takes free or expired leases, lowest ids first.
A consumer that dies stops renewing: its leases expire after ``seconds``, and the others take
them at their next reading. A consumer that stops lets its leases go at once.

Taking a lease is one conditional upsert (insert, or take over if expired or already ours),
so two consumers never both win a mailbox. Expiry times come from the processes' clocks,
which are assumed to agree to well under ``seconds`` (as for the scheduler's lease).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import socket
import uuid
from dataclasses import dataclass

from mailferry.models import IdleHolder, IdleLease, db, utcnow

CHUNK = 500  # ids per statement


def holder_name() -> str:
    """This process, uniquely: host, pid and a random part (a pid is reused after a restart)."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Balance:
    held: set[int]  # the user ids this holder holds now
    taken: int
    released: int
    holders: int  # consumers holding leases, this one included


def balance(holder: str, wanted: list[int], *, seconds: int, limit: int) -> Balance:
    """Renew, let go and take leases so that ``holder`` holds its share of ``wanted``."""
    now = utcnow()
    expires = now + dt.timedelta(seconds=seconds)
    wanted = sorted(set(wanted))
    with db.atomic():
        (IdleHolder.insert(holder=holder, expires_at=expires)
         .on_conflict(conflict_target=[IdleHolder.holder], update={IdleHolder.expires_at: expires})
         .execute())
        IdleLease.update(expires_at=expires).where(IdleLease.holder == holder).execute()
        mine = set(_ids(IdleLease.holder == holder))
        others = set(_ids((IdleLease.expires_at > now) & (IdleLease.holder != holder)))
        holders = IdleHolder.select().where(IdleHolder.expires_at > now).count()
        IdleHolder.delete().where(IdleHolder.expires_at < now - dt.timedelta(seconds=seconds)).execute()
    gone = mine - set(wanted)  # no longer set to IDLE
    share = min(limit, math.ceil(len(wanted) / holders)) if wanted else 0
    keep = sorted(mine - gone)
    released = gone | set(keep[share:])  # over the share: the highest ids go
    release(holder, released)
    held = set(keep[:share])
    taken = 0
    if len(held) < share:
        for user_id in wanted:
            if len(held) >= share:
                break
            if user_id in held or user_id in others:
                continue  # held by a live consumer: asking would only lose
            if _take(holder, user_id, now, expires):
                held.add(user_id)
                taken += 1
    return Balance(held, taken, len(released), holders)


def release(holder: str, user_ids=None) -> None:
    """Let ``user_ids`` go (every lease of ``holder`` if None): another consumer may take them."""
    if user_ids is None:
        with db.atomic():
            IdleLease.delete().where(IdleLease.holder == holder).execute()
            IdleHolder.delete().where(IdleHolder.holder == holder).execute()
        return
    ids = sorted(user_ids)
    for start in range(0, len(ids), CHUNK):
        IdleLease.delete().where((IdleLease.holder == holder)
                                 & IdleLease.user.in_(ids[start:start + CHUNK])).execute()


def _take(holder: str, user_id: int, now: dt.datetime, expires: dt.datetime) -> bool:
    """Take ``user_id``'s lease if nobody holds it, or its holder let it expire."""
    (IdleLease.insert(user=user_id, holder=holder, expires_at=expires)
     .on_conflict(conflict_target=[IdleLease.user],
                  update={IdleLease.holder: holder, IdleLease.expires_at: expires},
                  where=(IdleLease.expires_at < now) | (IdleLease.holder == holder))
     .execute())
    row = IdleLease.get_or_none(IdleLease.user == user_id)
    return row is not None and row.holder == holder


def _ids(condition) -> list[int]:
    return [row.user_id for row in IdleLease.select(IdleLease.user).where(condition)]
