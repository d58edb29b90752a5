"""The spool sweep against a real RabbitMQ, on SQLite and PostgreSQL: orphaned spool files are
republished (and then stored by the real inbound consumer), done ones removed, unroutable ones
quarantined, each sweep recorded as a HARAKA_EMAIL_FETCH task."""

from __future__ import annotations

import os
import time

from mailferry import broker, tasks
from mailferry.broker import Publisher
from mailferry.contracts import InboundJob
from mailferry.models import EmailMessage, EmailTask, InboundReceipt, TaskSource, TaskStatus, User
from mailferry.spool import Spool
from scheduler.sweep import sweep_spool
from devstack import mailgen
from tests.pipeline import consumer_thread, queue_depth, wait_for
from tests.task_fixtures import drain

S = TaskStatus


def spool_file(spool: Spool, raw: bytes, queue_id: str, age: float,
               rcpt_to: tuple[str, ...] | None = ("bob@example.org",),
               mail_from: str = "sender@example.net") -> os.PathLike:
    """A spool file as Haraka's plugin writes it (its envelope record, then the message);
    ``rcpt_to=None``: a file without a record, as written by hand or by an older version."""
    envelope = None if rcpt_to is None else InboundJob(
        spool_path=f"incoming/{queue_id}.eml", queue_id=queue_id, mail_from=mail_from,
        rcpt_to=list(rcpt_to), size=len(raw), received_at="2026-12-01T00:00:00.000Z",
        remote_ip="192.0.2.1", helo="mx.example.net").to_body()
    _, relative = spool.write_incoming(raw, queue_id, envelope=envelope)
    path = spool.root / relative
    old = time.time() - age
    os.utime(path, (old, old))
    return path


def test_sweep_republishes_orphans_with_their_true_envelope_and_quarantines_the_rest(broker_settings):
    settings = broker_settings.replace(spool_sweep_age=60)
    spool = Spool(settings.resolved_spool_dir).ensure()
    # Bob and c@ are in the headers; bcc-only@ and list-member@ only in the SMTP envelope.
    orphan = spool_file(spool, mailgen.plain(1, to="Bob <bob@example.org>", cc="c@example.org"),
                        "ORPHAN-1", age=120,
                        rcpt_to=("bob@example.org", "c@example.org", "bcc-only@example.org"))
    listed = spool_file(spool, mailgen.plain(2, to="list@example.org"), "ORPHAN-2", age=120,
                        rcpt_to=("list-member@example.org",), mail_from="")
    done = spool_file(spool, mailgen.plain(3), "DONE-3", age=120)
    InboundReceipt.create(queue_id="DONE-3", outcome="stored", stored_count=1)
    legacy = spool_file(spool, mailgen.plain(4), "LEGACY-4", age=120, rcpt_to=None)
    fresh = spool_file(spool, mailgen.plain(5), "FRESH-5", age=5)
    publisher = Publisher(settings, declare=True)

    summary = sweep_spool(settings, publisher)

    assert (summary.found, summary.republished, summary.already_stored, summary.quarantined) == (
        4, 2, 1, 1)
    jobs = {body["queue_id"]: (props, body) for props, body in
            drain(settings.amqp_url, broker.INBOUND)}
    assert sorted(jobs) == ["ORPHAN-1", "ORPHAN-2"]
    props, job = jobs["ORPHAN-1"]
    assert job["spool_path"] == "incoming/ORPHAN-1.eml" and props.message_id == "ORPHAN-1"
    assert job["rcpt_to"] == ["bob@example.org", "c@example.org", "bcc-only@example.org"]
    assert job["mail_from"] == "sender@example.net" and job["helo"] == "mx.example.net"
    assert jobs["ORPHAN-2"][1]["rcpt_to"] == ["list-member@example.org"]
    assert jobs["ORPHAN-2"][1]["mail_from"] == ""  # the null sender, as it came
    assert orphan.exists() and time.time() - orphan.stat().st_mtime < 30  # not again next tick
    assert not done.exists() and fresh.exists() and listed.exists()
    assert not legacy.exists()
    reason = (spool.failed / "LEGACY-4.eml.reason").read_text()
    assert "no envelope record" in reason and (spool.failed / "LEGACY-4.eml").exists()

    task = EmailTask.get(EmailTask.task_id == summary.task_id)
    assert (task.email_source, task.status, task.user_id) == (TaskSource.HARAKA, S.COMPLETED, None)
    assert (task.emails_fetched, task.emails_saved, task.emails_failed, task.emails_processed) == (
        4, 2, 1, 4)
    assert task.details == {"files": 4, "already_stored": 1, "republished": 2, "quarantined": 1,
                            "deferred": 0}
    assert task.lock_key is None
    assert [e.message for e in tasks.execution_log(task.task_id)][-1] == "→ COMPLETED"

    # Straight away again: the republished files are not due yet, so no work and no task.
    again = sweep_spool(settings, publisher)
    publisher.close()
    assert again.found == 0 and again.task_id is None
    assert EmailTask.select().count() == 1


