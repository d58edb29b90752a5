"""OAuth2 login against a real Dovecot whose ``oauth2`` passdb asks a token server on
loopback (devstack/oauth2_server.py) whether a token is live: first login, refresh after
expiry, a rotated refresh token kept, and a revoked grant ending the task FAILED with
"re-authorise", not retried."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from consumer.imap_sync import MailboxSync
from consumer.imap_worker import run_fetch_task
from mailferry import tasks
from mailferry.mailbox_config import EmailConfigManager
from mailferry.models import EmailMessage, Settings as SettingsRow, TaskSource, TaskStatus, User
from mailferry.oauth2 import TOKEN_KEY, TokenSource
from tests.imap_fixtures import *  # noqa: F401,F403
from tests.imap_fixtures import append, generated, imap_set

@pytest.fixture
def provider(oauth2_provider, imap_account):
    """The session's provider, issuing tokens for this test's account, from a fresh grant."""
    oauth2_provider.username = imap_account.username
    oauth2_provider.lifetime, oauth2_provider.rotate = 3600.0, True
    oauth2_provider.refresh_tokens = {"first-refresh-token"}
    oauth2_provider.access_tokens = {}
    oauth2_provider.clock = time.monotonic
    return oauth2_provider


@pytest.fixture
def mailbox(settings, imap_account, provider):
    user = User.create(email="oauth@example.org")
    configs = EmailConfigManager(settings)
    configs.set_imap_config(user, {
        "host": imap_account.host, "port": imap_account.port, "username": imap_account.username,
        "security": "none", "oauth2": {  # no password: XOAUTH2 with the provider's token
            "provider": "custom", "client_id": provider.client_id,
            "client_secret": provider.client_secret, "refresh_token": "first-refresh-token",
            "token_url": provider.token_url, "scopes": "imap"}})
    return user, configs


def sync(settings, user, configs):
    return MailboxSync(settings, parse_in_helper=False).run(user, configs.get_imap_config(user))


def test_first_login_fetches_with_a_token_and_keeps_the_secrets_encrypted(settings, imap_account, provider, mailbox):
    user, configs = mailbox
    append(imap_account, generated(0, 3))
    result = sync(settings, user, configs)
    assert (result.saved, EmailMessage.select().count()) == (3, 3)
    stored = SettingsRow.get((SettingsRow.user == user.id) & (SettingsRow.key == "email_config")).value
    oauth2 = stored["imap_config"]["oauth2"]
    assert oauth2["client_secret"].startswith("fernet:") and oauth2["refresh_token"].startswith("fernet:")
    token = SettingsRow.get((SettingsRow.user == user.id) & (SettingsRow.key == TOKEN_KEY)).value
    assert token["access_token"].startswith("fernet:")
    # Rotated at the refresh: the stored one is the provider's new token, the first is dead.
    assert configs.get_imap_config(user).oauth2["refresh_token"] in provider.refresh_tokens
    assert "first-refresh-token" not in provider.refresh_tokens


def test_a_cached_token_is_used_until_it_nears_expiry_then_refreshed(settings, imap_account, provider, mailbox):
    user, configs = mailbox
    sync(settings, user, configs)
    before = provider.refreshes
    sync(settings, user, configs)
    assert provider.refreshes == before  # cached: an hour left
    # Within the refresh margin of its expiry (the provider's clock may be a minute ahead):
    provider.lifetime = 90.0  # seconds: under the 120 s margin, so every token is refreshed
    provider.expire_access_tokens()
    SettingsRow.delete().where(SettingsRow.key == TOKEN_KEY).execute()
    sync(settings, user, configs)
    refreshed = provider.refreshes
    append(imap_account, generated(10, 1))
    result = sync(settings, user, configs)
    assert provider.refreshes == refreshed + 1  # 90 s left is inside the margin: refreshed
    assert result.saved == 1


def test_a_revoked_grant_fails_the_task_with_re_authorise_and_no_retry(settings, imap_account, provider, mailbox):
    user, configs = mailbox
    sync(settings, user, configs)
    provider.revoke()
    SettingsRow.delete().where(SettingsRow.key == TOKEN_KEY).execute()
    task = tasks.create_task(TaskSource.IMAP, user.id)
    tasks.start_task(task.task_id)
    before = provider.refreshes
    started = time.monotonic()
    status = run_fetch_task(task, None, sync=MailboxSync(settings, parse_in_helper=False),
                            configs=configs, backoff=1.0)
    assert status == TaskStatus.FAILED
    assert "re-authorise this mailbox" in tasks.get_task(task.task_id).error_message
    assert provider.refreshes == before and time.monotonic() - started < 1.0  # not retried


def test_imap_set_oauth2_stores_the_secrets_and_the_fetch_logs_in_with_them(
        settings, imap_account, provider, monkeypatch, capsys):
    provider.refresh_tokens = {"cli-refresh-token"}
    User.create(email="cli@example.org")
    assert imap_set(monkeypatch, settings, imap_account, "cli@example.org", "--oauth2",
                    "--client-id", provider.client_id, "--token-url", provider.token_url,
                    stdin=f"{provider.client_secret}\ncli-refresh-token\n") == 0
    assert "OAuth2 (custom) secrets stored encrypted" in capsys.readouterr().out
    configs = EmailConfigManager(settings)
    user = User.get(User.email == "cli@example.org")
    assert sync(settings, user, configs).connect_seconds > 0  # logged in with XOAUTH2
    public = configs.get_imap_config(user).public()
    assert public["oauth2"]["client_secret"] == public["oauth2"]["refresh_token"] == "(set)"


@pytest.mark.parametrize("skew", [-60, 60])
def test_a_clock_a_minute_off_the_providers_never_presents_an_expired_token(
        settings, imap_account, provider, mailbox, skew):
    """Expiry is kept as our clock at receipt + expires_in, so an offset between the clocks
    cancels out; the 120 s margin covers the rest. Time is the provider's, in seconds."""
    user, configs = mailbox
    at = [0.0]
    provider.clock = lambda: at[0]
    provider.lifetime = 300.0
    noon = dt.datetime(2026, 12, 2, 12, 0, 0)
    sync_ = MailboxSync(settings, parse_in_helper=False)
    sync_.tokens = TokenSource(configs, now=lambda: noon + dt.timedelta(seconds=at[0] + skew))
    seen, before = [], provider.refreshes
    for n, moment in enumerate((0.0, 170.0, 190.0, 310.0)):  # A issued; A; B (margin); B
        at[0] = moment
        append(imap_account, generated(n, 1))
        result = sync_.run(user, configs.get_imap_config(user))  # Dovecot asks the provider
        assert result.saved == 1, moment
        seen.append(provider.refreshes - before)
    assert seen == [1, 1, 2, 2]  # refreshed once inside the margin, never after an expiry


