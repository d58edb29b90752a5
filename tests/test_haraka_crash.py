"""Haraka SIGKILLed while groups of messages are on their way to the disk and the broker: every
message that got a 250 is stored exactly once, and every message its sender sends again
(it saw no 250) is stored once, not twice — whatever the crash left in the spool, once the
sweep has republished it. Real Haraka, RabbitMQ and consumer process."""

from __future__ import annotations

import os
import signal
import smtplib
import threading
import time
from collections import Counter

from mailferry import broker
from mailferry.broker import Publisher
from mailferry.models import EmailMessage
from mailferry.spool import Spool
from mailferry.users import add_user
from scheduler.sweep import sweep_spool
from devstack import mailgen
from tests.pipeline import consumer_process, dead_letters, queue_depth, wait_for, waiting_in_spool
from tests.test_haraka_plugin_js import haraka_installed  # noqa: F401 (a fixture)
from tests.test_smtp_pipeline import Smtp, haraka_for, queue_id

MESSAGES = 600
SENDERS = 8
KILL_AFTER = 150  # answers before the kill: the senders are mid-stream then


def message(n: int) -> bytes:
    return mailgen.plain(n, to="bob@example.org", message_id=f"<crash-{n}@example.net>")


def send_until_it_dies(haraka, numbers: list[int], answered: dict, unanswered: list, lock) -> None:
    """Send each message in turn; one without a 250 (the server died under it) ends the run."""
    try:
        smtp = Smtp(haraka, timeout=30)
    except OSError:
        with lock:
            unanswered.extend(numbers)
        return
    for i, n in enumerate(numbers):
        try:
            code, reply = smtp.send(message(n), ["bob@example.org"])
        except (smtplib.SMTPException, OSError):
            with lock:
                unanswered.extend(numbers[i:])
            return
        with lock:
            if code == 250:
                answered[n] = queue_id(reply)
            else:
                unanswered.append(n)
    smtp.close()


def test_haraka_killed_mid_group_loses_and_doubles_nothing(broker_settings, haraka_installed, tmp_path):
    settings = broker_settings.replace(spool_sweep_age=10, spool_segment_idle=2)
    bob = add_user("bob@example.org")
    broker.setup_topology(settings)
    answered: dict[int, str] = {}
    unanswered: list[int] = []
    lock = threading.Lock()
    consumer = consumer_process(settings, tmp_path / "consumer.log")
    try:
        haraka = haraka_for(settings, tmp_path).start()
        haraka.wait_connected()
        threads = [threading.Thread(target=send_until_it_dies, args=(
            haraka, list(range(w, MESSAGES, SENDERS)), answered, unanswered, lock))
            for w in range(SENDERS)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(answered) >= KILL_AFTER, timeout=60, interval=0.005,
                 message="the first answers")
        os.killpg(haraka.process.pid, signal.SIGKILL)  # the master and its writer thread
        for thread in threads:
            thread.join(60)
        haraka.process.wait()
        haraka.process = None
        assert len(answered) < MESSAGES and unanswered, "the kill came after the last message"

        # Haraka back on the same spool; the senders send again what got no 250.
        haraka.start()
        wait_for(lambda: haraka.log_path.read_text(errors="replace").count(
            "[mailferry] connected to RabbitMQ") >= 2, timeout=30, message="Haraka connected again")
        with Smtp(haraka) as smtp:
            for n in sorted(unanswered):
                code, reply = smtp.send(message(n), ["bob@example.org"])
                assert code == 250, reply
        haraka.stop()
        wait_for(lambda: queue_depth(settings.amqp_url, broker.INBOUND) == 0, timeout=60,
                 interval=0.2, message="the queue drained")

        # What the crash left behind (a record written, its job never published or confirmed)
        # is republished by the sweep once its segment is old enough; the consumer stores it.
        spool = Spool(settings.resolved_spool_dir)
        old = time.time() - 60
        for segment in spool.segments():
            os.utime(segment, (old, old))
        publisher = Publisher(settings)
        try:
            sweep_spool(settings, publisher)
        finally:
            publisher.close()
        wait_for(lambda: queue_depth(settings.amqp_url, broker.INBOUND) == 0
                 and not waiting_in_spool(settings), timeout=60, interval=0.2,
                 message="everything in the spool stored")
    finally:
        consumer.terminate()
        consumer.wait(40)

    stored = Counter(m.message_id for m in EmailMessage.select().where(EmailMessage.user == bob))
    assert stored == Counter({f"<crash-{n}@example.net>": 1 for n in range(MESSAGES)})
    assert dead_letters(settings.amqp_url) == []
