"""The incremental IMAP sync against a real Dovecot, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

import peewee
import pytest

from consumer import imap_client
from consumer.imap_sync import MailboxSync
from mailread.parse import parse_email
from mailferry.errors import (
    EmailAuthError, EmailConfigError, EmailFetchError, TransientError,
)
from mailferry.models import EmailAttachment, EmailMessage, MailboxState
from mailferry.spool import Spool
from devstack import mailgen
from tests.imap_fixtures import *  # noqa: F401,F403
from tests.imap_fixtures import (
    append, client_for, corpus_messages, flags_of, generated, nested_too_deep, stop_dovecot,
)


def refuse(monkeypatch, message_id: str, error: Exception) -> None:
    """The database refuses one message, in the batch insert and in the one-by-one path."""
    import consumer.imap_sync as module
    real_many, real_one = module.save_many, module.save_for_users

    def many(requests):
        if any(r.parsed.message_id == message_id for r in requests):
            raise error
        return real_many(requests)

    def one(parsed, files, routes, **kwargs):
        if parsed.message_id == message_id:
            raise error
        return real_one(parsed, files, routes, **kwargs)

    monkeypatch.setattr(module, "save_many", many)
    monkeypatch.setattr(module, "save_for_users", one)


def stored_ids(user) -> list[str]:
    return [m.message_id for m in EmailMessage.select(EmailMessage.message_id)
            .where(EmailMessage.user == user.id)]


def checkpoint(user, folder="INBOX") -> MailboxState:
    return MailboxState.get((MailboxState.user == user.id) & (MailboxState.folder == folder))


def test_first_sync_of_300_messages_stores_each_once(imap_user):
    corpus = corpus_messages()
    messages = corpus + generated(0, 300 - len(corpus))
    append(imap_user.account, messages)
    # The server hands back CRLF line ends: the synthetic ids of messages without a
    # Message-ID are hashes of what it returns, so expectations come from its bytes.
    client = client_for(imap_user.account)
    client.select_folder("INBOX", readonly=True)
    served = [d[b"BODY[]"] for d in client.fetch(client.search(), [b"BODY.PEEK[]"]).values()]
    client.logout()
    expected_ids, unparseable = set(), 0
    for raw in served:
        try:
            expected_ids.add(parse_email(raw).message_id)
        except Exception:
            unparseable += 1

    sync = MailboxSync(imap_user.settings)
    result = sync.run(imap_user.user, imap_user.config)

    ids = stored_ids(imap_user.user)
    assert result.new == result.fetched == 300
    assert sorted(ids) == sorted(expected_ids)  # every distinct message, none twice
    assert result.saved == len(expected_ids)
    assert result.failed == unparseable == 1  # the corpus' 5,001-part message, quarantined
    assert result.duplicates == 300 - len(expected_ids) - unparseable  # same Message-ID twice
    assert result.batches == 3  # imap_batch_size 100
    state = checkpoint(imap_user.user)
    assert state.last_uid == 300 and state.uidvalidity == result.uidvalidity
    assert state.highestmodseq is not None  # Dovecot has CONDSTORE
    with_attachment = EmailMessage.get(EmailMessage.message_id == "<att-2@example.net>")
    assert [a.filename for a in with_attachment.attachments] == ["report-2.pdf"]
    assert with_attachment.source == "imap"
    german = EmailMessage.get(EmailMessage.message_id == "<iso-8859-1-3@example.net>")
    assert "Grüße aus Köln" in german.text_content


def test_second_run_with_nothing_new_fetches_nothing(imap_user):
    append(imap_user.account, generated(0, 20))
    sync = MailboxSync(imap_user.settings)
    sync.run(imap_user.user, imap_user.config)
    before = checkpoint(imap_user.user)

    again = sync.run(imap_user.user, imap_user.config)

    assert (again.new, again.fetched, again.saved, again.batches) == (0, 0, 0, 0)
    assert EmailMessage.select().count() == 20
    after = checkpoint(imap_user.user)
    assert (after.last_uid, after.uidvalidity, after.highestmodseq) == \
        (before.last_uid, before.uidvalidity, before.highestmodseq)


def test_uid_search_past_the_last_uid_is_filtered(imap_user):
    # The server answers `UID 1001:*` with the highest UID (5), though 5 < 1001.
    append(imap_user.account, generated(0, 5))
    client = client_for(imap_user.account)
    client.select_folder("INBOX", readonly=True)
    assert client.search(["UID", "1001:*"]) == [5]
    client.logout()
    session = imap_client.connect(imap_user.config, 10)
    try:
        session.select("INBOX")
        assert session.uids_after(1000) == []
        assert session.uids_after(5) == []
        assert session.uids_after(3) == [4, 5]
    finally:
        session.close()


def test_flag_changes_alone_fetch_nothing(imap_user):
    # HIGHESTMODSEQ moves, so the sync searches again; nothing above the last UID: no fetch.
    append(imap_user.account, generated(0, 10))
    sync = MailboxSync(imap_user.settings)
    sync.run(imap_user.user, imap_user.config)
    client = client_for(imap_user.account)
    client.select_folder("INBOX")
    client.add_flags([3], [b"\\Flagged"])
    client.logout()

    result = sync.run(imap_user.user, imap_user.config)

    assert (result.new, result.fetched) == (0, 0)
    assert checkpoint(imap_user.user).last_uid == 10


def test_five_new_messages_store_exactly_five(imap_user):
    append(imap_user.account, generated(0, 50))
    sync = MailboxSync(imap_user.settings)
    sync.run(imap_user.user, imap_user.config)
    append(imap_user.account, generated(50, 5))

    result = sync.run(imap_user.user, imap_user.config)

    assert (result.new, result.fetched, result.saved, result.duplicates) == (5, 5, 5, 0)
    assert EmailMessage.select().count() == 55
    assert checkpoint(imap_user.user).last_uid == 55


def test_message_appended_with_a_2019_internal_date_is_fetched(imap_user):
    append(imap_user.account, generated(0, 3))
    sync = MailboxSync(imap_user.settings)
    sync.run(imap_user.user, imap_user.config)
    old = mailgen.plain(9001, subject="From the archive", message_id="<old-2019@example.net>")
    append(imap_user.account, [old], msg_time=dt.datetime(2019, 3, 4, 5, 6, 7, tzinfo=dt.timezone.utc))
    client = client_for(imap_user.account)
    client.select_folder("INBOX", readonly=True)
    internal = client.fetch([4], [b"INTERNALDATE"])[4][b"INTERNALDATE"]
    client.logout()
    assert internal.year == 2019  # what a SINCE-based fetch would have skipped

    result = sync.run(imap_user.user, imap_user.config)

    assert result.saved == 1
    assert EmailMessage.get(EmailMessage.message_id == "<old-2019@example.net>").subject == "From the archive"


def test_folder_deleted_and_recreated_refetches_without_duplicates(imap_user):
    imap_user.configure(folder="Lists")
    first = generated(0, 30)
    append(imap_user.account, first, folder="Lists")
    sync = MailboxSync(imap_user.settings)
    before = sync.run(imap_user.user, imap_user.config)
    assert before.saved == 30
    client = client_for(imap_user.account)
    client.delete_folder("Lists")
    client.create_folder("Lists")
    client.logout()
    append(imap_user.account, first + generated(100, 2), folder="Lists")

    result = sync.run(imap_user.user, imap_user.config)

    assert result.refetch and result.uidvalidity != before.uidvalidity
    assert (result.fetched, result.saved, result.duplicates) == (32, 2, 30)
    ids = stored_ids(imap_user.user)
    assert len(ids) == len(set(ids)) == 32
    state = checkpoint(imap_user.user, "Lists")
    assert (state.uidvalidity, state.last_uid) == (result.uidvalidity, 32)


def test_default_fetch_leaves_seen_flags_unchanged(imap_user):
    append(imap_user.account, generated(0, 6))
    append(imap_user.account, generated(6, 4), flags=(b"\\Seen",))
    append(imap_user.account, generated(10, 2), flags=(b"\\Flagged",))
    before = flags_of(imap_user.account)
    assert sum(b"\\Seen" in f for f in before.values()) == 4

    result = MailboxSync(imap_user.settings).run(imap_user.user, imap_user.config)

    assert result.saved == 12
    assert flags_of(imap_user.account) == before


def test_mark_seen_sets_seen_after_saving(imap_user):
    imap_user.configure(mark_seen=True)
    append(imap_user.account, generated(0, 5))
    MailboxSync(imap_user.settings).run(imap_user.user, imap_user.config)
    assert all(b"\\Seen" in f for f in flags_of(imap_user.account).values())
    assert EmailMessage.select().count() == 5


def test_move_to_moves_saved_messages(imap_user):
    imap_user.configure(move_to="Processed")
    client = client_for(imap_user.account)
    client.create_folder("Processed")
    client.logout()
    append(imap_user.account, generated(0, 7))

    result = MailboxSync(imap_user.settings).run(imap_user.user, imap_user.config)

    assert result.saved == 7
    assert flags_of(imap_user.account, "INBOX") == {}
    assert len(flags_of(imap_user.account, "Processed")) == 7


def test_one_unparseable_message_is_quarantined_and_the_rest_go_on(imap_user):
    append(imap_user.account, generated(0, 4) + [nested_too_deep(1)] + generated(4, 4))

    result = MailboxSync(imap_user.settings).run(imap_user.user, imap_user.config)

    assert (result.fetched, result.saved, result.failed) == (9, 8, 1)
    spool = Spool(imap_user.settings.resolved_spool_dir)
    quarantined = spool.failed / f"imap-{imap_user.user.id}-{result.uidvalidity}-5.eml"
    assert quarantined.read_bytes() == nested_too_deep(1)
    reason = quarantined.with_suffix(".eml.reason").read_text()
    assert "nesting deeper than" in reason
    assert checkpoint(imap_user.user).last_uid == 9  # past it: not fetched again and again


def test_a_crash_mid_sync_refetches_at_most_one_batch(imap_user, monkeypatch):
    settings = imap_user.settings.replace(imap_batch_size=10)
    append(imap_user.account, generated(0, 45))
    refuse(monkeypatch, "<test-24@example.net>", peewee.OperationalError("database is locked"))  # UID 25
    with pytest.raises(TransientError, match="database is locked"):
        MailboxSync(settings).run(imap_user.user, imap_user.config)
    assert checkpoint(imap_user.user).last_uid == 20  # the third batch rolled back whole
    assert EmailMessage.select().count() == 20

    monkeypatch.undo()
    result = MailboxSync(settings).run(imap_user.user, imap_user.config)

    assert result.fetched == 25  # nothing committed is fetched again
    assert (result.saved, result.duplicates) == (25, 0)
    assert EmailMessage.select().count() == 45


def test_cancelled_between_batches_stops_with_the_checkpoint_of_the_last_commit(imap_user):
    settings = imap_user.settings.replace(imap_batch_size=10)
    append(imap_user.account, generated(0, 80))
    answers = iter([True, True, True, False])

    result = MailboxSync(settings).run(imap_user.user, imap_user.config,
                                       keep_going=lambda: next(answers))

    # Asked before each further batch: after the "no", batches prepared but not committed
    # are dropped — nothing more is committed for a cancelled task.
    assert result.cancelled and 1 <= result.batches <= 3
    committed = result.batches * 10
    assert EmailMessage.select().count() == committed
    assert checkpoint(imap_user.user).last_uid == committed
    assert checkpoint(imap_user.user).highestmodseq is None  # the run did not finish
    rest = MailboxSync(settings).run(imap_user.user, imap_user.config)
    assert (rest.new, rest.saved, rest.duplicates) == (80 - committed, 80 - committed, 0)


def test_dovecot_stopped_mid_fetch_then_the_next_run_stores_every_message_once(imap_user, dovecot):
    settings = imap_user.settings.replace(imap_batch_size=25)
    append(imap_user.account, generated(0, 250))
    sync = MailboxSync(settings)

    def stop_after_two_batches(result, delta):
        if result.batches == 2:
            stop_dovecot(dovecot)

    try:
        with pytest.raises(EmailFetchError):
            sync.run(imap_user.user, imap_user.config, progress=stop_after_two_batches)
        # Batches fetched ahead before the server went are saved; the checkpoint is exactly
        # what was committed.
        committed = checkpoint(imap_user.user).last_uid
        assert 50 <= committed < 250 and committed % 25 == 0
        assert EmailMessage.select().count() == committed
        with pytest.raises(EmailFetchError):  # still down: connection refused, transient
            sync.run(imap_user.user, imap_user.config)
    finally:
        dovecot.start()

    result = sync.run(imap_user.user, imap_user.config)

    assert (result.fetched, result.saved, result.duplicates) == (250 - committed, 250 - committed, 0)
    ids = stored_ids(imap_user.user)
    assert len(ids) == len(set(ids)) == 250


def test_wrong_password_is_an_auth_error(imap_user):
    imap_user.configure(password="not-the-password")
    with pytest.raises(EmailAuthError, match="login refused"):
        MailboxSync(imap_user.settings).run(imap_user.user, imap_user.config)


def test_a_missing_folder_is_a_configuration_error(imap_user):
    imap_user.configure(folder="Nowhere")
    with pytest.raises(EmailConfigError, match="Nowhere"):
        MailboxSync(imap_user.settings).run(imap_user.user, imap_user.config)


def test_ssl_and_starttls_with_the_servers_certificate(imap_user, dovecot):
    append(imap_user.account, generated(0, 3))
    imap_user.configure(security="ssl", port=dovecot.ssl_port, ca_file=str(dovecot.cert_path))
    assert MailboxSync(imap_user.settings).run(imap_user.user, imap_user.config).saved == 3
    append(imap_user.account, generated(3, 2))
    imap_user.configure(security="starttls", ca_file=str(dovecot.cert_path))
    assert MailboxSync(imap_user.settings).run(imap_user.user, imap_user.config).saved == 2


def test_an_untrusted_certificate_is_a_configuration_error(imap_user, dovecot):
    imap_user.configure(security="ssl", port=dovecot.ssl_port)
    with pytest.raises(EmailConfigError, match="certificate"):
        MailboxSync(imap_user.settings).run(imap_user.user, imap_user.config)


def test_a_refused_connection_is_transient(imap_user):
    from devstack.ports import free_port
    imap_user.configure(port=free_port())
    with pytest.raises(EmailFetchError, match="connect"):
        MailboxSync(imap_user.settings).run(imap_user.user, imap_user.config)


def test_a_message_the_database_refuses_is_quarantined(imap_user, monkeypatch):
    append(imap_user.account, generated(0, 3))
    refuse(monkeypatch, "<html-1@example.net>", peewee.DataError("value too long"))
    result = MailboxSync(imap_user.settings).run(imap_user.user, imap_user.config)

    assert (result.saved, result.failed) == (2, 1)
    assert EmailMessage.select().count() == 2
    assert EmailAttachment.select().count() == 1


def test_a_message_already_stored_from_smtp_is_not_stored_again(imap_user):
    from consumer.route import Route
    from consumer.save import save_for_users, store_files
    from mailferry.models import db
    from mailferry.storage import BlobStore
    messages = generated(0, 3)
    parsed = parse_email(messages[1])
    files = store_files(BlobStore.of(imap_user.settings), messages[1], parsed)
    with db.atomic():
        save_for_users(parsed, files, [Route(imap_user.user.id, imap_user.user.email, None)],
                       source="smtp", envelope={"queue_id": "Q1"})
    append(imap_user.account, messages)

    result = MailboxSync(imap_user.settings).run(imap_user.user, imap_user.config)

    assert (result.saved, result.duplicates) == (2, 1)
    assert EmailMessage.get(EmailMessage.message_id == parsed.message_id).source == "smtp"
    assert EmailMessage.select().count() == 3


def test_batches_are_cut_by_count_and_by_bytes():
    from consumer.imap_sync import plan_batches
    uids = list(range(1, 11))
    assert plan_batches(uids, {u: 10 for u in uids}, 4, 1000) == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert plan_batches(uids, {u: 10 for u in uids}, 100, 25) == [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]
    # a message over the byte bound is a batch of its own; a UID gone since the search costs 0
    assert plan_batches([1, 2, 3, 4], {1: 5, 2: 500, 3: 5}, 100, 100) == [[1], [2], [3, 4]]
    assert plan_batches([], {}, 10, 10) == []


def test_big_messages_make_small_batches(imap_user):
    settings = imap_user.settings.replace(imap_batch_bytes=64 * 1024)
    big = [mailgen.with_attachment(n, f"scan-{n}.bin", bytes([n]) * 30_000) for n in range(6)]
    append(imap_user.account, big)  # ~41 KB each once base64-encoded: one per batch

    result = MailboxSync(settings).run(imap_user.user, imap_user.config)

    assert (result.batches, result.saved) == (6, 6)
    assert checkpoint(imap_user.user).last_uid == 6


@pytest.mark.parametrize("helper", [True, False], ids=["helper-process", "in-process"])
def test_a_long_run_parses_alike_in_the_helper_process_and_here(imap_user, helper):
    settings = imap_user.settings.replace(imap_batch_size=10)
    messages = generated(0, 25) + [nested_too_deep(7)] + generated(25, 24)
    append(imap_user.account, messages)
    sync = MailboxSync(settings, parse_in_helper=helper)
    sent = []
    if helper:
        from tests.pipeline import wait_for
        sync.parse_pool.start()
        wait_for(sync.parse_pool.ready, timeout=60, message="the parser helper to start")
        submit = sync.parse_pool.submit
        sync.parse_pool.submit = lambda raws, limits: sent.append(len(raws)) or submit(raws, limits)
    try:
        result = sync.run(imap_user.user, imap_user.config)
    finally:
        sync.close()

    assert (result.batches, result.fetched, result.saved, result.failed) == (5, 50, 49, 1)
    assert sent == ([10] * 5 if helper else [])  # every batch went to the helper, or none
    stored = EmailMessage.get(EmailMessage.message_id == "<att-2@example.net>")
    assert [a.filename for a in stored.attachments] == ["report-2.pdf"]
    spool = Spool(imap_user.settings.resolved_spool_dir)
    assert (spool.failed / f"imap-{imap_user.user.id}-{result.uidvalidity}-26.eml").exists()
