"""Message retention (scheduler/message_retention.py), on SQLite and PostgreSQL, with folders
and with a real S3-compatible server: mail received longer ago than
``retention_message_days`` goes, rows first, then the objects only it named — a day's
objects whole, a shared key of before objects were filed by day once no row names it — and
nothing a remaining row names is ever touched."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json

import pytest

from devstack import mailgen
from mailferry.models import AuditLog, EmailAttachment, EmailMessage, UnroutedMessage, utcnow
from mailferry.storage import Blob, BlobStore, FolderStore
from mailferry.users import add_user
from scheduler.message_retention import AUDIT_ACTION, cleanup_messages
from tests.ops_helpers import run_cli
from tests.test_api import store as store_messages

KEEP_DAYS = 30
LOGO = b"\x89PNG logo" * 50


@pytest.fixture(params=["folders", "s3"])
def where(request, settings):
    if request.param == "s3":
        return settings.replace(**request.getfixturevalue("s3_prefix"), body_storage="storage")
    return settings.replace(body_storage="storage")


@contextlib.contextmanager
def _filed_on(monkeypatch, days_ago: int):
    """Objects stored inside it are filed under the day ``days_ago`` days ago; yields when."""
    when = utcnow() - dt.timedelta(days=days_ago)
    with monkeypatch.context() as patch:
        patch.setattr("mailferry.storage.today", lambda: when.strftime("%Y-%m-%d"))
        yield when


def _stored_on(settings, monkeypatch, days_ago: int, raws: list[bytes], user) -> list[int]:
    """Messages stored as the consumer stores them, ``days_ago`` days ago: their objects filed
    under that day, their rows received then."""
    with _filed_on(monkeypatch, days_ago) as when:
        ids = store_messages(settings, raws, user)
    EmailMessage.update(received_at=when).where(EmailMessage.id.in_(ids)).execute()
    return ids


def _unrouted_on(settings, monkeypatch, days_ago: int, raw: bytes) -> UnroutedMessage:
    with _filed_on(monkeypatch, days_ago) as when:
        [(key, digest)] = BlobStore.of(settings).put_many([Blob(raw, raw=True)])
    return UnroutedMessage.create(queue_id=f"U{days_ago}", message_id="<u@example.net>",
                                  raw_path=key, sha256=digest, size=len(raw), created_at=when)


def _legacy(store: BlobStore, attachment: EmailAttachment) -> str:
    """Move an attachment to the shared key it had before objects were filed by day."""
    data = store.read(attachment.file_path)
    key = f"{attachment.sha256[:2]}/{attachment.sha256[2:4]}/{attachment.sha256}"
    store.write_new([(key, Blob(data))])
    EmailAttachment.update(file_path=key).where(EmailAttachment.sha256 == attachment.sha256).execute()
    return key


def _exists(store: BlobStore, key: str) -> bool:
    try:
        store.read(key)
        return True
    except FileNotFoundError:
        return False


def test_mail_past_its_retention_goes_with_the_objects_only_it_named(where, monkeypatch):
    settings = where.replace(retention_message_days=KEEP_DAYS)
    bob, alice = add_user("bob@example.org"), add_user("alice@example.org")
    store = BlobStore.of(settings)
    old = _stored_on(settings, monkeypatch, 40, [
        mailgen.with_attachment(1, "logo.png", LOGO),
        mailgen.with_attachment(2, "only-old.bin", b"old document" * 40)], bob)
    old += _stored_on(settings, monkeypatch, 40, [mailgen.with_attachment(1, "logo.png", LOGO)], alice)
    unrouted = _unrouted_on(settings, monkeypatch, 40, mailgen.plain(9))
    new = store_messages(settings, [mailgen.with_attachment(3, "logo.png", LOGO), mailgen.plain(4)], bob)
    # Two attachments from before objects were filed by day: one shared with a new message
    # (the same bytes under the one shared key), one named by old messages alone.
    shared_logo = _legacy(store, EmailAttachment.get(EmailAttachment.filename == "logo.png"))
    old_only = _legacy(store, EmailAttachment.get(EmailAttachment.filename == "only-old.bin"))
    old_day = BlobStore.day_of_key(EmailMessage.get_by_id(old[0]).raw_path)
    assert old_day in store.days() and len(store.days()) == 2

    preview = cleanup_messages(settings, dry_run=True)
    assert (preview.messages, preview.unrouted, preview.days) == (3, 1, [old_day])
    assert EmailMessage.select().count() == 5 and _exists(store, old_only)

    summary = cleanup_messages(settings)
    assert (summary.messages, summary.attachments, summary.unrouted) == (3, 3, 1)
    assert summary.days == [old_day]
    assert {BlobStore.day_of_key(key) for key in store.keys()} == {
        BlobStore.day_of_key(EmailMessage.get_by_id(new[0]).raw_path), None}  # None: the shared logo
    assert sorted(m.id for m in EmailMessage.select()) == sorted(new)
    assert not UnroutedMessage.select().where(UnroutedMessage.id == unrouted.id).exists()
    assert {a.email_message_id for a in EmailAttachment.select()} == {new[0]}
    # What the remaining rows name is all there, and sound; what only the old named is gone.
    for message in EmailMessage.select():
        for key in message.storage_keys:
            store.read_sound(key)
    assert _exists(store, shared_logo) and store.read(shared_logo) == LOGO
    assert not _exists(store, old_only)
    audits = [a.details for a in AuditLog.select().where(AuditLog.action == AUDIT_ACTION)]
    assert sorted((a["kind"], a["count"]) for a in audits) == [("message", 3), ("unrouted", 1)]
    assert next(a for a in audits if a["kind"] == "message")["users"] == 2

    again = cleanup_messages(settings)  # nothing left to do, and nothing a row names touched
    assert (again.messages, again.unrouted, again.days, again.objects) == (0, 0, [], 0)
    assert EmailMessage.select().count() == 2


def test_a_day_s_objects_wait_a_day_past_its_rows(where, monkeypatch):
    """A row is received after its objects were written, perhaps across midnight: a day's
    objects go once no row received before the end of the next day can be left."""
    settings = where.replace(retention_message_days=KEEP_DAYS)
    bob = add_user("bob@example.org")
    store = BlobStore.of(settings)
    [first] = _stored_on(settings, monkeypatch, KEEP_DAYS + 1, [mailgen.plain(1)], bob)
    raw_path = EmailMessage.get_by_id(first).raw_path
    summary = cleanup_messages(settings)
    assert summary.messages == 1 and summary.days == [] and _exists(store, raw_path)
    later = cleanup_messages(settings, now=utcnow() + dt.timedelta(days=2))
    assert later.days == [BlobStore.day_of_key(raw_path)] and not _exists(store, raw_path)


def test_without_a_retention_nothing_is_deleted(settings, monkeypatch):
    bob = add_user("bob@example.org")
    _stored_on(settings, monkeypatch, 4000, [mailgen.plain(1)], bob)
    summary = cleanup_messages(settings)  # retention_message_days = 0, the default
    assert (summary.messages, summary.days) == (0, [])
    assert EmailMessage.select().count() == 1


def test_a_folder_day_is_deleted_whole_temporaries_included(tmp_path):
    store = FolderStore(tmp_path / "storage")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mailferry.storage.today", lambda: "1970-01-01")
        keys = [key for key, _ in store.put_many([Blob(b"raw", raw=True), Blob(b"part")])]
    (tmp_path / "storage" / "parts" / "1970-01-01" / ".tmp-left-by-a-crash").write_bytes(b"x")
    today = store.put(b"today")[0]
    assert store.days() == {"1970-01-01", BlobStore.day_of_key(today)}
    assert store.delete_day("1970-01-01") == 2
    assert store.days() == {BlobStore.day_of_key(today)} and store.read(today) == b"today"
    assert not any(_exists(store, key) for key in keys)
    with pytest.raises(ValueError):
        store.delete_day("../..")
    assert hashlib.sha256(store.read(today)).hexdigest() == BlobStore.sha256_of_key(today)


def test_mailferry_cleanup_previews_then_deletes_mail_past_its_retention(settings, monkeypatch):
    settings = settings.replace(retention_message_days=KEEP_DAYS)
    bob = add_user("bob@example.org")
    _stored_on(settings, monkeypatch, 40, [mailgen.plain(1)], bob)
    [new] = store_messages(settings, [mailgen.plain(2)], bob)
    preview = run_cli(settings, "cleanup", "--dry-run", "--json")
    assert preview.returncode == 0, preview.stderr
    report = json.loads(preview.stdout)["messages"]
    assert (report["retention_days"], report["messages"], len(report["days"])) == (KEEP_DAYS, 1, 1)
    assert EmailMessage.select().count() == 2
    done = run_cli(settings, "cleanup")
    assert done.returncode == 0, done.stderr
    assert "deleted 1 message(s)" in done.stdout and report["days"][0] in done.stdout
    assert [m.id for m in EmailMessage.select()] == [new]


def test_a_row_naming_no_key_of_the_store_is_deleted_and_nothing_else_touched(settings, monkeypatch):
    settings = settings.replace(retention_message_days=KEEP_DAYS)
    bob = add_user("bob@example.org")
    [old] = _stored_on(settings, monkeypatch, 40, [mailgen.plain(1)], bob)
    EmailMessage.update(text_path="../../../etc/passwd").where(EmailMessage.id == old).execute()
    summary = cleanup_messages(settings)
    assert summary.messages == 1 and not EmailMessage.select().exists()


def test_the_scheduler_s_tick_applies_the_retention(settings, monkeypatch):
    from scheduler.tick import run_tick
    from tests.test_scheduler import ListPublisher
    settings = settings.replace(retention_message_days=KEEP_DAYS)
    bob = add_user("bob@example.org")
    _stored_on(settings, monkeypatch, 40, [mailgen.plain(1)], bob)
    [new] = store_messages(settings, [mailgen.plain(2)], bob)
    result = run_tick(settings, ListPublisher())
    assert "messages" not in result.failed_steps and result.messages.messages == 1
    assert len(result.messages.days) == 1 and result.messages.objects >= 1
    assert [m.id for m in EmailMessage.select()] == [new]


def test_a_shared_object_whose_delete_failed_is_deleted_by_the_next_run(where, monkeypatch):
    """The rows went, the store refused the DELETE: the key waits in PendingDelete, not
    leaked, and the next run deletes it."""
    from mailferry.object_storage import StorageUnavailable
    from mailferry.models import PendingDelete
    settings = where.replace(retention_message_days=KEEP_DAYS)
    bob = add_user("bob@example.org")
    store = BlobStore.of(settings)
    _stored_on(settings, monkeypatch, 40, [mailgen.with_attachment(1, "old.bin", b"old" * 100)], bob)
    shared = _legacy(store, EmailAttachment.get(EmailAttachment.filename == "old.bin"))

    def refused(keys):
        raise StorageUnavailable("DELETE", OSError("503 Slow Down"))
    with monkeypatch.context() as patch:
        patch.setattr(store, "delete", refused)
        with pytest.raises(StorageUnavailable):
            cleanup_messages(settings, store)
    assert not EmailMessage.select().exists() and _exists(store, shared)
    assert [p.key for p in PendingDelete.select()] == [shared]

    summary = cleanup_messages(settings, store)
    assert summary.messages == 0 and summary.objects >= 1
    assert not _exists(store, shared) and not PendingDelete.select().exists()
