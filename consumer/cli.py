"""The consumer's commands, registered with the ``mailferry`` CLI through the
``mailferry.commands`` entry point (pyproject.toml), so that the core imports no process:

- ``mailferry consumer``: run the consumer (as ``python -m consumer``);
- ``mailferry imap test EMAIL``: log in, open the folder read-only, report what is there;
- ``mailferry fetch EMAIL``: one IMAP fetch in the foreground, with a progress bar, for the
  first sync of a large mailbox;
- ``mailferry reindex [--user EMAIL]``: read mail stored before ``mailread.understand``
  existed (reply text, automatic, bounce, thread), resumable after a kill.
"""

from __future__ import annotations

import io
import sys
import time

from mailferry import tasks
from mailferry.cli.common import open_app
from mailferry.cli.imap import find_user
from mailferry.display import Progress
from mailferry.errors import PermanentError
from mailferry.mailbox_config import EmailConfigManager
from mailferry.models import TaskSource, TaskStatus

FOREGROUND_TIMEOUT = 6 * 3600  # seconds: a first sync of a big mailbox takes a while


def register(sub, groups: dict) -> None:
    cmd = sub.add_parser("consumer", help="run the consumer (same as python -m consumer)")
    cmd.set_defaults(func=lambda args: _run())

    cmd = groups["imap"].add_parser("test", help="log in, open the folder read-only, report what is there")
    cmd.add_argument("email")
    cmd.set_defaults(func=imap_test)

    cmd = sub.add_parser("fetch", help="fetch a user's IMAP mailbox now, in the foreground")
    cmd.add_argument("email")
    cmd.add_argument("--folder", help="default: the configured folder")
    cmd.add_argument("--timeout", type=int, default=FOREGROUND_TIMEOUT, metavar="SECONDS",
                     help=f"the task's timeout (default {FOREGROUND_TIMEOUT})")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    cmd.set_defaults(func=fetch_command)

    cmd = sub.add_parser("reindex", help="compute reply text, automatic, bounce and thread "
                                         "for mail stored before they existed (resumable)")
    cmd.add_argument("--user", metavar="EMAIL", help="only this user's mail")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    cmd.set_defaults(func=reindex_command)


def _run() -> int:
    from mailferry.starting import stop_while_starting
    stop_while_starting()  # before the process's imports: a stop while starting is a clean stop
    from consumer.main import main
    return main()


def imap_test(args) -> int:
    from consumer import imap_client  # here, not at import: every mailferry command loads this module
    from mailferry import oauth2
    settings = open_app()
    user = find_user(args.email)
    configs = EmailConfigManager(settings)
    config = configs.get_imap_config(user)
    started = time.perf_counter()
    # As a fetch logs in: with the password, or a live OAuth2 token (refreshed if need be).
    session = oauth2.login(imap_client.connect, config, user.id,
                           lambda: oauth2.TokenSource(configs), float(settings.imap_timeout))
    try:
        folder = session.select(config.folder, readonly=True)  # EXAMINE: changes nothing
    finally:
        session.close()
    wanted = (b"IDLE", b"CONDSTORE", b"MOVE", b"UIDPLUS", b"SPECIAL-USE")
    extras = [c.decode() for c in wanted if c in session.capabilities]
    login = f"OAuth2 {config.oauth2.get('mechanism', 'XOAUTH2')}" if config.oauth2 else "password"
    print(f"logged in to {config.host}:{config.port} as {config.username} ({config.security}, "
          f"{login}) in {time.perf_counter() - started:.2f} s")
    print(f"folder {folder.name}: {folder.exists} message(s), UIDVALIDITY {folder.uidvalidity}, "
          f"next UID {folder.uidnext if folder.uidnext is not None else '?'}")
    print(f"server offers: {', '.join(extras) or 'none of ' + ', '.join(c.decode() for c in wanted)}")
    return 0


def fetch_command(args) -> int:
    from consumer.imap_sync import MailboxSync  # the parser's import (flanker) is 0.3 s
    from consumer.imap_worker import run_fetch_task
    settings = open_app()
    user = find_user(args.email)
    configs = EmailConfigManager(settings)
    configs.get_imap_config(user)  # refuse early, before a task exists
    task = tasks.create_task(TaskSource.IMAP, user.id, timeout_seconds=args.timeout,
                             details={"origin": "cli"})
    if task.status == TaskStatus.SKIPPED:
        raise PermanentError(task.error_message)
    if tasks.start_task(task.task_id) is None:
        raise PermanentError(f"task {task.task_id} was ended before it started")
    bar = None if args.quiet else FetchProgress(Progress(sys.stderr))
    sync = MailboxSync(settings)
    try:
        status = run_fetch_task(task, args.folder, sync=sync, configs=configs,
                                progress=bar.update if bar else None)
    except KeyboardInterrupt:
        tasks.cancel_task(task.task_id, "interrupted by the operator (mailferry fetch)")
        print("\ninterrupted: committed batches are kept, the next fetch goes on from there",
              file=sys.stderr)
        return 130
    finally:
        sync.close()
        if bar:
            bar.close()
    done = tasks.get_task(task.task_id)
    print(f"task {done.task_id}: {done.status}; fetched {done.emails_fetched}, "
          f"saved {done.emails_saved}, failed {done.emails_failed}")
    if status != TaskStatus.COMPLETED:
        print(f"mailferry fetch: {done.error_message or status}", file=sys.stderr)
        return 1
    return 0


class FetchProgress:
    """The sync's progress callback, shown as one bar: messages fetched of those found new."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.saved = self.failed = 0

    def update(self, result, delta) -> None:
        if delta is None:  # the run's start: how many are new
            if not result.new:
                self.progress.note(f"{result.folder}: nothing new")
            self.progress.start(result.new)
            return
        self.saved += delta.saved
        self.failed += delta.failed
        self.progress.advance(delta.fetched, f"saved {self.saved}, failed {self.failed}")

    def close(self) -> None:
        self.progress.close()


def reindex_command(args) -> int:
    from consumer.reindex import pending, reindex
    from mailferry.storage import BlobStore
    settings = open_app()
    user_id = find_user(args.user).id if args.user else None
    progress = Progress(io.StringIO() if args.quiet else sys.stdout)
    progress.start(pending(user_id).count())
    try:
        counts = reindex(BlobStore.of(settings), user_id, progress.advance)
    finally:
        progress.close()
    print(f"reindexed {counts.read} messages ({counts.unreadable} without a readable source: "
          f"threaded by their stored headers)")
    return 0
