"""Hostile input against the real services: over SMTP through Haraka, raw jobs published to
RabbitMQ, files the sweep finds, on SQLite and PostgreSQL. Each hostile item is stored or
quarantined with its reason; the good mail beside it is stored on the first attempt;
nothing waits in the spool at the end; the consumer and the scheduler keep running."""

from __future__ import annotations

import json
import os
import threading
import time

import pika
import pytest

from mailferry import broker, metrics
from mailferry.broker import Publisher
from mailferry.inject import Injector
from mailferry.users import add_user
from mailferry.models import EmailMessage, InboundReceipt, UnroutedMessage
from consumer.handler import Handler, Outcome
from consumer.runner import Runner
from mailferry.spool import Spool
from scheduler.sweep import sweep_spool
from scheduler.tick import run_tick
from devstack import mailgen
from tests.pipeline import consumer_thread, dead_letters, wait_for, waiting_in_spool
from tests.test_scheduler_sweep import spool_file
from tests.test_smtp_pipeline import Smtp, haraka_for, haraka_installed, queue_id  # noqa: F401

HOSTILE_HEADERS = {
    "parentheses": b"To: " + b"(" * 600 + b"bob@example.org\r\n",
    "zlib-charset": b"To: bob@example.org\r\nSubject: =?zlib?q?=FF?=\r\n",
    "nul-subject": b"To: bob@example.org\r\nSubject: =?utf-8?b?AA==?=nul\r\n",
    "rot13-subject": b"To: bob@example.org\r\nSubject: =?rot13?q?uryyb?=\r\n",
    "huge-message-id": b"To: bob@example.org\r\nIn-Reply-To: <" + b"r" * 900 + b"@x>\r\n",
}


def hostile(name: str, n: int) -> bytes:
    return (HOSTILE_HEADERS[name] + b"From: sender@example.net\r\n"
            + f"Message-ID: <hostile-{n}@example.net>\r\n\r\nbody {name}\r\n".encode())


def incoming(settings) -> list[str]:
    folder = settings.resolved_spool_dir / "incoming"
    return sorted(p.name for p in folder.iterdir())


def requeued() -> float:
    return metrics.requeued.labels(queue=broker.INBOUND)._value.get()


def test_hostile_headers_over_smtp_are_stored_and_the_good_mail_beside_them_too(
        broker_settings, haraka_installed, tmp_path):
    settings = broker_settings
    bob = add_user("bob@example.org")
    long_tag = "bob+" + "t" * 300 + "@example.org"  # plus_tag is varchar(255)
    before = requeued()
    with consumer_thread(settings) as runner, haraka_for(settings, tmp_path) as haraka:
        haraka.wait_connected()
        sent = []
        with Smtp(haraka) as smtp:
            for n, name in enumerate(HOSTILE_HEADERS):
                code, reply = smtp.send(hostile(name, n), ["bob@example.org"])
                assert code == 250, (name, reply)
                sent.append(queue_id(reply))
                code, reply = smtp.send(mailgen.plain(100 + n), ["bob@example.org"])
                assert code == 250, reply
                sent.append(queue_id(reply))
        # Haraka refuses a path over 256 octets; a job can still carry one (the injector).
        injector = Injector(settings)
        sent.append(injector.inject(mailgen.plain(99, to="bob@example.org"), [long_tag]))
        injector.close()
        wait_for(lambda: InboundReceipt.select().where(InboundReceipt.queue_id.in_(sent)).count()
                 == len(sent), timeout=60, message="every message handled")
        assert runner.ready.is_set() and runner.crashed is None
    rows = {m.message_id: m for m in EmailMessage.select().where(EmailMessage.user == bob)}
    for n, name in enumerate(HOSTILE_HEADERS):
        assert f"<hostile-{n}@example.net>" in rows, name  # stored, not quarantined
        assert f"<test-{100 + n}@example.net>" in rows
    assert rows["<hostile-2@example.net>"].subject == "nul"  # the NUL stripped on both databases
    assert rows["<hostile-0@example.net>"].recipients == ["bob@example.org"]
    tagged = rows["<test-99@example.net>"]
    assert len(tagged.plus_tag) <= 255 and tagged.plus_tag.startswith("t" * 200)
    assert rows["<hostile-4@example.net>"].in_reply_to == "<" + "r" * 900 + "@x>"  # a text column
    assert dead_letters(settings.amqp_url) == []
    assert requeued() == before  # nothing needed a second attempt
    assert waiting_in_spool(settings) == []  # every segment record stored


