"""IDLE mailboxes held by leases (issue 26): consumers share the mailboxes that want IDLE,
and when one is SIGKILLed while it holds its share, another holds them within the lease
period, and mail appended meanwhile is stored once. Against Dovecot, a real consumer
process and a lane in this one."""

from __future__ import annotations

import secrets
import signal
import time

import pytest

from consumer.imap_idle import IDLE, IdleLane
from devstack.consumers import consumer_process
from mailferry import broker
from mailferry.mailbox_config import EmailConfigManager
from mailferry.models import EmailMessage, IdleLease, User
from tests.harness.fixtures import ImapAccount
from tests.imap_fixtures import append, generated
from tests.pipeline import wait_for

MAILBOXES = 50
LEASE = 10  # seconds


@pytest.fixture
def idle_mailboxes(dovecot, broker_settings):
    """MAILBOXES Dovecot accounts, each a user's mailbox set to IDLE."""
    broker.setup_topology(broker_settings)
    configs = EmailConfigManager(broker_settings)
    accounts, users = [], []
    for n in range(MAILBOXES):
        name, password = f"lease-{secrets.token_hex(4)}", secrets.token_urlsafe(10)
        dovecot.add_user(name, password)
        account = ImapAccount(dovecot.host, dovecot.port, name, password)
        user = User.create(email=f"{name}@example.org")
        configs.set_imap_config(user, {"host": account.host, "port": account.port,
                                       "username": name, "password": password,
                                       "security": "none", "folder": "INBOX", "idle": True})
        accounts.append(account)
        users.append(user)
    yield list(zip(users, accounts))
    for account in accounts:
        dovecot.remove_user(account.username)


def holders() -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for lease in IdleLease.select():
        out.setdefault(lease.holder, set()).add(lease.user_id)
    return out


def holding(lane: IdleLane) -> set[int]:
    return {uid for uid, watch in lane.watches.items() if watch.state == IDLE}


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_killed_consumers_idle_mailboxes_are_held_elsewhere_within_the_lease(
        broker_settings, idle_mailboxes, tmp_path):
    settings = broker_settings.replace(imap_idle_lease=LEASE)
    everyone = {user.id for user, _ in idle_mailboxes}
    process = consumer_process(settings, tmp_path / "consumer-a.log")
    lane = None
    try:
        wait_for(lambda: holders() and len(next(iter(holders().values()))) == MAILBOXES,
                 timeout=60, message="the first consumer holding every mailbox")
        [killed] = holders()
        lane = IdleLane(settings, refresh=1.0).start()
        # The two share the mailboxes: the first lets half go, the second takes them.
        wait_for(lambda: len(holders()) == 2 and all(
            abs(len(ids) - MAILBOXES / 2) <= 1 for ids in holders().values())
            and len(holding(lane)) == len(holders()[lane.holder]),
            timeout=60, message="the mailboxes shared between the two consumers")
        assert set().union(*holders().values()) == everyone
        assert not holders()[killed] & holders()[lane.holder]

        process.send_signal(signal.SIGKILL)
        process.wait(10)
        killed_at = time.monotonic()
        orphaned = holders()[killed]
        # Mail that comes while nobody holds those mailboxes.
        for user, account in idle_mailboxes:
            if user.id in orphaned:
                append(account, generated(user.id, 1))
        wait_for(lambda: holding(lane) == everyone, timeout=LEASE + 30,
                 message="every mailbox held by the consumer left")
        moved_in = time.monotonic() - killed_at
        wait_for(lambda: EmailMessage.select().where(EmailMessage.user.in_(list(orphaned))).count()
                 == len(orphaned), timeout=60, message="the mail appended meanwhile stored")
    finally:
        if process.poll() is None:
            process.kill()
        if lane is not None:
            lane.stop()
    print(f"held again {moved_in:.1f} s after the kill (lease {LEASE} s)")
    assert moved_in <= LEASE + 15, f"held again after {moved_in:.1f} s (lease {LEASE} s)"
    for user_id in orphaned:  # each message once
        assert EmailMessage.select().where(EmailMessage.user == user_id).count() == 1
    assert IdleLease.select().count() == 0  # the lane that stopped let its leases go


def test_a_consumer_holds_no_more_than_its_limit(broker_settings, idle_mailboxes):
    settings = broker_settings.replace(imap_idle_lease=LEASE, imap_idle_max=20)
    lane = IdleLane(settings, refresh=1.0).start()
    try:
        wait_for(lambda: len(holding(lane)) == 20, timeout=60, message="20 mailboxes held")
        time.sleep(2.5)  # two more readings: no more taken
        assert len(holding(lane)) == 20 and IdleLease.select().count() == 20
    finally:
        lane.stop()
