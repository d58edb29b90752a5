"""The IMAP worker: ``mailferry.imap_fetch`` jobs become RUNNING tasks whose mailbox is synced.

Per job: PENDING → RUNNING (a job whose task is no longer PENDING is acked and left alone),
the watchdog is published, the folder is synced (``consumer.imap_sync``) with network errors
retried with backoff, and the task ends COMPLETED or FAILED with counts and execution-log
lines. Between batches the worker checks that its task is still RUNNING: once the watchdog
cancelled it, the worker stops and leaves that outcome as it is.

The job itself is always acked: the task row, not the queue, records what happened, and the
scheduler makes the next task on its next tick.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from tenacity import (
    RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential,
)

from consumer.imap_sync import Counts, MailboxSync, Progress, SyncResult
from mailferry import broker, metrics, tasks
from mailferry.config import Settings
from mailferry.contracts import FetchJob
from mailferry.errors import (
    ContractError, EmailConfigError, MailferryError, PermanentError, TransientError,
)
from mailferry.mailbox_config import ALL_FOLDERS, EmailConfigManager
from mailferry.models import EmailTask, TaskSource, TaskStatus, User, utcnow
from consumer.handler import Delivery, Handler, Outcome

log = logging.getLogger(__name__)

FETCH_ATTEMPTS = 4  # syncs of one task, the first included, before it is FAILED
FETCH_BACKOFF = 2.0  # seconds before the first retry; doubles each time
FETCH_BACKOFF_MAX = 30.0  # seconds: with 4 attempts, well under the task timeout


class ImapFetchHandler(Handler):
    queue = broker.IMAP_FETCH
    # A fetch can take minutes: hold one job at a time so other consumers take the rest.
    prefetch = 1

    def __init__(self, settings: Settings, *, publisher=None, sync: MailboxSync | None = None,
                 configs: EmailConfigManager | None = None, backoff: float = FETCH_BACKOFF):
        self.settings = settings
        self.publisher = publisher or broker.Publisher(settings)
        self.sync = sync or MailboxSync(settings)
        self.configs = configs or EmailConfigManager(settings)
        self.backoff = backoff

    def handle(self, deliveries: list[Delivery]) -> list[Outcome]:
        return [self._one(delivery) for delivery in deliveries]

    def _one(self, delivery: Delivery) -> Outcome:
        started = time.perf_counter()
        try:
            job = FetchJob.from_body(delivery.body)
        except ContractError as exc:
            return Outcome.dead(f"malformed fetch job: {exc}")
        task = tasks.start_task(job.task_id)  # TransientError: the runner requeues the job
        if task is None:
            log.info("task=%s is no longer PENDING: job acked, nothing done", job.task_id)
            return Outcome.ack()
        if task.user_id != job.user_id:
            tasks.fail_task(job.task_id, f"fetch job names user {job.user_id}, "
                                         f"its task user {task.user_id}")
            return Outcome.ack()
        arm_watchdog(self.publisher, task)
        run_fetch_task(task, job.folder, sync=self.sync, configs=self.configs,
                       backoff=self.backoff, attempt_deadline=self.settings.imap_fetch_deadline)
        metrics.batch_seconds.labels(self.queue).observe(time.perf_counter() - started)
        return Outcome.ack()



def arm_watchdog(publisher, task: EmailTask) -> None:
    """Publish the watchdog of a task just started (by a fetch job or by the IDLE lane)."""
    try:
        tasks.publish_watchdog(publisher, task)
    except MailferryError as exc:
        # Without its watchdog the task is still ended by stale-task cleanup once past
        # timeout_at; not worth failing a fetch over.
        log.warning("task=%s: watchdog not published: %s", task.task_id, exc)
        tasks.add_execution_log(task.task_id, "watchdog", f"watchdog not published: {exc}",
                                "WARNING")


def run_fetch_task(task: EmailTask, folder: str | None, *, sync: MailboxSync,
                   configs: EmailConfigManager, backoff: float = FETCH_BACKOFF,
                   attempts: int = FETCH_ATTEMPTS, progress: Progress | None = None,
                   attempt_deadline: float | None = None) -> str:
    """Sync the mailbox of a RUNNING task and end it; return the task's final status.

    Each attempt ends by the task's timeout_at at the latest (its socket closed) and by
    ``attempt_deadline`` seconds when given: the worker gives ``imap_fetch_deadline``, so a
    slow server cannot hold a lane; `mailferry fetch` gives none (a long first sync).

    Used by the worker and by `mailferry fetch`. Counts go to the task after each committed
    batch, so they stay right whatever ends the run.
    """
    task_id = task.task_id
    user = User.get_or_none(User.id == task.user_id)
    if user is None or not user.is_active:
        return _fail(task_id, f"user {task.user_id} does not exist or is not active")
    try:
        config = configs.get_imap_config(user)
    except EmailConfigError as exc:
        return _fail(task_id, f"unusable IMAP configuration: {exc}")
    tasks.add_execution_log(task_id, "fetch", f"Email fetch started: user={user.email}, "
                            f"source={TaskSource.IMAP}, folder="
                            f"{','.join(config.folders) if config.folders else folder or config.folder}, "
                            f"server={config.host}:{config.port} ({config.security})")
    totals = Counts()

    def on_progress(result: SyncResult, delta: Counts | None) -> None:
        if delta is None:
            if result.refetch:
                tasks.add_execution_log(task_id, "uidvalidity", "UIDVALIDITY changed: fetching "
                                        "the folder again; stored messages are not stored twice",
                                        "WARNING")
            tasks.add_execution_log(task_id, "search", f"{result.new} new message(s) above UID "
                                    f"{result.last_uid} (UIDVALIDITY {result.uidvalidity})")
        else:
            totals.add(delta)
            tasks.add_counts(task_id, fetched=delta.fetched, saved=delta.saved, failed=delta.failed)
            tasks.add_execution_log(task_id, "batch", f"batch {result.batches}: fetched "
                                    f"{delta.fetched}, saved {delta.saved}, duplicates "
                                    f"{delta.duplicates}, failed {delta.failed}; checkpoint UID "
                                    f"{result.last_uid}",
                                    "WARNING" if delta.failed else "INFO")
        if progress is not None:
            progress(result, delta)

    def before_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0
        log.warning("task=%s user=%s: attempt %d failed (%s); retrying in %.1f s",
                    task_id, user.id, state.attempt_number, exc, wait)
        tasks.add_execution_log(task_id, "retry", f"attempt {state.attempt_number} of {attempts} "
                                f"failed: {exc}; retrying in {wait:.1f} s", "WARNING")

    retrying = Retrying(
        retry=retry_if_exception_type(TransientError), stop=stop_after_attempt(attempts),
        wait=_at_least_what_the_server_asked(wait_exponential(multiplier=backoff,
                                                              max=FETCH_BACKOFF_MAX)),
        before_sleep=before_retry, reraise=True, sleep=_sleep_unless_cancelled(task_id))
    results: list[SyncResult] = []
    try:
        for name in retrying(lambda: _folders_to_sync(sync, user, config, folder)):
            result = retrying(lambda: _sync_unless_cancelled(sync, user, config, name, task_id,
                                                             on_progress, attempt_deadline))
            if result is None or result.cancelled:
                log.info("task=%s ended by someone else (watchdog?): stopped, outcome kept", task_id)
                return tasks.get_task(task_id).status
            results.append(result)
    except PermanentError as exc:  # wrong password, missing folder, bad certificate …
        return _fail(task_id, str(exc))
    except TransientError as exc:
        return _fail(task_id, f"gave up after {attempts} attempts: {exc}")
    except Exception as exc:  # a bug: record it on the task before the job is acked
        log.exception("task=%s: unexpected error", task_id)
        return _fail(task_id, f"unexpected error: {exc!r}")
    if not results:
        return _fail(task_id, "no folder to sync: the server lists none that is not excluded")
    first = results[0]  # the folder the task's details name (the only one, unless `folders`)
    seconds = sum(r.seconds for r in results)
    skipped = [s for r in results for s in r.skipped]
    tasks.add_execution_log(task_id, "complete",
                            f"Email fetch completed: user={user.email}, source={TaskSource.IMAP}, "
                            f"count={totals.saved} (fetched {totals.fetched}, duplicates "
                            f"{totals.duplicates}, failed {totals.failed}, in {seconds:.1f} s)")
    for reason in (r for each in results for r in each.action_errors):
        tasks.add_execution_log(task_id, "after_fetch", reason, "WARNING")
    if skipped:
        tasks.add_execution_log(task_id, "skipped", f"{len(skipped)} message(s) left on "
                                f"the server: " + "; ".join(skipped[:20]), "WARNING")
    details = {**(task.details or {}), "folder": first.folder, "uidvalidity": first.uidvalidity,
               "last_uid": first.last_uid, "duplicates": totals.duplicates,
               "refetch": any(r.refetch for r in results), "skipped": skipped[:100]}
    if len(results) > 1:
        details["folders"] = {r.folder: {"uidvalidity": r.uidvalidity, "last_uid": r.last_uid,
                                         "fetched": r.fetched} for r in results}
    if not tasks.update_status(task_id, TaskStatus.COMPLETED, details=details):
        return tasks.get_task(task_id).status
    return TaskStatus.COMPLETED


def _at_least_what_the_server_asked(wait):
    """``wait``, or longer when the error carries the server's ``retry_after`` (throttling)."""
    def waited(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        asked = getattr(exc, "retry_after", None) or 0.0
        return max(wait(state), asked)
    return waited


def _folders_to_sync(sync: MailboxSync, user: User, config, folder: str | None) -> list[str]:
    """The configured folders (all but the excluded ones for "*"), else the job's folder,
    else the configured one."""
    if config.folders == (ALL_FOLDERS,):
        return sync.folders(user, config)
    if config.folders:
        return list(config.folders)
    return [folder or config.folder]


def _sync_unless_cancelled(sync: MailboxSync, user: User, config, folder: str, task_id: str,
                           progress: Progress, attempt_deadline: float | None) -> SyncResult | None:
    if not tasks.is_active(task_id):
        return None  # cancelled while we waited to retry
    # The watchdog only marks the row at timeout_at; the connection must not outlive it.
    task = tasks.get_task(task_id)
    limits = [attempt_deadline] if attempt_deadline else []
    if task is not None and task.timeout_at is not None:
        limits.append((task.timeout_at - utcnow()).total_seconds())
    return sync.run(user, config, folder, keep_going=lambda: tasks.is_active(task_id),
                    progress=progress, deadline=min(limits) if limits else None)


def _sleep_unless_cancelled(task_id: str) -> Callable[[float], None]:
    def sleep(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and tasks.is_active(task_id):
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    return sleep


def _fail(task_id: str, reason: str) -> str:
    log.warning("task=%s failed: %s", task_id, reason)
    if tasks.fail_task(task_id, reason):
        return TaskStatus.FAILED
    return tasks.get_task(task_id).status


def build_handlers(settings: Settings) -> list:
    """``imap_lanes`` handlers of the fetch queue, each its own channel and worker thread:
    one slow server holds up one lane, and the other mailboxes are fetched meanwhile."""
    return [ImapFetchHandler(settings) for _ in range(settings.imap_lanes)]