def _job(queue_id: str, **overrides) -> bytes:
    body = {"v": 1, "spool_path": f"incoming/{queue_id}.eml", "queue_id": queue_id,
            "mail_from": "", "rcpt_to": ["bob@example.org"], "size": 10}
    body.update(overrides)
    return json.dumps(body).encode()


def test_malformed_jobs_are_dead_lettered_at_once_and_the_batch_is_stored_first_time(broker_settings):
    settings = broker_settings
    add_user("bob@example.org")
    spool = Spool(settings.resolved_spool_dir).ensure()
    injector = Injector(settings)
    good = [injector.inject(mailgen.plain(n)) for n in range(3)]
    # Another message's file, waiting for its own job: a job naming it must not take it.
    victim, victim_path = spool.write_incoming(mailgen.plain(50), "VICTIM")
    (spool.failed / "OLD.eml").write_bytes(mailgen.plain(51))
    jobs = {
        _job("S1", size="x"): "field 'size' is not a number",
        _job("S2", size={}): "field 'size' is not a number",
        _job("S3").replace(b'"size": 10', b'"size": 1e400'): "not a whole number",
        _job("S4", size=-1): "out of range",
        _job("P1", spool_path="incoming"): "must be 'incoming/P1.eml'",
        _job("P2", spool_path="failed/OLD.eml"): "must be 'incoming/P2.eml'",
        _job("P3", spool_path=victim_path): "must be 'incoming/P3.eml'",
        _job("../x"): "field 'queue_id'",
        _job("H1", helo=["x"]): "field 'helo' is not a string",
    }
    publisher = Publisher(settings, declare=True)
    for body in jobs:
        publisher.publish(broker.ROUTING_KEYS[broker.INBOUND], body)
    good += [injector.inject(mailgen.plain(n)) for n in range(3, 6)]
    injector.close()
    publisher.close()
    before = requeued()
    with consumer_thread(settings) as runner:
        wait_for(lambda: InboundReceipt.select().where(InboundReceipt.queue_id.in_(good)).count()
                 == len(good), message="the good mail stored")
        letters = wait_for(lambda: _accumulate(settings.amqp_url, len(jobs)), timeout=20,
                           message="dead letters")
        assert runner.ready.is_set() and runner.crashed is None
    reasons = {body: headers[broker.H_REASON] for headers, body in letters}
    for body, expected in jobs.items():
        assert reasons[body].startswith("malformed job: "), reasons[body]
        assert expected in reasons[body], (body, reasons[body])
    assert requeued() == before  # dead-lettered at once, the rest stored on the first attempt
    assert (spool.root / victim_path).exists()  # untouched, for its own job
    assert (spool.failed / "OLD.eml").exists()
    assert spool.incoming.is_dir()
    assert incoming(settings) == ["VICTIM.eml"]


_seen: list = []


def _accumulate(url: str, wanted: int):
    _seen.extend(dead_letters(url))
    return list(_seen) if len(_seen) >= wanted else None


def test_a_spool_file_that_cannot_be_read_is_its_own_message_outcome(broker_settings):
    settings = broker_settings
    add_user("bob@example.org")
    spool = Spool(settings.resolved_spool_dir).ensure()
    os.mkfifo(spool.incoming / "FIFO1.eml")
    (spool.incoming / "DIR1.eml").mkdir()
    (spool.incoming / "LINK1.eml").symlink_to("/etc/passwd")
    publisher = Publisher(settings, declare=True)
    for qid in ("FIFO1", "DIR1", "LINK1"):
        publisher.publish(broker.ROUTING_KEYS[broker.INBOUND], _job(qid))
    publisher.close()
    injector = Injector(settings)
    good = [injector.inject(mailgen.plain(n)) for n in range(4)]
    injector.close()
    before = requeued()
    _seen.clear()
    with consumer_thread(settings) as runner:
        wait_for(lambda: InboundReceipt.select().where(InboundReceipt.queue_id.in_(good)).count()
                 == len(good), message="the good mail stored")
        letters = wait_for(lambda: _accumulate(settings.amqp_url, 3), timeout=20, message="dead letters")
        assert runner.crashed is None
    reasons = {json.loads(body)["queue_id"]: headers[broker.H_REASON] for headers, body in letters}
    assert "not a regular file" in reasons["FIFO1"] and "quarantined" in reasons["FIFO1"]
    assert "not a regular file" in reasons["DIR1"]
    assert "symbolic link" in reasons["LINK1"]
    assert requeued() == before
    assert (spool.failed / "FIFO1.eml.reason").exists()
    assert EmailMessage.select().count() == len(good)


