"""Spool segments, as Haraka's plugin writes them (many messages per file, group commit): a
record is read only whole and only for the job that names it; the sweep removes a segment once
every message in it is done and republishes the rest; the real consumer stores from them and
dead-letters a torn record as mail never accepted. Against a real RabbitMQ where a broker
is needed."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from mailferry import broker
from mailferry.broker import Publisher
from mailferry.contracts import InboundJob
from mailferry.errors import ContractError
from mailferry.models import EmailMessage, InboundReceipt, User
from mailferry.spool import (
    WITHDRAWN_MARK, Spool, SpoolEntry, TornRecord, envelope_record, read_segment,
)
from scheduler.sweep import sweep_spool
from devstack import mailgen
from tests.pipeline import consumer_thread, queue_depth, wait_for
from tests.task_fixtures import drain


class Segment:
    """A segment file written record by record, as the plugin appends them."""

    def __init__(self, spool: Spool, name: str = "seg-1.seg"):
        self.path = spool.incoming / name
        self.path.write_bytes(b"")
        self.jobs: list[InboundJob] = []

    def add(self, raw: bytes, queue_id: str, rcpt_to=("bob@example.org",)) -> InboundJob:
        offset = self.path.stat().st_size
        job = InboundJob(spool_path=f"incoming/{self.path.name}", queue_id=queue_id,
                         mail_from="sender@example.net", rcpt_to=list(rcpt_to), size=len(raw),
                         received_at="2026-12-06T00:00:00.000Z", spool_offset=offset,
                         sha256=hashlib.sha256(raw).hexdigest())
        with open(self.path, "ab") as f:
            f.write(envelope_record(job.to_body()) + raw)
        self.jobs.append(job)
        return job

    def withdraw(self, queue_id: str) -> None:
        with open(self.path, "ab") as f:
            f.write(WITHDRAWN_MARK + queue_id.encode() + b"\r\n")

    def age(self, seconds: float) -> None:
        old = time.time() - seconds
        os.utime(self.path, (old, old))


@pytest.fixture
def spool(tmp_path) -> Spool:
    return Spool(tmp_path / "spool").ensure()


def test_a_record_reads_whole_and_only_for_its_own_job(spool):
    segment = Segment(spool)
    first = segment.add(mailgen.plain(1), "Q-1")
    second = segment.add(mailgen.plain(2), "Q-2")
    entry = spool.entry(InboundJob.from_body(second.to_body()))
    assert entry.message() == mailgen.plain(2)
    assert entry.record().startswith(envelope_record(second.to_body()))
    # A job that names another message's offset, or a wrong sha256, reads nothing.
    wrong_place = SpoolEntry(segment.path, "Q-2", first.spool_offset, second.size, second.sha256)
    with pytest.raises(TornRecord, match="Q-1's"):
        wrong_place.record()
    with pytest.raises(TornRecord, match="sha256"):
        SpoolEntry(segment.path, "Q-2", second.spool_offset, second.size, "0" * 64).record()


def test_a_torn_tail_is_neither_read_nor_swept(spool):
    segment = Segment(spool)
    whole = segment.add(mailgen.plain(1), "Q-1")
    torn = segment.add(mailgen.plain(2), "Q-2")
    with open(segment.path, "r+b") as f:  # a crash before the group's fdatasync
        f.truncate(torn.spool_offset + 40)
    with pytest.raises(TornRecord):
        spool.entry(torn).record()
    zeros = Segment(spool, "seg-2.seg")
    zeroed = zeros.add(mailgen.plain(3), "Q-3")
    with open(zeros.path, "r+b") as f:  # the size made it to disk, the bytes did not
        f.seek(zeroed.spool_offset + len(envelope_record(zeroed.to_body())) + 20)
        f.write(b"\0" * 100)
    with pytest.raises(TornRecord, match="sha256"):
        spool.entry(zeroed).record()
    records = read_segment(segment.path)
    assert [j.queue_id for j in records.jobs] == ["Q-1"] and records.torn_at == torn.spool_offset
    assert spool.entry(whole).message() == mailgen.plain(1)


def test_a_segment_job_names_a_segment_its_offset_and_the_sha256():
    base = {"v": 1, "queue_id": "Q-1", "mail_from": "", "rcpt_to": ["bob@example.org"],
            "size": 10, "spool_path": "incoming/a-1-1.seg", "spool_offset": 0, "sha256": "a" * 64}
    job = InboundJob.from_body(_body(base))
    assert job.in_segment and job.spool_offset == 0 and job.sha256 == "a" * 64
    assert InboundJob.from_body(job.to_body()) == job
    for change, why in (({"spool_path": "incoming/../x.seg"}, "segment"),
                        ({"spool_path": "failed/a.seg"}, "segment"),
                        ({"spool_offset": -1}, "spool_offset"), ({"spool_offset": "0"}, "spool_offset"),
                        ({"sha256": "A" * 64}, "sha256"), ({"sha256": None}, "sha256")):
        with pytest.raises(ContractError, match=why):
            InboundJob.from_body(_body({**base, **change}))


def _body(data: dict) -> bytes:
    return json.dumps(data).encode()


def test_sweep_removes_a_done_segment_and_republishes_what_is_not(broker_settings):
    settings = broker_settings.replace(spool_sweep_age=60, spool_segment_idle=10)
    spool = Spool(settings.resolved_spool_dir).ensure()
    done = Segment(spool, "done.seg")
    done.add(mailgen.plain(1), "STORED-1")
    done.add(mailgen.plain(2), "WITHDRAWN-2")
    done.withdraw("WITHDRAWN-2")
    done.add(mailgen.plain(3), "QUARANTINED-3")
    (spool.failed / "QUARANTINED-3.eml").write_bytes(b"kept by the consumer")
    InboundReceipt.create(queue_id="STORED-1", outcome="stored", stored_count=1)
    done.age(30)  # unwritten for long enough, though not old enough to republish
    mixed = Segment(spool, "mixed.seg")
    mixed.add(mailgen.plain(4), "STORED-4")
    InboundReceipt.create(queue_id="STORED-4", outcome="stored", stored_count=1)
    orphan = mixed.add(mailgen.plain(5), "ORPHAN-5", rcpt_to=("bob@example.org", "bcc@example.org"))
    mixed.age(120)
    busy = Segment(spool, "busy.seg")  # Haraka may still append to it
    busy.add(mailgen.plain(6), "STORED-6")
    InboundReceipt.create(queue_id="STORED-6", outcome="stored", stored_count=1)
    publisher = Publisher(settings, declare=True)

    summary = sweep_spool(settings, publisher)

    assert (summary.segments_removed, summary.found, summary.republished) == (1, 1, 1)
    assert not done.path.exists() and mixed.path.exists() and busy.path.exists()
    [(props, body)] = drain(settings.amqp_url, broker.INBOUND)
    assert InboundJob.from_body(_body(body)) == orphan and props.message_id == "ORPHAN-5"
    assert time.time() - mixed.path.stat().st_mtime < 30  # not again before spool_sweep_age
    again = sweep_spool(settings, publisher)
    publisher.close()
    assert (again.found, again.segments_removed) == (0, 0)


def test_the_consumer_stores_from_a_segment_and_dead_letters_a_torn_record(broker_settings):
    settings = broker_settings
    bob = User.create(email="bob@example.org")
    spool = Spool(settings.resolved_spool_dir).ensure()
    segment = Segment(spool)
    good = segment.add(mailgen.plain(1, message_id="<seg-1@example.net>"), "SEG-1")
    torn = segment.add(mailgen.plain(2, message_id="<seg-2@example.net>"), "SEG-2")
    with open(segment.path, "r+b") as f:
        f.truncate(torn.spool_offset + torn.size // 2)
    publisher = Publisher(settings, declare=True)
    for job in (good, torn):
        publisher.publish(broker.ROUTING_KEYS[broker.INBOUND], job.to_body(), message_id=job.queue_id)
    publisher.close()
    with consumer_thread(settings):
        wait_for(lambda: InboundReceipt.get_or_none(InboundReceipt.queue_id == "SEG-1")
                 and queue_depth(settings.amqp_url, broker.DEAD) == 1,
                 timeout=30, message="one stored, one dead-lettered")
    stored = EmailMessage.get(EmailMessage.user == bob)
    assert stored.message_id == "<seg-1@example.net>"
    [(props, _)] = drain(settings.amqp_url, broker.DEAD)
    reason = props.headers["x-mailferry-reason"]
    assert "not whole" in reason and "never accepted" in reason, reason
    assert segment.path.exists()  # the sweep reclaims it, not the consumer
    assert list(Path(spool.failed).iterdir()) == []
