"""The IDLE lane against Dovecot: an APPEND is stored within seconds without a poll, by a
task of its own under the poll's lock and on the poll's checkpoint; mail that came while
the connection was down is fetched on reconnect; IDLE is renewed; the scheduler leaves a
mailbox held in IDLE to it and polls it again once the lane lets go; reconnects are bounded."""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket
import time

import pytest

from consumer import imap_client
from consumer.imap_idle import (
    BACKOFF_MAX, CONNECTING, IDLE, UNSUPPORTED, WAITING, IdleLane, TokenBucket, backoff,
)
from mailferry import broker, tasks
from mailferry.models import (
    EmailMessage, EmailTask, MailboxState, TaskSource, TaskStatus, User, utcnow,
)
from mailferry.overview import read_overview
from scheduler.fetch import held_in_idle, schedule_imap_fetch
from tests.imap_fixtures import *  # noqa: F401,F403
from tests.imap_fixtures import ImapUser, append, generated


def wait_for(check, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stored() -> int:
    return EmailMessage.select().count()


def idle_tasks(user) -> list[EmailTask]:
    return [t for t in EmailTask.select().where(EmailTask.user == user.id).order_by(EmailTask.id)
            if (t.details or {}).get("trigger") == "idle"]


def held(lane: IdleLane, user) -> bool:
    watch = lane.watches.get(user.id)
    return watch is not None and watch.state == IDLE


def settled(lane: IdleLane, user) -> bool:
    """Held in IDLE, and the sync its connection started (the checkpoint was new) is done."""
    watch = lane.watches.get(user.id)
    return held(lane, user) and not watch.syncing and not watch.dirty and bool(
        MailboxState.get_or_none(MailboxState.user == user.id, MailboxState.last_fetch_at.is_null(False)))


@pytest.fixture
def idle_user(imap_user, broker_settings) -> ImapUser:
    """``imap_user``'s mailbox set to IDLE, on a broker whose topology is declared (for the
    watchdogs)."""
    broker.setup_topology(broker_settings)
    imap_user.configure(idle=True)
    return dataclasses.replace(imap_user, settings=broker_settings)


@pytest.fixture
def lane_for():
    lanes = []

    def start(settings, **kwargs) -> IdleLane:
        lane = IdleLane(settings, **kwargs).start()
        lanes.append(lane)
        return lane
    yield start
    for lane in lanes:
        lane.stop()


def test_an_append_is_stored_within_seconds_by_an_idle_task(idle_user, lane_for):
    lane = lane_for(idle_user.settings)
    wait_for(lambda: settled(lane, idle_user.user), what="held in IDLE, first sync done")

    appended = time.monotonic()
    append(idle_user.account, generated(0, 2))
    wait_for(lambda: stored() == 2, what="both messages stored")
    latency = time.monotonic() - appended

    assert latency < 5.0, latency  # a poll would take schedule_interval (60 s)
    done = wait_for(lambda: [t for t in idle_tasks(idle_user.user)
                             if t.emails_saved and t.status != TaskStatus.RUNNING], what="the task ended")
    assert [(t.status, t.emails_saved, t.email_source) for t in done] == [
        (TaskStatus.COMPLETED, 2, TaskSource.IMAP)]
    state = MailboxState.get(MailboxState.user == idle_user.user.id)
    assert state.last_uid == 2 and state.idle_until is not None


def test_mail_that_came_before_the_connection_is_fetched_when_it_is_made(idle_user, lane_for):
    append(idle_user.account, generated(0, 3))
    lane = lane_for(idle_user.settings)
    wait_for(lambda: stored() == 3, what="the backlog stored on connect")
    assert held(lane, idle_user.user)


def test_idle_waits_for_the_polls_task_and_then_fetches_what_came(idle_user, lane_for):
    lane = lane_for(idle_user.settings)
    wait_for(lambda: settled(lane, idle_user.user), what="held in IDLE, first sync done")
    poll = tasks.create_task(TaskSource.IMAP, idle_user.user.id)  # the poll holds the lock
    assert tasks.start_task(poll.task_id) is not None

    append(idle_user.account, generated(0, 1))
    wait_for(lambda: lane.watches[idle_user.user.id].dirty and
             lane.watches[idle_user.user.id].sync_after > 0, what="the sync put off")
    time.sleep(2.5)  # more than BUSY_RETRY: it was tried again and put off again
    assert stored() == 0
    assert not [t for t in idle_tasks(idle_user.user) if t.status == TaskStatus.RUNNING]

    tasks.complete_task(poll.task_id)  # the poll ends without having seen the new mail
    wait_for(lambda: stored() == 1, what="the message stored once the lock was free")
    assert EmailTask.select().where(EmailTask.user == idle_user.user.id,
                                    EmailTask.status == TaskStatus.SKIPPED).count() == 0


def test_a_dropped_connection_is_made_again_and_what_came_meanwhile_fetched(idle_user, lane_for):
    lane = lane_for(idle_user.settings)
    wait_for(lambda: held(lane, idle_user.user), what="held in IDLE")
    first = lane.watches[idle_user.user.id].session
    first.client.socket().shutdown(socket.SHUT_RDWR)  # the network drops it
    append(idle_user.account, generated(0, 2))

    wait_for(lambda: stored() == 2, timeout=20, what="the messages stored after reconnecting")
    wait_for(lambda: held(lane, idle_user.user) and
             lane.watches[idle_user.user.id].session is not first, what="a new connection")


def test_idle_is_renewed_and_mail_still_arrives(idle_user, lane_for):
    settings = idle_user.settings.replace(imap_idle_renew=5)
    lane = lane_for(settings)
    wait_for(lambda: held(lane, idle_user.user), what="held in IDLE")
    session = lane.watches[idle_user.user.id].session
    first_due = lane.watches[idle_user.user.id].due

    wait_for(lambda: lane.watches[idle_user.user.id].due > first_due, timeout=15,
             what="a renewal")
    assert lane.watches[idle_user.user.id].session is session  # DONE + IDLE, same connection
    append(idle_user.account, generated(0, 1))
    wait_for(lambda: stored() == 1, what="the message stored after the renewal")


def test_the_scheduler_leaves_a_mailbox_held_in_idle_to_it_until_the_lane_stops(
        idle_user, lane_for):
    lane = lane_for(idle_user.settings)
    wait_for(lambda: settled(lane, idle_user.user), what="held in IDLE, first sync done")
    publisher = broker.Publisher(idle_user.settings)
    summary = schedule_imap_fetch(idle_user.settings, publisher)
    assert (summary.idle, summary.scheduled) == (1, 0)
    spool = idle_user.settings.resolved_spool_dir
    assert read_overview(spool).imap_idle == 1  # what `mailferry status` shows

    assert held_in_idle(poll_interval=60) == {idle_user.user.id}
    MailboxState.update(last_fetch_at=utcnow() - dt.timedelta(seconds=61)).execute()
    assert held_in_idle(poll_interval=60) == set()  # not synced lately: polled although held
    MailboxState.update(last_fetch_at=utcnow()).execute()

    lane.stop()
    assert MailboxState.get(MailboxState.user == idle_user.user.id).idle_until is None
    assert read_overview(spool).imap_idle == 0
    summary = schedule_imap_fetch(idle_user.settings, publisher)
    assert (summary.idle, summary.scheduled) == (0, 1)
    publisher.close()


def test_a_server_without_idle_is_left_to_the_poll(idle_user, lane_for):
    def connect_without_idle(config, timeout):
        session = imap_client.connect(config, timeout)
        session.capabilities = session.capabilities - {b"IDLE"}
        return session

    lane = lane_for(idle_user.settings, connect=connect_without_idle)
    wait_for(lambda: lane.watches.get(idle_user.user.id) is not None
             and lane.watches[idle_user.user.id].state == UNSUPPORTED, what="unsupported")
    assert held_in_idle(poll_interval=3600) == set()


def test_a_mailbox_set_to_no_idle_is_let_go(idle_user, lane_for):
    lane = lane_for(idle_user.settings, refresh=0.5)
    wait_for(lambda: held(lane, idle_user.user), what="held in IDLE")
    idle_user.configs.update_fetch_config(idle_user.user, idle=False)
    wait_for(lambda: idle_user.user.id not in lane.watches, what="the mailbox let go")
    wait_for(lambda: MailboxState.get(MailboxState.user == idle_user.user.id).idle_until is None,
             what="idle_until cleared")


def test_reconnects_are_bounded_by_the_connect_rate(broker_settings, lane_for):
    from mailferry.mailbox_config import EmailConfigManager
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]  # bound, never listening: every connect is refused
    configs = EmailConfigManager(broker_settings)
    for n in range(40):
        user = User.create(email=f"storm{n}@example.org")
        configs.set_imap_config(user, {"host": "127.0.0.1", "port": port, "username": f"u{n}",
                                       "password": "p", "security": "none", "idle": True})
    attempts: list[float] = []

    def counting_connect(config, timeout):
        attempts.append(time.monotonic())
        return imap_client.connect(config, timeout)

    settings = broker_settings.replace(imap_idle_connect_rate=5, imap_idle_connects=2)
    lane = lane_for(settings, connect=counting_connect)
    wait_for(lambda: len(lane.watches) == 40, what="the mailboxes loaded")
    time.sleep(3.0)
    closed.close()
    span = attempts[-1] - attempts[0]
    # 5 saved up, then 5 a second; each mailbox retries only after its own backoff.
    assert len(attempts) <= 5 + 5 * span + 1, (len(attempts), span)
    assert len(attempts) >= 10
    states = {w.state for w in lane.watches.values()}
    assert states <= {WAITING, CONNECTING}