def test_the_sweep_skips_what_is_not_a_file_and_quarantines_what_it_cannot_parse(broker_settings):
    settings = broker_settings.replace(spool_sweep_age=60)
    spool = Spool(settings.resolved_spool_dir).ensure()
    os.mkfifo(spool.incoming / "FIFO2.eml")
    (spool.incoming / "DIR2.eml").mkdir()
    spool_file(spool, b"To: " + b"(" * 600 + b"bob@example.org\r\n\r\nhi\r\n", "PAREN-1", age=120)
    spool_file(spool, b"To: =?zlib?q?=FF?= <bob@example.org>\r\n\r\nhi\r\n", "ZLIB-1", age=120)
    spool_file(spool, mailgen.plain(1), "GOOD-1", age=120)
    publisher = Publisher(settings, declare=True)
    done = threading.Event()
    result = {}

    def sweep():
        result["summary"] = sweep_spool(settings, publisher)
        done.set()

    threading.Thread(target=sweep, daemon=True).start()
    assert done.wait(20), "the sweep blocked (a FIFO opened for reading?)"
    publisher.close()
    summary = result["summary"]
    assert summary.status == "COMPLETED"
    # Their headers are never read: each carries its envelope record, republished as it is.
    assert (summary.republished, summary.quarantined) == (3, 0)
    assert (spool.incoming / "FIFO2.eml").exists() and (spool.incoming / "DIR2.eml").is_dir()


