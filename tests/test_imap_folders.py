"""Several folders per mailbox, against Dovecot: each with its own checkpoint, names in
modified UTF-7 on the wire and Unicode here, the SPECIAL-USE folders left out of "*", and a
message in two folders stored once."""

from __future__ import annotations

import pytest

from consumer.imap_sync import MailboxSync
from consumer.imap_worker import run_fetch_task
from mailferry import tasks
from mailferry.errors import EmailConfigError
from mailferry.models import EmailMessage, MailboxState, TaskSource, TaskStatus
from tests.imap_fixtures import *  # noqa: F401,F403
from tests.imap_fixtures import append, client_for, generated, imap_set

UNICODE = "Überweisungen 日本語"  # modified UTF-7 on the wire: &ANw-berweisungen &ZeVnLIqe-


def fetch(imap_user, **config) -> tasks.EmailTask:
    imap_user.configure(**config)
    task = tasks.create_task(TaskSource.IMAP, imap_user.user.id)
    tasks.start_task(task.task_id)
    sync = MailboxSync(imap_user.settings, parse_in_helper=False)
    status = run_fetch_task(task, "INBOX", sync=sync, configs=imap_user.configs, backoff=0.01)
    assert status == TaskStatus.COMPLETED, tasks.get_task(task.task_id).error_message
    return tasks.get_task(task.task_id)


def checkpoints(imap_user) -> dict[str, int]:
    return {s.folder: s.last_uid for s in
            MailboxState.select().where(MailboxState.user == imap_user.user.id)}


def test_each_configured_folder_is_synced_with_its_own_checkpoint(imap_user):
    append(imap_user.account, generated(0, 3))
    append(imap_user.account, generated(3, 2), folder="Archive")
    append(imap_user.account, generated(5, 4), folder=UNICODE)
    with client_for(imap_user.account) as client:  # the server holds the UTF-7 name
        assert any(b"&ANw-berweisungen" in raw for raw in client._imap.list()[1])

    task = fetch(imap_user, folders=["INBOX", "Archive", UNICODE])

    assert EmailMessage.select().count() == 9
    assert checkpoints(imap_user) == {"INBOX": 3, "Archive": 2, UNICODE: 4}
    assert task.emails_saved == 9
    assert set(task.details["folders"]) == {"INBOX", "Archive", UNICODE}

    append(imap_user.account, generated(9, 1), folder=UNICODE)  # only what is new, per folder
    again = fetch(imap_user, folders=["INBOX", "Archive", UNICODE])
    assert (again.emails_fetched, again.emails_saved) == (1, 1)
    assert checkpoints(imap_user)[UNICODE] == 5


def test_all_folders_leaves_out_trash_junk_sent_drafts_and_the_move_target(imap_user):
    append(imap_user.account, generated(0, 1))
    append(imap_user.account, generated(1, 1), folder="Projects")
    for n, name in enumerate(("Trash", "Junk", "Sent", "Drafts", "Done")):
        append(imap_user.account, generated(10 + n, 1), folder=name)

    fetch(imap_user, folders=["*"], move_to="Done")

    assert set(checkpoints(imap_user)) == {"INBOX", "Projects"}
    assert EmailMessage.select().count() == 2


def test_a_message_in_two_folders_is_stored_once(imap_user):
    [message] = generated(0, 1)
    append(imap_user.account, [message])
    append(imap_user.account, [message], folder="Copies")

    task = fetch(imap_user, folders=["INBOX", "Copies"])

    assert EmailMessage.select().count() == 1
    assert task.details["duplicates"] == 1
    assert checkpoints(imap_user) == {"INBOX": 1, "Copies": 1}


@pytest.mark.parametrize("folders, error", [
    (["*", "INBOX"], "stands alone"),
    (["INBOX", "Done"], "move_to"),
    ([""], "not a folder name"),
    ("INBOX\r\nA1 DELETE INBOX", "not a folder name"),
    ([7], "list of folder names"),
])
def test_a_folders_setting_that_cannot_work_is_refused(imap_user, folders, error):
    with pytest.raises(EmailConfigError, match=error):
        imap_user.configure(folders=folders, move_to="Done")


def test_imap_set_takes_a_folder_list(imap_user, capsys, monkeypatch):
    assert imap_set(monkeypatch, imap_user.settings, imap_user.account, imap_user.user.email,
                    "--password-stdin", "--folders", "INBOX,Support",
                    stdin=imap_user.account.password + "\n") == 0
    assert "folder(s) INBOX, Support" in capsys.readouterr().out
    assert imap_user.config.folders == ("INBOX", "Support")
