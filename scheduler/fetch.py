"""One PENDING IMAP_EMAIL_FETCH task and one ``mailferry.imap_fetch`` job per active user with
a valid IMAP configuration (the seed's ``schedule_email_fetch``).

Built for many users: one query for the configurations, one for the live locks, chunked
inserts, one publisher. Tasks are committed before their jobs are published, so a worker
never receives a job for a task it cannot find; a task whose job could not be published is
cancelled at once, and one lost by a crash in between is ended by stale-task cleanup.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

import peewee

from mailferry import broker, metrics
from mailferry.config import Settings
from mailferry.contracts import FetchJob
from mailferry.db import translated
from mailferry.errors import EmailConfigError, MailferryError
from mailferry.mailbox_config import active_imap_configs, validate_imap_config
from mailferry.models import EmailTask, MailboxState, TaskSource, TaskStatus, utcnow
from mailferry.tasks import cancel_where, create_many

log = logging.getLogger(__name__)


@dataclass
class FetchSummary:
    users: int = 0  # active users with an email_config row
    invalid: int = 0  # of those, without a valid IMAP configuration
    scheduled: int = 0  # PENDING tasks whose job was published
    skipped: int = 0  # a task of the user was still in flight
    unpublished: int = 0  # cancelled because the broker refused or was unreachable
    idle: int = 0  # held in IDLE by a consumer and synced lately: not polled this tick
    errors: list[str] = field(default_factory=list)


def imap_folder(imap_config) -> str | None:
    """The folder to fetch if ``imap_config`` is valid (host, port, username, password), else None."""
    try:
        return validate_imap_config(imap_config).folder
    except EmailConfigError:
        return None


def held_in_idle(poll_interval: int) -> set[int]:
    """Users whose mailbox a consumer holds in IDLE (``idle_until`` ahead) and that were
    synced within ``poll_interval`` seconds: the poll leaves them to IDLE until then."""
    now = utcnow()
    return {user_id for (user_id,) in
            MailboxState.select(MailboxState.user)
            .where(MailboxState.idle_until > now,
                   MailboxState.last_fetch_at > now - dt.timedelta(seconds=poll_interval))
            .tuples()}


def fetchable_users() -> tuple[list[tuple[int, str]], int, int]:
    """([(user id, folder)], users with a config, invalid ones) in one query."""
    found, total = [], 0
    for user_id, imap_config in active_imap_configs():
        total += 1
        folder = imap_folder(imap_config)
        if folder is not None:
            found.append((user_id, folder))
    return found, total, total - len(found)


LEASE_CHECK_EVERY = 1_000  # publishes between lease renewals during a long fetch step


def schedule_imap_fetch(settings: Settings, publisher, still_ours=None) -> FetchSummary:
    """``still_ours()`` renews the scheduler's lease; publishing stops if it was lost."""
    summary = FetchSummary()
    with translated("scheduling IMAP fetches"):
        users, summary.users, summary.invalid = fetchable_users()
        idle = held_in_idle(settings.imap_idle_poll_interval)
        summary.idle = sum(1 for uid, _ in users if uid in idle)
        users = [(uid, folder) for uid, folder in users if uid not in idle]
        made = create_many(TaskSource.IMAP, [(uid, {"folder": folder}) for uid, folder in users],
                           timeout_seconds=settings.task_timeout)
    pending = [t for t in made if t.status == TaskStatus.PENDING]
    summary.skipped = len(made) - len(pending)
    published, why = _publish_jobs(pending, publisher, still_ours, summary)
    unsent = [t.task_id for t in pending[published:]]
    for chunk in peewee.chunked(unsent, 500):
        summary.unpublished += len(cancel_where(
            EmailTask.task_id.in_(chunk), f"fetch job not published: {why}",
            metric_reason="unpublished", only_from=(TaskStatus.PENDING,)))
    if summary.invalid:
        log.info("%d user(s) with an email_config but no valid IMAP configuration", summary.invalid)
    log.info("imap fetch: %d scheduled, %d skipped (task in flight), %d unpublished, %d held "
             "in IDLE", summary.scheduled, summary.skipped, summary.unpublished, summary.idle)
    return summary


def _publish_jobs(pending, publisher, still_ours, summary: FetchSummary) -> tuple[int, str]:
    """Publish in order; stop at the first broker failure or a lost lease. (published, why)"""
    key = broker.ROUTING_KEYS[broker.IMAP_FETCH]
    published = 0
    try:
        for task in pending:
            if (still_ours is not None and published and published % LEASE_CHECK_EVERY == 0
                    and not still_ours()):
                summary.errors.append("the scheduler lost its lease")
                log.warning("lease lost after %d of %d fetch jobs; the rest are cancelled",
                            published, len(pending))
                return published, "the scheduler lost its lease"
            job = FetchJob(task_id=task.task_id, user_id=task.user_id,
                           folder=task.details.get("folder") or "INBOX")
            publisher.publish(key, job.to_body(), message_id=task.task_id)
            published += 1
    except MailferryError as exc:  # broker gone or refusing: stop; the caller ends the rest
        summary.errors.append(str(exc))
        log.error("publishing fetch jobs stopped after %d of %d: %s", published, len(pending), exc)
        return published, "broker unavailable"
    finally:
        summary.scheduled = published
        metrics.fetch_jobs_published.inc(published)
    return published, ""