def test_a_tick_step_that_raises_anything_is_counted_and_the_tick_goes_on(
        sqlite_broker_settings, monkeypatch):
    settings = sqlite_broker_settings
    import scheduler.tick as tick

    def explode(*_args, **_kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(tick, "sweep_spool", explode)
    counter = metrics.scheduler_tick_failures.labels("sweep")
    before = counter._value.get()
    publisher = Publisher(settings, declare=True)
    try:
        result = run_tick(settings, publisher)
    finally:
        publisher.close()
    assert result.failed_steps == ["sweep"]
    assert result.retention is not None  # the steps after it still ran
    assert counter._value.get() == before + 1


class _Crashing(Handler):
    """A handler whose worker thread dies of something outside every handler's contract."""

    queue = broker.INBOUND
    prefetch = 4

    def handle(self, deliveries):
        raise SystemExit("worker thread killed")  # not an Exception: escapes _handle


def test_a_consumer_whose_worker_dies_stops_and_says_why(sqlite_broker_settings):
    settings = sqlite_broker_settings
    publisher = Publisher(settings, declare=True)
    publisher.publish(broker.ROUTING_KEYS[broker.INBOUND], _job("CRASH1"))
    publisher.close()
    runner = Runner(settings, [_Crashing()])
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "run() must return when a worker died"
    assert runner.crashed and "worker for mailferry.inbound died" in runner.crashed
    assert not runner.ready.is_set()
    # The job was not acked: it waits for the restarted consumer.
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        assert connection.channel().queue_declare(broker.INBOUND, passive=True).method.message_count == 1
    finally:
        connection.close()


# -- IMAP against a hostile server ---------------------------------------------------------

from consumer.imap_sync import MailboxSync  # noqa: E402
from mailferry.errors import EmailFetchError  # noqa: E402
from mailferry.mailbox_config import EmailConfigManager  # noqa: E402
from mailferry.models import MailboxState, User  # noqa: E402
from tests.hostile_imap import HostileImapServer  # noqa: E402
from tests.imap_fixtures import append, generated  # noqa: E402
from tests.imap_fixtures import imap_user  # noqa: E402,F401


def _hostile_mailbox(settings, server: HostileImapServer) -> tuple[User, object]:
    user = User.create(email="victim@example.org")
    configs = EmailConfigManager(settings)
    configs.set_imap_config(user, {"host": server.host, "port": server.port, "username": "u",
                                   "password": "p", "security": "none", "folder": "INBOX"})
    return user, configs.get_imap_config(user)


def test_a_server_that_trickles_bytes_is_cut_off_at_the_fetch_deadline(sqlite_settings):
    settings = sqlite_settings.replace(imap_timeout=2, imap_fetch_deadline=5)
    with HostileImapServer("slow", trickle=0.5) as server:
        user, config = _hostile_mailbox(settings, server)
        started = time.monotonic()
        with pytest.raises(EmailFetchError, match="deadline of 5 s"):
            MailboxSync(settings, parse_in_helper=False).run(user, config)
        took = time.monotonic() - started
    assert server.literal_started.is_set()  # it was cut off mid-literal, every read on time
    assert took < 9, f"the fetch took {took:.1f} s, past its 5 s deadline"


def test_a_literal_announced_over_the_limit_is_refused_before_it_is_read(sqlite_settings):
    settings = sqlite_settings.replace(max_message_bytes=1_000_000)
    with HostileImapServer("huge", announce=1_000_000_000) as server:
        user, config = _hostile_mailbox(settings, server)
        with pytest.raises(EmailFetchError, match="literal of 1000000000 bytes"):
            MailboxSync(settings, parse_in_helper=False).run(user, config)


def test_a_disconnect_mid_literal_is_a_transient_error_and_nothing_is_stored(sqlite_settings):
    with HostileImapServer("cut") as server:
        user, config = _hostile_mailbox(sqlite_settings, server)
        with pytest.raises(EmailFetchError):
            MailboxSync(sqlite_settings, parse_in_helper=False).run(user, config)
    assert EmailMessage.select().count() == 0
    state = MailboxState.get_or_none(MailboxState.user == user)
    assert state is None or state.last_uid == 0  # the checkpoint did not move past it


def test_a_message_over_the_size_limit_is_skipped_before_fetching_and_the_checkpoint_moves_on(
        imap_user):
    big = mailgen.with_attachment(900, "big.bin", os.urandom(300_000))
    append(imap_user.account, generated(0, 2) + [big] + generated(2, 2))
    settings = imap_user.settings.replace(max_message_bytes=200_000)
    result = MailboxSync(settings, parse_in_helper=False).run(imap_user.user, imap_user.config)
    assert result.fetched == 4 and result.saved == 4
    assert len(result.skipped) == 1 and "uid=3" in result.skipped[0]
    assert "over the limit of 200000" in result.skipped[0]
    assert MailboxState.get(MailboxState.user == imap_user.user).last_uid == 5
    again = MailboxSync(settings, parse_in_helper=False).run(imap_user.user, imap_user.config)
    assert again.new == 0  # not fetched again next time


def test_the_consumer_runs_more_than_one_imap_lane(sqlite_settings):
    from consumer.imap_worker import build_handlers
    lanes = build_handlers(sqlite_settings.replace(imap_lanes=3))
    assert len(lanes) == 3 and len({id(h.sync) for h in lanes}) == 3  # each its own session


def test_a_job_lost_with_the_broker_is_republished_with_its_true_envelope_bcc_included(
        broker_settings, haraka_installed, tmp_path):
    settings = broker_settings.replace(spool_sweep_age=60)
    alice, bob = add_user("alice@example.org"), add_user("bob@example.org")
    raw = mailgen.plain(1, to="alice@example.org")  # bob is a Bcc recipient: in no header
    broker.setup_topology(settings)  # the queues, as a consumer declares them
    with haraka_for(settings, tmp_path) as haraka:  # no consumer: the job waits in the queue
        haraka.wait_connected()
        with Smtp(haraka) as smtp:
            code, reply = smtp.send(raw, ["alice@example.org", "bob@example.org"])
        assert code == 250, reply
    qid = queue_id(reply)
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        connection.channel().queue_purge(broker.INBOUND)  # the broker lost the job
    finally:
        connection.close()
    [segment] = Spool(settings.resolved_spool_dir).segments()  # the record Haraka wrote
    old = time.time() - 300
    os.utime(segment, (old, old))
    publisher = Publisher(settings, declare=True)
    try:
        assert sweep_spool(settings, publisher).republished == 1
    finally:
        publisher.close()
    with consumer_thread(settings):
        wait_for(lambda: InboundReceipt.get_or_none(InboundReceipt.queue_id == qid),
                 message="the republished job stored")
    assert waiting_in_spool(settings) == []
    # The sweep touched the segment when it republished; once idle again it is reclaimed.
    later = time.time() + settings.spool_segment_idle + 1
    assert sweep_spool(settings, None, now=later).segments_removed == 1
    owners = {m.user_id: m for m in EmailMessage.select()}
    assert set(owners) == {alice.id, bob.id}  # the Bcc recipient kept his copy
    assert owners[bob.id].envelope["rcpt_to"] == ["alice@example.org", "bob@example.org"]
    assert owners[bob.id].envelope["helo"] == "client.example.net"  # what Haraka published
    assert incoming(settings) == []


def test_hostile_mail_in_an_imap_mailbox_is_stored_and_the_checkpoint_moves_past_it(imap_user):
    messages = [hostile(name, n) for n, name in enumerate(HOSTILE_HEADERS)] + generated(0, 3)
    append(imap_user.account, messages)
    result = MailboxSync(imap_user.settings, parse_in_helper=False).run(imap_user.user,
                                                                       imap_user.config)
    assert (result.fetched, result.saved, result.failed) == (len(messages), len(messages), 0)
    assert MailboxState.get(MailboxState.user == imap_user.user).last_uid == len(messages)
    subjects = {m.message_id: m.subject for m in EmailMessage.select()}
    assert subjects["<hostile-2@example.net>"] == "nul"


def test_a_batch_of_hostile_mail_through_the_parser_process_is_settled_on_the_first_attempt(
        broker_settings):
    """Every message is stored or quarantined with its reason; none is an 'unexpected error'
    of its batch, none is requeued, spool/incoming ends empty."""
    settings = broker_settings.replace(parse_process="on")
    add_user("bob@example.org")
    too_deep = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
                        for i in range(60))
    batch = []
    for n in range(40):
        name = list(HOSTILE_HEADERS)[n % len(HOSTILE_HEADERS)]
        batch.append(hostile(name, n))
        batch.append(b"From: a@x\r\nTo: bob@example.org\r\nMessage-ID: <deep-%d@x>\r\n" % n
                     + too_deep)
        batch.append(mailgen.plain(500 + n))
    injector = Injector(settings)
    ids = [injector.inject(raw, ["bob@example.org"]) for raw in batch]
    injector.close()
    spool = Spool(settings.resolved_spool_dir)
    before = requeued()
    _seen.clear()
    with consumer_thread(settings) as runner:
        wait_for(lambda: InboundReceipt.select().where(InboundReceipt.queue_id.in_(ids)).count()
                 == 80, timeout=60, message="the stored ones")
        letters = wait_for(lambda: _accumulate(settings.amqp_url, 40), timeout=30,
                           message="the quarantined ones")
        assert runner.crashed is None
    reasons = [headers[broker.H_REASON] for headers, _ in letters]
    assert len(reasons) == 40
    assert all(r.startswith("quarantined") and "MIME nesting deeper" in r for r in reasons), reasons[:3]
    assert requeued() == before
    assert incoming(settings) == []
    assert len(list(spool.failed.glob("*.eml.reason"))) == 40


def test_a_fetch_task_closes_its_connection_at_the_task_timeout(sqlite_settings):
    """The watchdog only marks the row; the worker's own deadline is the task's timeout_at."""
    from consumer.imap_worker import run_fetch_task
    from mailferry import tasks
    from mailferry.models import TaskSource, TaskStatus
    settings = sqlite_settings.replace(imap_timeout=2)  # imap_fetch_deadline stays 120 s
    with HostileImapServer("slow", trickle=0.5) as server:
        user, _ = _hostile_mailbox(settings, server)
        task = tasks.start_task(tasks.create_task(TaskSource.IMAP, user.id, timeout_seconds=5).task_id)
        started = time.monotonic()
        status = run_fetch_task(task, None, sync=MailboxSync(settings, parse_in_helper=False),
                                configs=EmailConfigManager(settings), backoff=0.1, attempts=2,
                                attempt_deadline=settings.imap_fetch_deadline)
        took = time.monotonic() - started
    assert status == TaskStatus.FAILED
    assert "deadline" in tasks.get_task(task.task_id).error_message
    assert took < 15, f"the fetch held its connection {took:.0f} s past a 5 s task timeout"
