"""`mailferry storage migrate --to URL`: copy the stored raw sources and attachments into
another store (mailferry.storage_migrate), then say what the database points at that the
target lacks."""

from __future__ import annotations

import io
import sys

from mailferry.cli.common import open_app
from mailferry.display import Progress
from mailferry.errors import MailferryError
from mailferry.models import EmailAttachment, EmailMessage
from mailferry.storage import BlobStore, open_store


def register(sub) -> None:
    group = sub.add_parser("storage", help="where raw sources and attachments are kept").add_subparsers(
        dest="storage_command", metavar="COMMAND", required=True)
    migrate = group.add_parser(
        "migrate", help="copy every stored object to the store at URL (resumable; the current "
                        "store is only read, and stays in use until storage_url names the new one)")
    migrate.add_argument("--to", required=True, metavar="URL",
                         help="file:///PATH or s3://BUCKET/PREFIX (with the s3_* settings)")
    migrate.add_argument("--rate", type=float, default=0.0, metavar="N",
                         help="at most N objects a second (spare a store that serves traffic)")
    migrate.add_argument("--quiet", action="store_true", help="no progress output")
    migrate.set_defaults(func=migrate_command)


def migrate_command(args) -> int:
    from mailferry.storage_migrate import migrate, plan, unreferenced_in
    settings = open_app()
    source = BlobStore.of(settings)
    target = open_store(args.to, settings)
    if target.describe() == source.describe():
        raise MailferryError(f"--to names the store in use ({source.describe()})")
    print(f"from {source.describe()}\nto   {target.describe()}")
    todo, present = plan(source, target)
    print(f"{len(todo) + present} objects, {present} there already")
    progress = Progress(io.StringIO() if args.quiet else sys.stdout, unit="objects")
    progress.start(len(todo))
    try:
        summary = migrate(source, target, todo, progress=progress.advance, rate=args.rate)
    finally:
        progress.close()
    referenced = [key for m in EmailMessage.select(EmailMessage.raw_path, EmailMessage.text_path,
                                                   EmailMessage.html_path)
                  for key in m.storage_keys] + \
                 [a.file_path for a in EmailAttachment.select(EmailAttachment.file_path)]
    missing = unreferenced_in(target, sorted(set(referenced)))
    lost_before = set(unreferenced_in(source, missing))  # gone from the source too
    print(f"copied {summary.copied}; damaged {len(summary.damaged)}; gone before read "
          f"{len(summary.vanished)}; referenced by the database and in neither store "
          f"{len(lost_before)}")
    for key in summary.damaged[:20]:
        print(f"  damaged (does not hash to its name; not copied): {key}")
    for key in sorted(lost_before)[:20]:
        print(f"  in neither store: {key}")
    left = [key for key in missing if key not in lost_before]
    for key in left[:20]:
        print(f"  not copied yet: {key}")
    if summary.damaged or left:
        return 1
    print(f"done: set MAILFERRY_STORAGE_URL={args.to} (and the s3_* settings) and restart")
    return 0
