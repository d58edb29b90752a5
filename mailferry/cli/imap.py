"""`mailferry imap set|show|test` (a user's mailbox configuration) and `mailferry fetch` (one
IMAP fetch in the foreground, with a progress bar: for the first sync of a large mailbox)."""

from __future__ import annotations

import getpass
import sys
import time

from mailferry.cli.common import open_app, print_json, print_table
from mailferry.users import normalise_address
from mailferry.errors import EmailConfigError, PermanentError
from mailferry.mailbox_config import DEFAULT_PORTS, SECURITY_CHOICES, EmailConfigManager
from mailferry.models import MailboxState, TaskSource, TaskStatus, User

FOREGROUND_TIMEOUT = 6 * 3600  # seconds: a first sync of a big mailbox takes a while


def register(sub) -> None:
    imap = sub.add_parser("imap", help="a user's IMAP mailbox: set, show, test").add_subparsers(
        dest="imap_command", required=True, metavar="ACTION")

    cmd = imap.add_parser("set", help="set the IMAP mailbox of user EMAIL (password from stdin)")
    cmd.add_argument("email")
    cmd.add_argument("--host", required=True)
    cmd.add_argument("--port", type=int, help="default: 993 for ssl, 143 otherwise")
    cmd.add_argument("--username", required=True)
    cmd.add_argument("--password-stdin", action="store_true",
                     help="read the password from stdin (prompted on a terminal); without it "
                          "the stored password is kept")
    cmd.add_argument("--security", choices=SECURITY_CHOICES, default="ssl")
    cmd.add_argument("--folder", default="INBOX")
    cmd.add_argument("--mark-seen", action="store_true",
                     help="set \\Seen on the server after saving (default: leave flags alone)")
    cmd.add_argument("--move-to", metavar="FOLDER", help="move messages there after saving")
    cmd.add_argument("--ca-file", metavar="PATH", help="CA bundle for a private certificate")
    cmd.set_defaults(func=imap_set)

    cmd = imap.add_parser("show", help="show the IMAP configuration and checkpoint (never the password)")
    cmd.add_argument("email")
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(func=imap_show)

    cmd = imap.add_parser("test", help="log in, open the folder read-only, report what is there")
    cmd.add_argument("email")
    cmd.set_defaults(func=imap_test)

    cmd = sub.add_parser("fetch", help="fetch a user's IMAP mailbox now, in the foreground")
    cmd.add_argument("email")
    cmd.add_argument("--folder", help="default: the configured folder")
    cmd.add_argument("--timeout", type=int, default=FOREGROUND_TIMEOUT, metavar="SECONDS",
                     help=f"the task's timeout (default {FOREGROUND_TIMEOUT})")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    cmd.set_defaults(func=fetch_command)


def find_user(email: str) -> User:
    user = User.get_or_none(User.email == normalise_address(email))
    if user is None:
        raise PermanentError(f"no user {email} (add one with `mailferry users add`)")
    return user


def read_password() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("IMAP password: ")
    return sys.stdin.readline().rstrip("\r\n")


def imap_set(args) -> int:
    settings = open_app()
    user = find_user(args.email)
    configs = EmailConfigManager(settings)
    if args.password_stdin:
        password = read_password()
    else:
        try:
            password = configs.get_imap_config(user).password
        except EmailConfigError:
            raise PermanentError("no stored password to keep: give --password-stdin") from None
    config = configs.set_imap_config(user, {
        "host": args.host, "port": args.port or DEFAULT_PORTS[args.security],
        "username": args.username, "password": password, "security": args.security,
        "folder": args.folder, "mark_seen": args.mark_seen, "move_to": args.move_to,
        "ca_file": args.ca_file})
    print(f"IMAP mailbox of {user.email}: {config.username}@{config.host}:{config.port} "
          f"({config.security}), folder {config.folder}; password stored encrypted")
    return 0


def imap_show(args) -> int:
    settings = open_app()
    user = find_user(args.email)
    config = EmailConfigManager(settings).get_imap_config(user)
    states = [{"folder": s.folder, "uidvalidity": s.uidvalidity, "last_uid": s.last_uid,
               "highestmodseq": s.highestmodseq, "last_fetch_at": s.last_fetch_at}
              for s in MailboxState.select().where(MailboxState.user == user).order_by(MailboxState.folder)]
    if args.json:
        print_json({"user": user.email, "imap_config": config.public(), "checkpoints": states})
        return 0
    print(f"user      {user.email}")
    for name, value in config.public().items():
        print(f"{name:<9} {'' if value is None else value}")
    if states:
        print()
        print_table(["FOLDER", "UIDVALIDITY", "LAST UID", "HIGHESTMODSEQ", "LAST FETCH"],
                    [[s["folder"], s["uidvalidity"], s["last_uid"], s["highestmodseq"],
                      s["last_fetch_at"]] for s in states])
    return 0


def imap_test(args) -> int:
    from consumer import imap_client
    settings = open_app()
    config = EmailConfigManager(settings).get_imap_config(find_user(args.email))
    started = time.perf_counter()
    session = imap_client.connect(config, float(settings.imap_timeout))
    try:
        folder = session.select(config.folder, readonly=True)  # EXAMINE: changes nothing
    finally:
        session.close()
    extras = [c.decode() for c in (b"CONDSTORE", b"MOVE", b"UIDPLUS") if c in session.capabilities]
    print(f"logged in to {config.host}:{config.port} as {config.username} ({config.security}) "
          f"in {time.perf_counter() - started:.2f} s")
    print(f"folder {folder.name}: {folder.exists} message(s), UIDVALIDITY {folder.uidvalidity}, "
          f"next UID {folder.uidnext if folder.uidnext is not None else '?'}")
    print(f"server offers: {', '.join(extras) or 'none of CONDSTORE, MOVE, UIDPLUS'}")
    return 0


def fetch_command(args) -> int:
    from consumer.imap_sync import MailboxSync
    from consumer.imap_worker import run_fetch_task
    from mailferry import tasks
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
    bar = None if args.quiet else ProgressBar(sys.stderr)
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


class ProgressBar:
    """One line on a terminal, redrawn; a line per tenth of the way otherwise."""

    WIDTH = 30

    def __init__(self, stream):
        self.stream = stream
        self.tty = stream.isatty()
        self.total = 0
        self.done = self.saved = self.failed = 0
        self.started = time.monotonic()
        self._last_tenth = -1

    def update(self, result, delta) -> None:
        if delta is None:
            self.total = result.new
            if not self.total:
                self.stream.write(f"{result.folder}: nothing new\n")
            return
        self.done += delta.fetched
        self.saved += delta.saved
        self.failed += delta.failed
        self._draw()

    def _draw(self) -> None:
        share = self.done / self.total if self.total else 1.0
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        filled = int(self.WIDTH * share)
        line = (f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total} "
                f"({share:4.0%}) saved {self.saved}, failed {self.failed}, {rate:.0f} msg/s")
        if self.tty:
            self.stream.write("\r" + line)
        elif int(share * 10) != self._last_tenth:
            self._last_tenth = int(share * 10)
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.total:
            self.stream.write("\n")
        self.stream.flush()
