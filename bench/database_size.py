"""Benchmark: what a stored message costs the database, with its bodies in its row
(``body_storage = database``, the default) and in storage (``body_storage = storage``).

Two sets, each saved both ways into its own PostgreSQL database through the consumer's save
path: the benchmark mix (``common.message_mix``) and the real corpus (../shared/corpus, which
has newsletters and HTML mail), the latter once for each of 10 users. The figure is the
``email_message`` table's bytes per message (heap, TOAST and indexes, after VACUUM FULL), and
the bytes the bodies add to storage (content-addressed: a body several users got is one
object). Figures hold on any machine; they depend on the mail.

    .venv/bin/python bench/database_size.py [--count 2000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import message_mix
from consumer.route import Route
from consumer.save import SaveRequest, save_many, store_files_many
from devstack import mailgen
from devstack.postgres import PostgresServer
from mailferry.config import Settings
from mailferry.db import close_database, open_database
from mailferry.errors import EmailParseError
from mailferry.models import db
from mailferry.storage import BlobStore
from mailferry.users import add_user
from mailread.parse import parse_email

USERS = 10  # the corpus's copies, one per user


def save_all(settings: Settings, raws: list[bytes], users: int, bodies: bool) -> int:
    """Save every readable message for ``users`` users; the UTF-8 bytes of their bodies."""
    store = BlobStore.of(settings)
    routes = [Route(add_user(f"user{n}@example.org").id, f"user{n}@example.org", None) for n in range(users)]
    first: dict[str, tuple] = {}
    for raw, parsed in readable_only(raws):
        first.setdefault(parsed.message_id, (raw, parsed))  # a Message-ID again is a duplicate
    readable = list(first.values())
    for start in range(0, len(readable), 128):
        items = readable[start:start + 128]
        files = store_files_many(store, items, bodies=bodies)
        with db.atomic():
            save_many([SaveRequest(p, f, routes, "smtp") for (_, p), f in zip(items, files)])
    return sum(len(p.text.encode()) + len(p.html.encode()) for _, p in readable)


def readable_only(raws: list[bytes]):
    """(raw, parse) of each message the parser takes (the corpus has one over the limits)."""
    for raw in raws:
        try:
            yield raw, parse_email(raw)
        except EmailParseError:
            continue


def table_bytes() -> tuple[int, int]:
    """email_message's bytes, and every table's (attachments, events, receipts…)."""
    db.execute_sql("VACUUM FULL")
    one = db.execute_sql("SELECT pg_total_relation_size('email_message')").fetchone()[0]
    every = db.execute_sql("SELECT sum(pg_total_relation_size(relid)) FROM pg_stat_user_tables").fetchone()[0]
    return one, int(every)


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def measure(postgres: PostgresServer, tmp: Path, name: str, raws: list[bytes], users: int) -> dict:
    out = {}
    for where in ("database", "storage"):
        settings = Settings(var_dir=tmp / f"{name}-{where}", body_storage=where,
                            database_url=postgres.create_database(f"{name}_{where}"))
        open_database(settings.resolved_database_url)
        try:
            body_bytes = save_all(settings, raws, users, where == "storage")
            rows = db.execute_sql('SELECT count(*) FROM "email_message"').fetchone()[0]
            out[where] = (rows, table_bytes(), folder_bytes(settings.resolved_storage_dir))
            out["bodies"] = body_bytes * users / rows
        finally:
            close_database()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    sets = [("mix", message_mix(args.count), 1),
            ("corpus", [p.read_bytes() for p in mailgen.corpus_files()], USERS)]
    with tempfile.TemporaryDirectory(prefix="mf-bench-dbsize-") as tmp:
        tmp = Path(tmp)
        postgres = PostgresServer(tmp / "postgres").start()
        try:
            for name, raws, users in sets:
                found = measure(postgres, tmp, name, raws, users)
                (rows, (in_row, all_in), files), (_, (out_row, all_out), files_out) = \
                    found["database"], found["storage"]
                print(f"{name}: {rows} rows ({len(raws)} messages x {users} users); bodies "
                      f"{found['bodies']:,.0f} bytes a message (UTF-8, before compression)")
                print(f"  email_message, bodies in the row:  {in_row / rows:,.0f} bytes a message "
                      f"(every table: {all_in / rows:,.0f})")
                print(f"  email_message, bodies in storage:  {out_row / rows:,.0f} bytes a message "
                      f"({out_row / in_row:.2f} x; every table: {all_out / rows:,.0f})")
                print(f"  storage added by the bodies:       {(files_out - files) / rows:,.0f} bytes a message")
        finally:
            postgres.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
