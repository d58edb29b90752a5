"""What happens on the server after a fetch, against Dovecot: delete removes exactly the
stored messages (UID EXPUNGE, never a plain EXPUNGE); an action is done only after the
commit that stored its messages, redone by the next run when the process died in between
(without refetching), and retried by the next run when the server refused it."""

from __future__ import annotations

import pytest

from consumer.imap_sync import MailboxSync
from consumer.imap_worker import run_fetch_task
from mailferry import tasks
from mailferry.errors import EmailFetchError
from mailferry.models import EmailMessage, MailboxState, TaskLog, TaskSource, TaskStatus
from consumer import imap_client
from tests.imap_fixtures import *  # noqa: F401,F403
from tests.imap_fixtures import (
    append, client_for, flags_of, generated, imap_set, nested_too_deep,
)


class Killed(BaseException):
    """What a SIGKILL looks like from inside: nothing after it runs."""


def connect_failing(action: str, error: BaseException):
    """imap_client.connect whose sessions raise ``error`` on ``action`` (move, delete, …)."""
    def connect(config, timeout):
        session = imap_client.connect(config, timeout)

        def refuse(*_args, **_kwargs):
            raise error
        setattr(session, action, refuse)
        return session
    return connect


def pending(imap_user) -> list[int]:
    return MailboxState.get(MailboxState.user == imap_user.user.id).pending_action


def test_delete_expunges_exactly_the_stored_messages(imap_user):
    append(imap_user.account, generated(0, 3))
    # Flagged \Deleted by the user, and refused by the parser (so not stored): a plain
    # EXPUNGE would remove it; ours names UIDs 1-3 alone.
    append(imap_user.account, [nested_too_deep(1)], flags=(b"\\Deleted",))
    imap_user.configure(delete=True)

    result = MailboxSync(imap_user.settings, parse_in_helper=False).run(imap_user.user, imap_user.config)

    assert (result.saved, result.failed, EmailMessage.select().count()) == (3, 1, 3)
    assert list(flags_of(imap_user.account)) == [4]
    assert pending(imap_user) == []


def test_a_kill_between_commit_and_action_is_made_good_by_the_next_run(imap_user):
    append(imap_user.account, generated(0, 3))
    with client_for(imap_user.account) as client:
        client.create_folder("Done")
    imap_user.configure(move_to="Done")
    with pytest.raises(Killed):
        MailboxSync(imap_user.settings, parse_in_helper=False,
                    connect=connect_failing("move", Killed())).run(imap_user.user, imap_user.config)
    # Committed: stored, checkpoint moved, the action still to do; nothing moved yet.
    assert EmailMessage.select().count() == 3
    assert pending(imap_user) == [1, 2, 3]
    assert len(flags_of(imap_user.account)) == 3

    again = MailboxSync(imap_user.settings, parse_in_helper=False).run(imap_user.user, imap_user.config)

    assert again.fetched == 0  # not refetched
    assert flags_of(imap_user.account) == {}
    assert len(flags_of(imap_user.account, "Done")) == 3
    assert pending(imap_user) == []


def test_an_action_the_server_refuses_is_logged_on_the_task_and_retried(imap_user):
    append(imap_user.account, generated(0, 2))
    imap_user.configure(mark_seen=True)
    task = tasks.create_task(TaskSource.IMAP, imap_user.user.id)
    tasks.start_task(task.task_id)
    sync = MailboxSync(imap_user.settings, parse_in_helper=False,
                       connect=connect_failing("mark_seen", EmailFetchError("STORE refused")))
    status = run_fetch_task(task, None, sync=sync, configs=imap_user.configs, backoff=0.01)

    assert status == TaskStatus.COMPLETED  # the mail is stored; the action waits
    lines = [l.message for l in TaskLog.select().where(TaskLog.step == "after_fetch")]
    assert len(lines) == 1 and "STORE refused" in lines[0]
    assert all(b"\\Seen" not in f for f in flags_of(imap_user.account).values())

    MailboxSync(imap_user.settings, parse_in_helper=False).run(imap_user.user, imap_user.config)
    assert all(b"\\Seen" in f for f in flags_of(imap_user.account).values())
    assert pending(imap_user) == []


def test_delete_and_move_to_together_are_refused(imap_user):
    from mailferry.errors import EmailConfigError
    with pytest.raises(EmailConfigError, match="choose one"):
        imap_user.configure(delete=True, move_to="Done")


def test_imap_set_delete_is_stored(imap_user, monkeypatch):
    assert imap_set(monkeypatch, imap_user.settings, imap_user.account, imap_user.user.email,
                    "--password-stdin", "--delete", stdin=imap_user.account.password + "\n") == 0
    assert imap_user.config.delete is True and imap_user.config.changes_server
