"""The inbound consumer against a real RabbitMQ, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import re
import json

import pika
import pytest

from mailread.parse import parse_email
from mailferry import broker
from mailferry.inject import Injector
from mailferry.users import add_alias, add_user
from mailferry.errors import EmailParseError
from mailferry.models import EmailAttachment, EmailMessage, InboundReceipt, UnroutedMessage, User
from mailferry.payload import body_of
from mailferry.spool import Spool
from mailferry.storage import BlobStore
from devstack import mailgen
from tests.pipeline import consumer_thread, dead_letters, wait_for


def handled(queue_ids) -> bool:
    return InboundReceipt.select().where(InboundReceipt.queue_id.in_(list(queue_ids))).count() == len(queue_ids)


@pytest.mark.parametrize("where", ["folders", "s3"])
def test_every_corpus_message_is_stored_or_quarantined_with_a_reason(broker_settings, where, request):
    settings = broker_settings
    if where == "s3":  # a real S3-compatible server: no object may land in a folder
        settings = settings.replace(**request.getfixturevalue("s3_prefix"), body_storage="storage")
    bob = add_user("bob@example.org")
    injector = Injector(settings)
    expected_ok, expected_bad = {}, []
    for path in mailgen.corpus_files():
        raw = path.read_bytes()
        queue_id = injector.inject(raw, ["bob@example.org"])
        try:
            expected_ok[queue_id] = parse_email(raw)
        except EmailParseError:
            expected_bad.append(queue_id)
    injector.close()
    spool = Spool(settings.resolved_spool_dir)

    with consumer_thread(settings) as runner:
        wait_for(lambda: handled(expected_ok) and all(
            (spool.failed / f"{q}.eml.reason").exists() for q in expected_bad),
            timeout=60, message="every corpus message handled")
        assert runner.ready.is_set()  # still consuming after the whole corpus

    assert expected_bad, "the corpus holds at least one message over the limits"
    for queue_id in expected_bad:
        reason = (spool.failed / f"{queue_id}.eml.reason").read_text()
        assert "MIME" in reason
    letters = dead_letters(settings.amqp_url)
    assert sorted(json.loads(body)["queue_id"] for _, body in letters) == sorted(expected_bad)
    assert all(headers[broker.H_REASON].startswith("quarantined") for headers, _ in letters)

    store = BlobStore.of(settings)
    by_message_id = {m.message_id: m for m in EmailMessage.select().where(EmailMessage.user == bob)}
    # Messages sharing a Message-ID are one message: stored once.
    assert set(by_message_id) == {p.message_id for p in expected_ok.values()}
    for queue_id, parsed in expected_ok.items():
        stored = by_message_id[parsed.message_id]
        if stored.sha256 != parsed.sha256:
            continue  # the other file with this Message-ID was stored
        assert hashlib.sha256(store.read_raw(stored.raw_path)).hexdigest() == parsed.sha256
        if where == "s3":  # the bodies are objects too, and the row holds their keys
            assert (stored.text_content, stored.html_content) == ("", "")
            assert (bool(stored.text_path), bool(stored.html_path)) == (bool(parsed.text), bool(parsed.html))
        assert body_of(store, stored.text_path, stored.text_content) == parsed.text
        assert body_of(store, stored.html_path, stored.html_content) == parsed.html
        atts = list(EmailAttachment.select().where(EmailAttachment.email_message == stored)
                    .order_by(EmailAttachment.id))
        assert [a.file_size for a in atts] == [a.size for a in parsed.attachments]
        for att, want in zip(atts, parsed.attachments):
            assert store.read(att.file_path) == want.data
    assert list(spool.incoming.glob("*.eml")) == []
    referenced = {key for m in by_message_id.values() for key in m.storage_keys} | \
        {a.file_path for a in EmailAttachment.select()}
    assert referenced <= set(store.keys())  # (a duplicate's files are written before its row is refused)
    if where == "s3":
        assert not settings.resolved_storage_dir.exists() or \
            not any(p.is_file() for p in settings.resolved_storage_dir.rglob("*"))


def test_hostile_filename_is_stored_under_its_hash(broker_settings):
    add_user("bob@example.org")
    injector = Injector(broker_settings)
    queue_id = injector.inject(mailgen.with_attachment(1, "../../../etc/x", b"payload"))
    injector.close()
    with consumer_thread(broker_settings):
        wait_for(lambda: handled([queue_id]))
    att = EmailAttachment.get()
    digest = hashlib.sha256(b"payload").hexdigest()
    assert att.filename == "../../../etc/x"
    assert att.safe_filename == "x" and "/" not in att.safe_filename and "\\" not in att.safe_filename
    assert re.fullmatch(rf"parts/\d{{4}}-\d\d-\d\d/{digest}", att.file_path)
    assert (broker_settings.resolved_storage_dir / att.file_path).read_bytes() == b"payload"


def test_the_same_file_injected_twice_is_stored_once(broker_settings):
    add_user("bob@example.org")
    raw = mailgen.plain(1)
    injector = Injector(broker_settings)
    ids = [injector.inject(raw), injector.inject(raw)]
    injector.close()
    with consumer_thread(broker_settings):
        wait_for(lambda: handled(ids))
    assert EmailMessage.select().count() == 1
    assert sorted(r.outcome for r in InboundReceipt.select()) == ["duplicate", "stored"]


def test_each_envelope_recipient_gets_a_copy_bcc_and_plus_address_included(broker_settings):
    alice = add_user("alice@example.org")
    bob = add_user("bob@example.org")
    carol = add_user("carol@example.org")
    add_alias("carol@example.org", "support@example.org")
    raw = mailgen.plain(1, to="alice@example.org")  # bob and support are Bcc: envelope only
    injector = Injector(broker_settings)
    queue_id = injector.inject(raw, ["alice@example.org", "Bob+tickets@Example.org",
                                     "SUPPORT@example.org", "stranger@example.org"])
    injector.close()
    with consumer_thread(broker_settings):
        wait_for(lambda: handled([queue_id]))
    rows = {m.user_id: m for m in EmailMessage.select()}
    assert set(rows) == {alice.id, bob.id, carol.id}
    assert rows[bob.id].plus_tag == "tickets"
    assert rows[alice.id].plus_tag is None
    assert rows[bob.id].envelope["rcpt_to"][1] == "Bob+tickets@Example.org"
    assert len({m.raw_path for m in rows.values()}) == 1  # one raw file for all copies


def test_mail_for_nobody_is_recorded_as_unrouted(broker_settings):
    add_user("bob@example.org")
    injector = Injector(broker_settings)
    queue_id = injector.inject(mailgen.plain(7), ["nobody@example.org"])
    injector.close()
    with consumer_thread(broker_settings):
        wait_for(lambda: handled([queue_id]))
    unrouted = UnroutedMessage.get()
    assert unrouted.rcpt_to == ["nobody@example.org"] and unrouted.message_id == "<test-7@example.net>"
    assert (broker_settings.resolved_storage_dir / unrouted.raw_path).exists()
    assert EmailMessage.select().count() == 0


def test_bad_jobs_are_dead_lettered_with_their_reason(broker_settings):
    add_user("bob@example.org")
    settings = broker_settings
    outside = settings.var_dir / "outside.eml"
    outside.write_bytes(mailgen.plain(1))
    jobs = {
        b"not json": "not UTF-8 JSON",
        json.dumps({"v": 2}).encode(): "unsupported contract version",
        json.dumps({"v": 1, "spool_path": "../outside.eml", "queue_id": "Q1", "mail_from": "",
                    "rcpt_to": ["bob@example.org"]}).encode(): "must be 'incoming/Q1.eml'",
        json.dumps({"v": 1, "spool_path": "incoming/Q2.eml", "queue_id": "Q2", "mail_from": "",
                    "rcpt_to": ["bob@example.org"]}).encode(): "is missing",
        json.dumps({"v": 1, "spool_path": "incoming/x.eml", "queue_id": "Q3", "mail_from": "",
                    "rcpt_to": []}).encode(): "rcpt_to",
    }
    publisher = broker.Publisher(settings, declare=True)
    for body in jobs:
        publisher.publish("inbound", body)
    good = Injector(settings)
    good_id = good.inject(mailgen.plain(2))
    good.close()
    publisher.close()
    with consumer_thread(settings):
        wait_for(lambda: handled([good_id]))
        letters = wait_for(lambda: (lambda found: found if len(found) >= len(jobs) else None)(
            dead_letters_accumulate(settings.amqp_url)), timeout=20, message="dead letters")
    reasons = {body: headers[broker.H_REASON] for headers, body in letters}
    for body, expected in jobs.items():
        assert expected in reasons[body], (body, reasons[body])
    assert all(h[broker.H_QUEUE] == broker.INBOUND for h, _ in letters)
    assert outside.exists()  # never touched
    assert EmailMessage.select().count() == 1


_accumulated: dict[str, list] = {}


def dead_letters_accumulate(url: str) -> list:
    _accumulated.setdefault(url, []).extend(dead_letters(url))
    return list(_accumulated[url])


def test_sigterm_like_stop_leaves_nothing_unacked(broker_settings):
    add_user("bob@example.org")
    injector = Injector(broker_settings)
    ids = [injector.inject(mailgen.plain(n)) for n in range(50)]
    injector.close()
    with consumer_thread(broker_settings):
        wait_for(lambda: handled(ids))
    connection = pika.BlockingConnection(pika.URLParameters(broker_settings.amqp_url))
    declared = connection.channel().queue_declare(broker.INBOUND, passive=True)
    connection.close()
    assert declared.method.message_count == 0 and declared.method.consumer_count == 0
    assert User.get().messages.count() == 50


def test_parsing_in_the_consumer_thread_gives_the_same_result(sqlite_broker_settings):
    """MAILFERRY_PARSE_PROCESS=off (what a one-core machine gets): same outcomes, no helper."""
    settings = sqlite_broker_settings.replace(parse_process="off")
    add_user("bob@example.org")
    injector = Injector(settings)
    ok = [injector.inject(mailgen.with_attachment(1, "a.pdf", b"%PDF-1"))]
    ok.append(injector.inject(mailgen.national(2, "koi8-r", "Привет")))
    endless = injector.inject((mailgen.CORPUS / "enclosed-endless.eml").read_bytes(), ["bob@example.org"])
    injector.close()
    from consumer.inbound import InboundHandler
    from consumer.parse_pool import InProcess
    handler = InboundHandler(settings)
    assert isinstance(handler.parser, InProcess)  # no helper process
    spool = Spool(settings.resolved_spool_dir)
    with consumer_thread(settings, [handler]):
        wait_for(lambda: handled(ok) and (spool.failed / f"{endless}.eml.reason").exists())
    subjects = sorted(m.subject for m in EmailMessage.select())
    assert subjects == ["Attachment 1", "Привет"]
    assert EmailAttachment.get().safe_filename == "a.pdf"
    assert [json.loads(body)["queue_id"] for _, body in dead_letters(settings.amqp_url)] == [endless]


@pytest.mark.parametrize("redelivered", [True, False], ids=["redelivered", "first-delivery"])
def test_a_job_committed_before_is_an_acknowledged_duplicate(settings, redelivered):
    """The ack of a committed batch was lost (a crash, a broker restart) and RabbitMQ delivers
    the job again, or the job was published twice: the repeat is acked as a duplicate, with
    its spool file already removed or still there — never stored twice, never dead-lettered
    as missing. Only a redelivery is looked up before parsing; the others meet the receipt's
    unique key or the lookup of a missing file."""
    from consumer.inbound import InboundHandler
    from mailferry.contracts import InboundJob, now_iso
    from consumer.handler import Delivery

    add_user("bob@example.org")
    handler = InboundHandler(settings.replace(parse_process="off"))
    spool = handler.spool
    raw = mailgen.plain(1)
    queue_id, relative = spool.write_incoming(raw)
    job = InboundJob(spool_path=relative, queue_id=queue_id, mail_from="", rcpt_to=["bob@example.org"],
                     size=len(raw), received_at=now_iso(), remote_ip="127.0.0.1", helo="test")

    def handle(again: bool) -> list[str]:
        delivery = Delivery(1, job.to_body(), pika.BasicProperties(), again, "inbound", 0)
        return [outcome.action for outcome in handler.handle([delivery])]

    assert handle(False) == ["ack"]
    assert not (spool.root / relative).exists()  # removed after the commit
    assert handle(redelivered) == ["ack"]  # its file is gone
    spool.write_incoming(raw, queue_id)  # a crash came between the commit and the removal
    assert handle(redelivered) == ["ack"]
    assert not (spool.root / relative).exists()
    assert EmailMessage.select().count() == 1
    assert [r.outcome for r in InboundReceipt.select()] == ["stored"]
    assert list(spool.failed.iterdir()) == []