def test_sweep_defers_republishing_while_the_inbound_queue_has_a_backlog(broker_settings):
    settings = broker_settings.replace(spool_sweep_age=60)
    spool = Spool(settings.resolved_spool_dir).ensure()
    old = spool_file(spool, mailgen.plain(1), "WAITING-1", age=120)
    publisher = Publisher(settings, declare=True)
    publisher.publish(broker.ROUTING_KEYS[broker.INBOUND], b'{"v":1}')  # a backlog of one
    summary = sweep_spool(settings, publisher)
    assert (summary.found, summary.republished, summary.deferred) == (1, 0, 1)
    assert len(drain(settings.amqp_url, broker.INBOUND)) == 1  # only the backlog, not doubled
    assert old.exists()
    again = sweep_spool(settings, publisher)  # the queue drained: now it is an orphan
    publisher.close()
    assert (again.republished, again.deferred) == (1, 0)
    assert [body["queue_id"] for _, body in drain(settings.amqp_url, broker.INBOUND)] == ["WAITING-1"]


def test_a_republished_orphan_is_stored_by_the_inbound_consumer(broker_settings):
    settings = broker_settings.replace(spool_sweep_age=60)
    bob = User.create(email="bob@example.org")
    spool = Spool(settings.resolved_spool_dir).ensure()
    path = spool_file(spool, mailgen.plain(7, message_id="<orphan-7@example.net>"), "ORPHAN-7",
                      age=300)
    publisher = Publisher(settings, declare=True)
    assert sweep_spool(settings, publisher).republished == 1
    publisher.close()

    with consumer_thread(settings):
        wait_for(lambda: InboundReceipt.get_or_none(InboundReceipt.queue_id == "ORPHAN-7"),
                 timeout=30, message="the orphan stored")
    stored = EmailMessage.get(EmailMessage.user == bob)
    assert stored.message_id == "<orphan-7@example.net>" and stored.queue_id == "ORPHAN-7"
    wait_for(lambda: not path.exists(), timeout=5, message="the spool file removed")
    assert queue_depth(settings.amqp_url, broker.INBOUND) == 0


def test_sweep_without_a_broker_fails_its_task_and_keeps_the_files(settings):
    settings = settings.replace(spool_sweep_age=60)  # amqp on port 1: nothing listens
    spool = Spool(settings.resolved_spool_dir).ensure()
    path = spool_file(spool, mailgen.plain(1), "ORPHAN-1", age=120)
    try:
        sweep_spool(settings, Publisher(settings))
    except Exception as exc:  # the tick logs it and carries on with its other steps
        assert "RabbitMQ unreachable" in str(exc)
    else:
        raise AssertionError("the sweep should report the broker failure")
    task = EmailTask.get()
    assert task.status == S.FAILED and "spool sweep failed" in task.error_message
    assert path.exists() and time.time() - path.stat().st_mtime > 100  # due again next tick
    assert tasks.create_task(TaskSource.HARAKA, None).status == S.PENDING  # lock released
