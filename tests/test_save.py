"""consumer.save: the batch insert and the one-by-one path store the same rows and count the
same duplicates, on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest

from mailread.parse import parse_email
from consumer.route import Route
from consumer.save import SaveRequest, save_for_users, save_many, store_files
from mailferry.users import add_user
from mailferry.models import EmailAttachment, EmailMessage, db
from mailferry.storage import BlobStore
from devstack import mailgen


def _request(settings, raw: bytes, users, envelope=None) -> SaveRequest:
    parsed = parse_email(raw)
    files = store_files(BlobStore.of(settings), raw, parsed)
    routes = [Route(user.id, user.email, None) for user in users]
    return SaveRequest(parsed, files, routes, "smtp", envelope)


def _save_one_by_one(requests):
    return [save_for_users(r.parsed, r.files, r.routes, source=r.source, envelope=r.envelope)
            for r in requests]


@pytest.mark.parametrize("save", [save_many, _save_one_by_one], ids=["batch", "one-by-one"])
def test_a_save_stores_each_message_once_per_user_and_counts_the_rest(settings, save):
    bob, alice = add_user("bob@example.org"), add_user("alice@example.org")
    attached = mailgen.with_attachment(1, "a.bin", b"x" * 1000)
    earlier = _request(settings, mailgen.plain(2), [bob])
    with db.atomic():
        save([earlier])
    requests = [
        _request(settings, attached, [bob, alice], {"queue_id": "Q1", "rcpt_to": ["b", "a"]}),
        _request(settings, mailgen.plain(2), [bob, alice]),  # bob has it already
        _request(settings, attached, [bob]),  # the first one again, in the same batch
    ]
    with db.atomic():
        results = save(requests)
    assert [(len(r.stored), r.duplicates) for r in results] == [(2, 0), (1, 1), (0, 1)]
    first = EmailMessage.get_by_id(results[0].stored[0])
    assert (first.user_id, first.message_id, first.queue_id) == (bob.id, requests[0].parsed.message_id, "Q1")
    assert first.envelope == {"queue_id": "Q1", "rcpt_to": ["b", "a"]}
    assert first.recipients == requests[0].parsed.to and first.references == []
    assert first.raw_path == requests[0].files.raw_path and first.status == "stored"
    assert EmailMessage.select().count() == 4
    # Attachments belong to the rows that were stored, one per user.
    rows = list(EmailAttachment.select().order_by(EmailAttachment.user))
    assert [(a.user_id, a.email_message_id) for a in rows] == sorted(
        [(bob.id, results[0].stored[0]), (alice.id, results[0].stored[1])])
    assert rows[0].filename == "a.bin" and rows[0].file_size == 1000 and rows[0].is_image is False
    stored_json = db.execute_sql('SELECT "recipients" FROM "email_message" WHERE "id" = %s'
                                 .replace("%s", db.param), [first.id]).fetchone()[0]
    assert json.loads(stored_json) == requests[0].parsed.to


def test_bodies_kept_in_storage_leave_the_row_their_keys_and_a_damaged_one_is_left_out(settings):
    from consumer.save import store_files_many
    from mailferry import metrics
    from mailferry.payload import message_payload
    bob = add_user("bob@example.org")
    store = BlobStore.of(settings)
    raw = mailgen.text_and_html(1)
    parsed = parse_email(raw)
    [files] = store_files_many(store, [(raw, parsed)], bodies=True)
    with db.atomic():
        [result] = save_many([SaveRequest(parsed, files, [Route(bob.id, bob.email, None)], "smtp")])
    row = EmailMessage.get_by_id(result.stored[0])
    assert (row.text_content, row.html_content) == ("", "")
    assert store.read(row.text_path) == parsed.text.encode() and store.read(row.html_path) == parsed.html.encode()
    payload = message_payload(row, settings, store)
    assert (payload["text"], payload["html"]) == (parsed.text, parsed.html) and parsed.text and parsed.html

    (settings.resolved_storage_dir / row.html_path).write_bytes(b"<p>changed in storage</p>")
    failures = metrics.storage_integrity_failures._value.get()
    payload = message_payload(row, settings, store)
    assert (payload["text"], payload["html"]) == (parsed.text, "")
    assert metrics.storage_integrity_failures._value.get() == failures + 1
    (settings.resolved_storage_dir / row.text_path).unlink()
    assert message_payload(row, settings, store)["text"] == ""
