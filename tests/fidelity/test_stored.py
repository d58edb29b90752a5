"""The fidelity suite through the real pipeline: each case injected as SMTP mail, consumed
from RabbitMQ and stored (SQLite and PostgreSQL); the stored rows and files must hold what
the sender meant, as the parse does (test_fidelity.py)."""

from __future__ import annotations

from dataclasses import dataclass

from mailferry.inject import Injector
from mailferry.users import add_user
from mailferry.models import EmailAttachment, EmailMessage, InboundReceipt
from mailferry.spool import Spool
from mailferry.storage import BlobStore
from tests.fidelity.cases import SOURCES, all_cases, differences
from tests.pipeline import consumer_thread, wait_for


@dataclass
class Stored:
    """A stored message, shaped as the parse is, for ``differences``."""
    subject: str
    text: str
    html: str
    attachments: list
    warnings: list


@dataclass
class StoredAttachment:
    filename: str
    content_type: str
    data: bytes
    enclosed_by: int | None


def stored(message: EmailMessage, store: BlobStore) -> Stored:
    rows = (EmailAttachment.select().where(EmailAttachment.email_message == message)
            .order_by(EmailAttachment.position))
    return Stored(message.subject, message.text_content, message.html_content,
                  [StoredAttachment(a.filename, a.content_type, store.read(a.file_path), a.enclosed_by)
                   for a in rows], [])


def test_every_case_is_stored_as_its_sender_meant(broker_settings):
    cases = all_cases()
    injector = Injector(broker_settings)
    queue_ids = {}
    for index, case in enumerate(cases):
        user = f"case{index}@example.org"  # one user each: cases may share a Message-ID
        add_user(user)
        queue_ids[injector.inject(case.raw, [user])] = (case, user)
    injector.close()
    spool = Spool(broker_settings.resolved_spool_dir)
    quarantined = {q for q, (case, _) in queue_ids.items() if case.quarantine is not None}

    with consumer_thread(broker_settings):
        wait_for(lambda: InboundReceipt.select().count() == len(queue_ids) - len(quarantined)
                 and all((spool.failed / f"{q}.eml.reason").exists() for q in quarantined),
                 timeout=120, message="every case handled")

    store = BlobStore.of(broker_settings)
    failures = {}
    for queue_id, (case, user) in queue_ids.items():
        if case.quarantine is not None:
            reason = (spool.failed / f"{queue_id}.eml.reason").read_text()
            found = differences(case, reason)
        else:
            message = EmailMessage.get(EmailMessage.queue_id == queue_id)
            assert message.user.email == user
            found = differences(case, stored(message, store), status=message.status)
        if found:
            failures[case.id] = found
    assert failures == {}
    assert {case.source for case, _ in queue_ids.values()} == set(SOURCES)  # every source went through