def test_a_token_that_dies_during_a_long_first_sync_is_replaced_at_the_next_login(
        settings, imap_account, provider, mailbox):
    """The first sync's connection drops after a batch, and meanwhile the provider has ended
    the token the cache still thinks good for an hour: the retry logs in with a fresh one
    and goes on from the checkpoint."""
    from mailferry.errors import EmailFetchError
    user, configs = mailbox
    settings = settings.replace(imap_batch_size=50)
    append(imap_account, generated(0, 180))
    task = tasks.create_task(TaskSource.IMAP, user.id)
    tasks.start_task(task.task_id)
    dropped = []

    def after_a_batch(result, delta):
        if delta is not None and not dropped:
            dropped.append(result.last_uid)
            provider.expire_access_tokens()
            raise EmailFetchError("connection reset by peer")  # what the retry answers
    before = provider.refreshes
    status = run_fetch_task(task, None, sync=MailboxSync(settings, parse_in_helper=False),
                            configs=configs, backoff=0.1, progress=after_a_batch)

    assert status == TaskStatus.COMPLETED, tasks.get_task(task.task_id).error_message
    assert dropped == [50] and EmailMessage.select().count() == 180
    assert provider.refreshes == before + 2  # the first login's token, then the replacement


def test_imap_test_logs_in_with_a_live_token(settings, imap_account, provider, mailbox,
                                              monkeypatch, capsys):
    from mailferry.cli import main
    user, _ = mailbox
    monkeypatch.setenv("MAILFERRY_VAR_DIR", str(settings.var_dir))
    monkeypatch.setenv("MAILFERRY_DATABASE_URL", settings.resolved_database_url)
    append(imap_account, generated(0, 2))
    assert main(["imap", "test", user.email]) == 0
    out = capsys.readouterr().out
    assert "OAuth2 XOAUTH2" in out and "folder INBOX: 2 message(s)" in out and "IDLE" in out
