"""mailferry.db: the versioned schema and the bulk inserts, on SQLite and PostgreSQL."""

from __future__ import annotations

import peewee
import pytest

from mailferry import db as dbmod
from mailferry.errors import TransientError
from mailferry.models import EmailAttachment, InboundReceipt, SchemaVersion, User, utcnow


def test_schema_is_versioned_and_opening_twice_changes_nothing(settings):
    versions = [row.version for row in SchemaVersion.select()]
    assert versions == [v for v, _, _ in dbmod.MIGRATIONS]
    dbmod.open_database(settings.resolved_database_url)
    assert [row.version for row in SchemaVersion.select()] == versions


def test_a_database_made_before_attachment_nesting_gains_its_columns(settings):
    table = EmailAttachment._meta.table_name
    for column in ("position", "enclosed_by"):  # as a version-1 database has it
        dbmod.db.execute_sql(f'ALTER TABLE "{table}" DROP COLUMN "{column}"')
    SchemaVersion.delete().where(SchemaVersion.version == 2).execute()
    dbmod.open_database(settings.resolved_database_url)
    assert {"position", "enclosed_by"} <= {c.name for c in dbmod.db.get_columns(table)}
    assert 2 in {row.version for row in SchemaVersion.select()}


def test_a_database_made_before_pending_actions_gains_the_column(settings):
    from mailferry.models import MailboxState
    table = MailboxState._meta.table_name
    dbmod.db.execute_sql(f'ALTER TABLE "{table}" DROP COLUMN "pending_action"')
    SchemaVersion.delete().where(SchemaVersion.version == 4).execute()
    dbmod.open_database(settings.resolved_database_url)
    assert "pending_action" in {c.name for c in dbmod.db.get_columns(table)}
    assert 4 in {row.version for row in SchemaVersion.select()}


def test_a_new_migration_step_runs_once(settings, monkeypatch):
    calls = []

    def add_column(database):
        calls.append(1)
        database.execute_sql('ALTER TABLE "user" ADD COLUMN nickname VARCHAR(50)')

    monkeypatch.setattr(dbmod, "MIGRATIONS", dbmod.MIGRATIONS + [(999, "nickname", add_column)])
    dbmod.open_database(settings.resolved_database_url)
    dbmod.open_database(settings.resolved_database_url)
    assert calls == [1]
    assert 999 in {row.version for row in SchemaVersion.select()}
    columns = {c.name for c in dbmod.db.get_columns("user")}
    assert "nickname" in columns


def test_sqlite_runs_in_wal_mode_with_full_sync(sqlite_settings):
    assert dbmod.db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert dbmod.db.execute_sql("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_bulk_insert_applies_defaults_and_unique_keys(settings):
    with dbmod.db.atomic():
        dbmod.bulk_insert(InboundReceipt, [{"queue_id": "A", "outcome": "stored"},
                                           {"queue_id": "B", "outcome": "unrouted"}])
    rows = {r.queue_id: r for r in InboundReceipt.select()}
    assert rows["A"].created_at is not None and rows["B"].stored_count == 0
    with pytest.raises(peewee.IntegrityError):
        with dbmod.db.atomic():
            dbmod.bulk_insert(InboundReceipt, [{"queue_id": "A", "outcome": "stored"}])


def test_unsupported_database_url_is_a_config_error(tmp_path):
    from mailferry.errors import ConfigError
    with pytest.raises(ConfigError, match="unsupported database"):
        dbmod.open_database("mysql://x/y")


def test_user_email_is_unique(settings):
    User.create(email="a@x.org")
    with pytest.raises(peewee.IntegrityError):
        with dbmod.db.atomic():
            User.create(email="a@x.org")


def test_insert_rows_returns_the_new_rows_and_can_skip_duplicates(settings):
    columns = ("queue_id", "outcome", "stored_count", "created_at")
    now = utcnow()
    # 300 rows of 4 values: more than one statement's worth of parameters.
    rows = [(f"Q{n}", "stored", n, now) for n in range(300)]
    with dbmod.db.atomic():
        back = dbmod.insert_rows(InboundReceipt, columns, rows, returning=("queue_id", "stored_count"))
    assert sorted(back) == sorted((f"Q{n}", n) for n in range(300))
    assert InboundReceipt.get(InboundReceipt.queue_id == "Q7").created_at == now
    with dbmod.db.atomic():
        back = dbmod.insert_rows(InboundReceipt, columns, [("Q1", "stored", 0, now), ("NEW", "unrouted", 0, now)],
                                 returning=("queue_id",), skip_duplicates=True)
    assert back == [("NEW",)]
    with pytest.raises(peewee.IntegrityError):
        with dbmod.db.atomic():
            dbmod.insert_rows(InboundReceipt, columns, [("Q2", "stored", 0, now)])
    assert InboundReceipt.select().count() == 301


def test_text_from_mail_fits_its_column_on_every_backend(settings):
    """A NUL (PostgreSQL refuses it) is dropped and an overlong value is shortened with a
    hash of the whole, through the ORM and through the batch INSERT alike."""
    from mailferry.db import insert_rows
    from mailferry.models import UnroutedMessage
    first, second = "<" + "a" * 600 + "1>", "<" + "a" * 600 + "2>"
    for n, message_id in enumerate((first, second)):
        UnroutedMessage.create(queue_id=f"Q\x00{n}", message_id=message_id, mail_from="x\x00y",
                               raw_path="r", sha256="s", size=1)
    insert_rows(UnroutedMessage, ("queue_id", "message_id", "mail_from", "rcpt_to", "raw_path",
                                  "sha256", "size", "created_at"),
                [("Q" * 100, first, "\x00", "[]", "r", "s", 1, utcnow())])
    rows = list(UnroutedMessage.select().order_by(UnroutedMessage.id))
    assert [r.queue_id for r in rows][:2] == ["Q0", "Q1"]
    assert all(len(r.message_id) == 512 for r in rows)
    assert rows[0].message_id != rows[1].message_id  # the hash keeps them apart
    assert rows[0].message_id == rows[2].message_id  # the same value, shortened the same way
    assert rows[0].mail_from == "xy" and rows[2].mail_from == ""
    assert len(rows[2].queue_id) == 64


@pytest.mark.parametrize("error", [peewee.OperationalError("database is locked"),
                                   peewee.InterfaceError("connection already closed")])
def test_a_database_that_may_come_back_is_a_transient_error_in_our_words(error):
    with pytest.raises(TransientError, match=r"^saving: database unavailable: "):
        with dbmod.translated("saving"):
            raise error

    @dbmod.translated("counting")
    def count():
        raise error

    with pytest.raises(TransientError, match=r"^counting: database unavailable"):
        count()


def test_a_refused_value_is_not_translated():
    with pytest.raises(peewee.IntegrityError):
        with dbmod.translated("saving"):
            raise peewee.IntegrityError("UNIQUE constraint failed")