def test_backoff_doubles_with_jitter_up_to_its_cap():
    for failures, low, high in ((1, 0.5, 1.0), (2, 1.0, 2.0), (5, 8.0, 16.0), (30, BACKOFF_MAX / 2, BACKOFF_MAX)):
        values = [backoff(failures) for _ in range(200)]
        assert low <= min(values) and max(values) <= high
        assert max(values) - min(values) > (high - low) / 4  # jittered, not all alike


def test_token_bucket_gives_its_rate_and_no_more():
    now = [0.0]
    bucket = TokenBucket(3, lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] = 1.0
    assert sum(bucket.take() for _ in range(10)) == 3
    now[0] = 100.0
    assert sum(bucket.take() for _ in range(10)) == 3  # saving up is capped


def test_the_watcher_sleeps_while_the_mailbox_list_is_being_read(sqlite_settings):
    lane = IdleLane(sqlite_settings)  # not started: its loop's arithmetic alone
    try:
        lane._loading, lane._next_load, lane._next_gauges = True, 0.0, 100.0
        assert lane._timeout(now=10.0) == 1.0  # not 0: a due load being read is no reason to spin
        lane._loading = False
        assert lane._timeout(now=10.0) == 0.0
    finally:
        lane.stop()


def test_an_oauth2_mailbox_is_held_and_synced_with_its_token(broker_settings, imap_account,
                                                             oauth2_provider, lane_for):
    broker.setup_topology(broker_settings)
    from mailferry.mailbox_config import EmailConfigManager
    oauth2_provider.username = imap_account.username
    oauth2_provider.refresh_tokens = {"idle-refresh-token"}
    oauth2_provider.clock = time.monotonic
    user = User.create(email="idle-oauth@example.org")
    EmailConfigManager(broker_settings).set_imap_config(user, {
        "host": imap_account.host, "port": imap_account.port, "username": imap_account.username,
        "security": "none", "idle": True, "oauth2": {
            "provider": "custom", "client_id": oauth2_provider.client_id,
            "client_secret": oauth2_provider.client_secret, "refresh_token": "idle-refresh-token",
            "token_url": oauth2_provider.token_url, "scopes": "imap"}})
    lane = lane_for(broker_settings)
    wait_for(lambda: settled(lane, user), what="held in IDLE with an access token")
    append(imap_account, generated(0, 1))
    wait_for(lambda: stored() == 1, what="the message stored by the IDLE sync")
