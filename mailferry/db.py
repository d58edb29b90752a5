"""Opening the database and keeping its schema current.

The schema is versioned: ``MIGRATIONS`` is an ordered list, each step runs once, in one
transaction, recorded in ``schema_version``. Every process calls ``open_database`` at start,
so a later change of columns is one new step here, never a hand-run script.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
from pathlib import Path
from typing import Callable

import peewee
from playhouse.db_url import connect as url_connect
from playhouse.migrate import SchemaMigrator, migrate

from mailferry import models
from mailferry.errors import ConfigError, TransientError
from mailferry.models import clean_text, db

log = logging.getLogger(__name__)

# WAL lets readers (the CLI, metrics) run beside the writer; synchronous=FULL because a
# commit must survive a power cut: the broker message is acked right after it.
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "full",
    "busy_timeout": 30_000,
    "foreign_keys": 1,
}


def _v1_initial(database: peewee.Database) -> None:
    database.create_tables(models.ALL_MODELS, safe=True)


def _v2_attachment_nesting(database: peewee.Database) -> None:
    migrator = SchemaMigrator.from_database(database)
    columns = {c.name for c in database.get_columns(models.EmailAttachment._meta.table_name)}
    fields = models.EmailAttachment._meta.fields
    steps = [migrator.add_column(models.EmailAttachment._meta.table_name, name, fields[name])
             for name in ("position", "enclosed_by") if name not in columns]  # v1 made them
    migrate(*steps)


def _v3_events(database: peewee.Database) -> None:
    database.create_tables([models.Event, models.WebhookEndpoint, models.WebhookAttempt,
                            models.ApiToken], safe=True)  # v1 made them in a new database


def _v4_pending_actions(database: peewee.Database) -> None:
    table = models.MailboxState._meta.table_name
    if "pending_action" not in {c.name for c in database.get_columns(table)}:  # v1 made it
        migrate(SchemaMigrator.from_database(database).add_column(
            table, "pending_action", models.MailboxState._meta.fields["pending_action"]))


def _v5_idle_until(database: peewee.Database) -> None:
    table = models.MailboxState._meta.table_name
    if "idle_until" not in {c.name for c in database.get_columns(table)}:  # v1 made it
        migrate(SchemaMigrator.from_database(database).add_column(
            table, "idle_until", models.MailboxState._meta.fields["idle_until"]))


UNDERSTOOD_COLUMNS = ("reply_text", "auto_reply", "bulk", "loop", "bounce", "thread_id")


def _v6_understood(database: peewee.Database) -> None:
    table = models.EmailMessage._meta.table_name
    columns = {c.name for c in database.get_columns(table)}
    fields = models.EmailMessage._meta.fields
    migrator = SchemaMigrator.from_database(database)
    steps = [migrator.add_column(table, name, fields[name])
             for name in UNDERSTOOD_COLUMNS if name not in columns]  # v1 made them
    if steps:
        steps.append(migrator.add_index(table, ("thread_id",), False))
    migrate(*steps)


def _v7_idle_leases(database: peewee.Database) -> None:
    database.create_tables([models.IdleLease, models.IdleHolder], safe=True)  # v1 made them


def _v8_body_paths(database: peewee.Database) -> None:
    table = models.EmailMessage._meta.table_name
    columns = {c.name for c in database.get_columns(table)}
    fields = models.EmailMessage._meta.fields
    migrator = SchemaMigrator.from_database(database)
    migrate(*[migrator.add_column(table, name, fields[name])
              for name in ("text_path", "html_path") if name not in columns])  # v1 made them


def _v9_message_retention(database: peewee.Database) -> None:
    """Message retention reads by age, and checks the shared keys of before 2026-12-07
    (``ab/cd/<sha256>``) against the rows that may still name them."""
    message = models.EmailMessage._meta.table_name
    for table, column, where in (
            (message, "received_at", ""),
            (models.UnroutedMessage._meta.table_name, "created_at", ""),
            (models.EmailAttachment._meta.table_name, "file_path", ""),
            (message, "text_path", ' WHERE "text_path" IS NOT NULL'),
            (message, "html_path", ' WHERE "html_path" IS NOT NULL')):
        database.execute_sql(f'CREATE INDEX IF NOT EXISTS "{table}_{column}" '
                             f'ON "{table}" ("{column}"){where}')


def _v10_delivery_retention(database: peewee.Database) -> None:
    """Delivery retention deletes attempts by age (published events go by the outbox's own
    ``(published_at, id)`` index), and receipts by their spool's node and age, once that
    spool's sweep has reported a floor (``SpoolFloor``)."""
    receipt = models.InboundReceipt._meta.table_name
    if "node" not in {c.name for c in database.get_columns(receipt)}:  # v1 made it
        migrate(SchemaMigrator.from_database(database).add_column(
            receipt, "node", models.InboundReceipt._meta.fields["node"]))
    database.create_tables([models.SpoolFloor], safe=True)  # v1 made it
    attempt = models.WebhookAttempt._meta.table_name
    database.execute_sql(f'CREATE INDEX IF NOT EXISTS "{attempt}_created_at" '
                         f'ON "{attempt}" ("created_at")')
    database.execute_sql(f'CREATE INDEX IF NOT EXISTS "{receipt}_node_created_at" '
                         f'ON "{receipt}" ("node", "created_at")')


