"""Threads through the save path, on SQLite and PostgreSQL: replies before their parent,
a parent never seen, the subject fallback, two users with the same Message-IDs, SMTP and IMAP
mail in one thread."""

from __future__ import annotations

import json
from email.message import EmailMessage as Mail

import pytest

from consumer.route import Route
from consumer.save import SaveRequest, save_many, store_batch
from mailread.parse import parse_email
from mailferry.db import write_transaction
from mailferry.models import EmailMessage
from mailferry.storage import BlobStore
from mailferry.users import add_user
from tests.ops_helpers import run_cli


def mail(message_id: str, subject: str, *, in_reply_to: str | None = None,
         references: list[str] = ()) -> bytes:
    message = Mail()
    message["From"] = "ann@example.net"
    message["To"] = "bob@example.org"
    message["Subject"] = subject
    message["Message-ID"] = message_id
    if in_reply_to:
        message["In-Reply-To"] = in_reply_to
    if references:
        message["References"] = " ".join(references)
    message.set_content(f"text of {message_id}\n")
    return message.as_bytes()


def store(settings, user, *raws: bytes, source: str = "smtp") -> None:
    """One batch, the consumer's way."""
    parsed = [parse_email(raw) for raw in raws]
    files = store_batch(BlobStore.of(settings), list(zip(raws, parsed)))
    with write_transaction():
        save_many([SaveRequest(p, f, [Route(user.id, user.email, None)], source, None)
                   for p, f in zip(parsed, files)])


def thread_of(user, message_id: str) -> str:
    return EmailMessage.get((EmailMessage.user == user.id)
                            & (EmailMessage.message_id == message_id)).thread_id


A = mail("<a@x>", "Printer on fire")
B = mail("<b@x>", "Re: Printer on fire", in_reply_to="<a@x>", references=["<a@x>"])
C = mail("<c@x>", "Re: Printer on fire", in_reply_to="<b@x>", references=["<a@x>", "<b@x>"])
C_ONLY_PARENT = mail("<c@x>", "Re: Printer on fire", in_reply_to="<b@x>")


def test_replies_that_arrive_before_their_parent_join_it_when_it_comes(settings):
    bob = add_user("bob@example.org")
    store(settings, bob, C)
    store(settings, bob, B)
    store(settings, bob, A)
    assert thread_of(bob, "<a@x>") == thread_of(bob, "<b@x>") == thread_of(bob, "<c@x>")


def test_a_reply_naming_only_its_parent_is_moved_into_the_thread_its_parent_joins(settings):
    bob = add_user("bob@example.org")
    store(settings, bob, C_ONLY_PARENT)  # names its thread after <b@x>, all it knows
    store(settings, bob, A)
    store(settings, bob, B)  # <b@x> belongs to <a@x>'s thread: <c@x> moves with it
    assert thread_of(bob, "<c@x>") == thread_of(bob, "<b@x>") == thread_of(bob, "<a@x>")


def test_replies_and_their_parent_in_one_batch_in_any_order_share_a_thread(settings):
    bob = add_user("bob@example.org")
    store(settings, bob, C_ONLY_PARENT, B, A)
    assert thread_of(bob, "<c@x>") == thread_of(bob, "<b@x>") == thread_of(bob, "<a@x>")


def test_a_parent_never_seen_still_gives_its_replies_one_thread(settings):
    bob = add_user("bob@example.org")
    store(settings, bob, B)
    store(settings, bob, C)
    assert thread_of(bob, "<b@x>") == thread_of(bob, "<c@x>")


def test_mail_without_references_is_threaded_by_its_normalised_subject(settings):
    bob = add_user("bob@example.org")
    store(settings, bob, mail("<s1@x>", "Invoice 42"))
    store(settings, bob, mail("<s2@x>", "RE: AW: [billing] Invoice 42"))
    store(settings, bob, mail("<s3@x>", "回复：Invoice 42"))
    store(settings, bob, mail("<s4@x>", "Invoice 43"))
    assert thread_of(bob, "<s1@x>") == thread_of(bob, "<s2@x>") == thread_of(bob, "<s3@x>")
    assert thread_of(bob, "<s4@x>") != thread_of(bob, "<s1@x>")


def test_two_users_with_the_same_message_ids_have_threads_of_their_own(settings):
    bob, alice = add_user("bob@example.org"), add_user("alice@example.org")
    store(settings, bob, A, B)
    store(settings, alice, B, A)
    assert thread_of(bob, "<a@x>") == thread_of(bob, "<b@x>")
    assert thread_of(alice, "<a@x>") == thread_of(alice, "<b@x>")
    assert thread_of(bob, "<a@x>") != thread_of(alice, "<a@x>")


def test_smtp_and_imap_mail_of_one_user_share_a_thread(settings):
    bob = add_user("bob@example.org")
    store(settings, bob, A, source="smtp")
    store(settings, bob, B, source="imap")
    store(settings, bob, C, source="smtp")
    assert {thread_of(bob, m) for m in ("<a@x>", "<b@x>", "<c@x>")} == {thread_of(bob, "<a@x>")}
    assert EmailMessage.get(EmailMessage.message_id == "<b@x>").source == "imap"


def _as_stored_before_reading(*message_ids: str) -> None:
    """Rows as a version before mailread.understand stored them: nothing read."""
    EmailMessage.update(reply_text=None, auto_reply=False, bulk=False, loop=False, bounce=None,
                        thread_id=None).where(EmailMessage.message_id.in_(message_ids)).execute()


def test_reindex_reads_mail_stored_before_and_resumes_where_it_stopped(settings):
    bob = add_user("bob@example.org")
    store(settings, bob, A, B, C)
    want = thread_of(bob, "<a@x>")
    _as_stored_before_reading("<a@x>", "<b@x>", "<c@x>")
    # The first run is "killed" after one batch of one message: the rest waits, unread.
    import consumer.reindex as reindex

    class Stop(Exception):
        pass

    def one_batch_then_killed(count):
        raise Stop

    original = reindex.BATCH
    reindex.BATCH = 1
    try:
        with pytest.raises(Stop):
            reindex.reindex(BlobStore.of(settings), progress=one_batch_then_killed)
    finally:
        reindex.BATCH = original
    assert reindex.pending().count() == 2
    result = run_cli(settings, "reindex", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "reindexed 2 messages" in result.stdout
    assert reindex.pending().count() == 0
    assert {thread_of(bob, m) for m in ("<a@x>", "<b@x>", "<c@x>")} == {want}
    row = EmailMessage.get(EmailMessage.message_id == "<b@x>")
    assert row.reply_text == "text of <b@x>"


def test_mailferry_thread_lists_one_conversation_oldest_first(settings):
    bob = add_user("bob@example.org")
    store(settings, bob, C)
    store(settings, bob, A, B)
    store(settings, bob, mail("<other@x>", "Something else"))
    result = run_cli(settings, "thread", thread_of(bob, "<a@x>"), "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert listed["thread_id"] == thread_of(bob, "<a@x>")
    assert sorted(m["message_id"] for m in listed["messages"]) == ["<a@x>", "<b@x>", "<c@x>"]
    by_row = run_cli(settings, "thread", str(EmailMessage.get(EmailMessage.message_id == "<c@x>").id))
    assert by_row.returncode == 0 and "3 messages" in by_row.stdout
    assert run_cli(settings, "thread", "t_nothing").returncode == 1
