"""The scheduler lease: one row per name; whoever holds an unexpired lease is the one that acts.

Taking or renewing is one conditional UPDATE (ours, or expired), and the first ever take is
an INSERT that the primary key lets only one process win. A holder that dies stops renewing;
after ``seconds`` a standby's UPDATE succeeds and it takes over. Expiry times come from the
processes' clocks, which are assumed to agree to well under ``seconds``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import uuid

import peewee

from mailferry import metrics
from mailferry.db import UNAVAILABLE, translated
from mailferry.models import SchedulerLease, db, utcnow

log = logging.getLogger(__name__)

DEFAULT_NAME = "scheduler"


def make_holder() -> str:
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    def __init__(self, seconds: int, *, name: str = DEFAULT_NAME, holder: str | None = None):
        self.seconds = seconds
        self.name = name
        self.holder = holder or make_holder()
        self.expires_at: dt.datetime | None = None  # of our lease, while we believe we hold it

    def acquire(self) -> bool:
        """Take the lease if it is free or expired, renew it if ours; True if we hold it now."""
        now = utcnow()
        expires = now + dt.timedelta(seconds=self.seconds)
        try:
            changed = (SchedulerLease
                       .update(holder=self.holder, expires_at=expires, renewed_at=now)
                       .where(SchedulerLease.name == self.name,
                              (SchedulerLease.holder == self.holder) | (SchedulerLease.expires_at < now))
                       .execute())
            if not changed:
                try:
                    with db.atomic():
                        SchedulerLease.create(name=self.name, holder=self.holder,
                                              expires_at=expires, renewed_at=now)
                    changed = 1
                except peewee.IntegrityError:
                    changed = 0  # somebody holds it
        except UNAVAILABLE:
            self._lost()  # then translated, as everywhere
            with translated(f"lease {self.name}"):
                raise
        if changed:
            if self.expires_at is None:
                log.info("lease %s taken by %s", self.name, self.holder)
            self.expires_at = expires
            metrics.scheduler_lease_held.set(1)
            return True
        self._lost()
        return False

    def held(self, margin: float = 0.0) -> bool:
        """Whether our lease is still valid for at least ``margin`` seconds (no query)."""
        return self.expires_at is not None and (
            utcnow() + dt.timedelta(seconds=margin) < self.expires_at)

    def current_holder(self) -> str | None:
        row = SchedulerLease.get_or_none(SchedulerLease.name == self.name)
        return row.holder if row is not None and row.expires_at >= utcnow() else None

    def release(self) -> None:
        """Give the lease up at shutdown so a standby takes over at once."""
        if self.expires_at is None:
            return
        try:
            (SchedulerLease.update(expires_at=utcnow() - dt.timedelta(seconds=1))
             .where(SchedulerLease.name == self.name, SchedulerLease.holder == self.holder)
             .execute())
            log.info("lease %s released by %s", self.name, self.holder)
        except UNAVAILABLE as exc:
            log.warning("lease %s: could not release (it expires by itself): %s", self.name, exc)
        self.expires_at = None
        metrics.scheduler_lease_held.set(0)

    def _lost(self) -> None:
        if self.expires_at is not None:
            log.warning("lease %s no longer held by %s", self.name, self.holder)
        self.expires_at = None
        metrics.scheduler_lease_held.set(0)