def _v11_pending_deletes(database: peewee.Database) -> None:
    database.create_tables([models.PendingDelete], safe=True)  # v1 made it


MIGRATIONS: list[tuple[int, str, Callable[[peewee.Database], None]]] = [
    (1, "initial schema", _v1_initial),
    (2, "attachments: position and the forwarded message they came in", _v2_attachment_nesting),
    (3, "events outbox, webhook endpoints and attempts, API tokens", _v3_events),
    (4, "IMAP checkpoints: the stored UIDs whose after-fetch action is pending", _v4_pending_actions),
    (5, "IMAP checkpoints: until when a consumer holds the folder in IDLE", _v5_idle_until),
    (6, "messages: reply text, automatic, bounce and thread", _v6_understood),
    (7, "IDLE leases: which consumer holds which mailbox", _v7_idle_leases),
    (8, "messages: the storage keys of bodies kept out of the database", _v8_body_paths),
    (9, "message retention: indexes by age and by shared storage key", _v9_message_retention),
    (10, "delivery retention: attempts by age, receipts by node and age, spool floors",
     _v10_delivery_retention),
    (11, "message retention: shared objects pending deletion", _v11_pending_deletes),
]


# INSERT … RETURNING (insert_rows) came with SQLite 3.35.
SQLITE_MIN_VERSION = (3, 35, 0)


def open_database(url: str, *, migrate: bool = True) -> peewee.Database:
    """Connect the shared proxy to ``url`` and bring the schema up to date."""
    if url.startswith("sqlite:///"):
        if sqlite3.sqlite_version_info < SQLITE_MIN_VERSION:
            raise ConfigError(f"SQLite {sqlite3.sqlite_version} is too old: Mailferry needs "
                              f"{'.'.join(map(str, SQLITE_MIN_VERSION))} or newer (INSERT … RETURNING)")
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        database = url_connect(url, pragmas=SQLITE_PRAGMAS, timeout=30)
    elif url.startswith(("postgresql://", "postgres://")):
        database = url_connect(url, autorollback=True)
    else:
        raise ConfigError(f"MAILFERRY_DATABASE_URL: unsupported database {url.split(':', 1)[0]!r}")
    db.initialize(database)
    try:
        database.connect(reuse_if_open=True)
    except UNAVAILABLE as exc:  # said so, for `mailferry status` and the readiness probe
        raise TransientError(f"database unreachable: {exc}".strip()) from exc
    if migrate:
        migrate_schema(database)
    return database


def is_postgres(database: peewee.Database | None = None) -> bool:
    target = database or db.obj
    return isinstance(target, peewee.PostgresqlDatabase)


def migrate_schema(database: peewee.Database) -> int:
    """Apply the steps not yet applied; safe when several processes start at once."""
    with _schema_lock(database):
        database.create_tables([models.SchemaVersion], safe=True)
        done = {row.version for row in models.SchemaVersion.select()}
        for version, name, step in MIGRATIONS:
            if version in done:
                continue
            log.info("applying schema step %d: %s", version, name)
            step(database)
            models.SchemaVersion.create(version=version)
    return max(v for v, _, _ in MIGRATIONS)


def _schema_lock(database: peewee.Database):
    if isinstance(database, peewee.PostgresqlDatabase):
        tx = database.atomic()

        class _Locked:
            def __enter__(self):
                tx.__enter__()
                # A transaction-scoped advisory lock: two processes never migrate at once.
                database.execute_sql("SELECT pg_advisory_xact_lock(727274)")

            def __exit__(self, *exc):
                return tx.__exit__(*exc)

        return _Locked()
    # SQLite: BEGIN IMMEDIATE takes the write lock up front.
    return database.atomic(lock_type="IMMEDIATE")


# What a database says when it is locked, unreachable or its connection is gone: worth
# retrying, unlike a refused value (DataError) or a broken key (IntegrityError).
UNAVAILABLE = (peewee.OperationalError, peewee.InterfaceError)


@contextlib.contextmanager
def translated(what: str):
    """Database errors that may pass, raised as TransientError in our own terms: the one
    place they are translated (like ``imap_client.translated``). Also a decorator."""
    try:
        yield
    except UNAVAILABLE as exc:
        raise TransientError(f"{what}: database unavailable: {exc}".strip()) from exc


def close_database() -> None:
    if db.obj is not None and not db.obj.is_closed():
        db.obj.close()


def bulk_insert(model: type[peewee.Model], rows: list[dict]) -> None:
    """Insert ``rows`` (dicts of field name → Python value) in a few statements.

    peewee's ``insert_many`` builds a fresh SQL string of every value each time, which costs
    more than the insert itself at consumer rates; this converts values with the model's own
    fields and hands them to ``insert_rows``. Call inside a transaction.
    """
    if not rows:
        return
    given = set(rows[0])
    # Fields the rows leave out get their defaults, as Model.create would give them.
    defaults = [f for f in model._meta.sorted_fields
                if f.name not in given and f.default is not None and not f.primary_key]
    if defaults:
        rows = [dict(row, **{f.name: f.default() if callable(f.default) else f.default
                             for f in defaults}) for row in rows]
    fields = [model._meta.fields[name] for name in rows[0]]
    insert_rows(model, tuple(f.name for f in fields),
                [tuple(f.db_value(row[f.name]) for f in fields) for row in rows])


# Rows per INSERT statement: 999 parameters is the smallest limit any SQLite build has.
_MAX_PARAMS = 999


def insert_rows(model: type[peewee.Model], columns: tuple[str, ...], rows: list[tuple], *,
                returning: tuple[str, ...] = (), skip_duplicates: bool = False) -> list[tuple]:
    """Insert ``rows``, tuples of values ready for the driver in the order of ``columns``
    (field names; JSON already text: ``models.json_text``), a few statements in all.

    The hot path of every batch: no per-value conversion by the model's fields and no SQL
    built per value, just one multi-row ``INSERT`` per chunk. ``returning``: the new rows'
    columns come back, in no particular order (return a key with them). ``skip_duplicates``:
    a row that meets a unique key is left out — and not returned — instead of raising
    IntegrityError. Call inside a transaction.
    """
    if not rows:
        return []
    rows = _cleaned(model, columns, rows)
    database = model._meta.database
    table = model._meta.table_name
    names = tuple(model._meta.fields[c].column_name for c in columns)
    back = tuple(model._meta.fields[c].column_name for c in returning)
    per_statement = max(1, _MAX_PARAMS // len(columns))
    out: list[tuple] = []
    with peewee.__exception_wrapper__:  # driver errors become peewee's (IntegrityError, …)
        cursor = database.cursor()
        for start in range(0, len(rows), per_statement):
            chunk = rows[start:start + per_statement]
            sql = _insert_sql(table, names, database.param, len(chunk), back, skip_duplicates)
            cursor.execute(sql, [value for row in chunk for value in row])
            if back:
                out.extend(cursor.fetchall())
    return out


def _cleaned(model, columns: tuple[str, ...], rows: list[tuple]) -> list[tuple]:
    """``rows`` with every text value fit for its column (``models.clean_text``): mail is
    hostile, and one NUL or one overlong value must not refuse a whole batch's INSERT."""
    bounds = _text_bounds(model, columns)
    if not bounds:
        return rows
    out = []
    for row in rows:
        fixed = None
        for index, limit in bounds:
            value = row[index]
            if isinstance(value, str) and ("\x00" in value or (limit is not None and len(value) > limit)):
                fixed = fixed or list(row)
                fixed[index] = clean_text(value, limit)
        out.append(tuple(fixed) if fixed else row)
    return out


@functools.lru_cache(maxsize=128)
def _text_bounds(model, columns: tuple[str, ...]) -> tuple[tuple[int, int | None], ...]:
    """(index, max length or None) of the text columns among ``columns``."""
    found = []
    for index, name in enumerate(columns):
        field = model._meta.fields[name]
        if isinstance(field, peewee.CharField):
            found.append((index, field.max_length))
        elif isinstance(field, peewee.TextField):
            found.append((index, None))
    return tuple(found)


@functools.lru_cache(maxsize=512)
def _insert_sql(table: str, columns: tuple[str, ...], param: str, count: int,
                returning: tuple[str, ...], skip_duplicates: bool) -> str:
    quoted = ", ".join(f'"{c}"' for c in columns)
    row = "(" + ", ".join(param for _ in columns) + ")"
    sql = f'INSERT INTO "{table}" ({quoted}) VALUES ' + ", ".join(row for _ in range(count))
    if skip_duplicates:
        sql += " ON CONFLICT DO NOTHING"
    if returning:
        sql += " RETURNING " + ", ".join(f'"{c}"' for c in returning)
    return sql


class write_transaction:
    """The transaction of a batch write: fair between processes on SQLite.

    SQLite has one writer at a time, and its busy handler makes waiting writers poll with
    growing sleeps, so one consumer that commits back to back starves another (which then
    also sits on its prefetched messages). On SQLite this takes an exclusive ``flock`` on a
    lock file beside the database first — the kernel wakes a waiter as soon as the lock is
    free — and then ``BEGIN IMMEDIATE``, so the transaction never has to upgrade a read
    snapshot to a write lock (an upgrade after another process committed fails at once).
    On PostgreSQL it is an ordinary transaction.
    """

    def __init__(self):
        self._lock_fd: int | None = None
        self._tx = None

    def __enter__(self):
        database = db.obj
        if isinstance(database, peewee.SqliteDatabase):
            self._lock_fd = os.open(_lock_path(database), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._tx = database.atomic(lock_type="IMMEDIATE")
        else:
            self._tx = database.atomic()
        try:
            return self._tx.__enter__()
        except BaseException:
            self._unlock()
            raise

    def __exit__(self, *exc):
        try:
            return self._tx.__exit__(*exc)
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None


def _lock_path(database: peewee.SqliteDatabase) -> str:
    return f"{database.database}-writer.lock"
