"""`mailferry imap authorize` against a token server on loopback (HTTPS: msal takes no other
authority): the device-code flow (msal) and the browser flow with a loopback redirect
(google-auth-oauthlib) each store a refresh token the provider honours, and a mailbox set
up without one is refused with that advice until then."""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from devstack.oauth2_server import OAuth2Server
from devstack.tls import self_signed
from mailferry.errors import EmailAuthError
from mailferry.mailbox_config import EmailConfigManager
from mailferry.models import User
from mailferry.oauth2 import TokenSource
from tests.imap_fixtures import imap_set


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(folder / "cert.pem", folder / "key.pem", days=2)
    return str(cert), str(key)


@pytest.fixture
def provider(certificate, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certificate[0])  # msal and oauthlib: requests
    monkeypatch.setenv("SSL_CERT_FILE", certificate[0])  # httpx
    with OAuth2Server("bob", tls=certificate) as server:
        server.refresh_tokens.clear()  # no grant until the user signs in
        yield server


class Command(threading.Thread):
    """`mailferry …` in a thread, while the test plays the user."""

    def __init__(self, argv):
        super().__init__(daemon=True)
        self.argv, self.code, self.error = argv, None, None

    def run(self):
        from mailferry.cli import main
        try:
            self.code = main(self.argv)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def printed(capsys, pattern: str, timeout: float = 20.0) -> re.Match:
    seen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen += capsys.readouterr().out
        found = re.search(pattern, seen)
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"never printed {pattern!r}; printed: {seen!r}")


def set_custom(monkeypatch, settings, imap_account, server, secret: str) -> User:
    user = User.create(email="bob@example.org")
    assert imap_set(monkeypatch, settings, imap_account, user.email, "--oauth2", "--provider",
                    "custom", "--client-id", server.client_id, "--token-url", server.token_url,
                    "--authority", server.authority, "--scopes", "imap",
                    stdin=f"{secret}\n\n") == 0  # no refresh token yet
    return user


def live_token(settings, user) -> str:
    configs = EmailConfigManager(settings)
    return TokenSource(configs).access_token(user, configs.get_imap_config(user).oauth2)


def introspected(server, token: str) -> bool:
    return server.answer("/introspect", {"token": token})[1]["active"]


def test_a_mailbox_without_a_refresh_token_is_refused_with_the_advice(
        settings, imap_account, provider, monkeypatch):
    user = set_custom(monkeypatch, settings, imap_account, provider, secret="")
    with pytest.raises(EmailAuthError, match="imap authorize"):
        live_token(settings, user)


def test_device_code_flow_stores_a_refresh_token_the_provider_honours(
        settings, imap_account, provider, monkeypatch, capsys):
    user = set_custom(monkeypatch, settings, imap_account, provider, secret="")
    command = Command(["imap", "authorize", user.email])
    command.start()
    printed(capsys, r"enter the code MF-[A-Z]{6}\.")  # what the user is told to do
    assert provider.approve_devices() == 1  # … and does, on another device
    command.join(timeout=30)
    assert (command.error, command.code) == (None, 0)

    stored = EmailConfigManager(settings).get_imap_config(user).oauth2["refresh_token"]
    assert stored in provider.refresh_tokens
    assert introspected(provider, live_token(settings, user))


def test_browser_flow_takes_the_code_from_the_loopback_redirect(
        settings, imap_account, provider, monkeypatch, capsys):
    user = set_custom(monkeypatch, settings, imap_account, provider, secret=provider.client_secret)
    command = Command(["imap", "authorize", user.email, "--flow", "browser"])
    command.start()
    url = printed(capsys, r"https://127\.0\.0\.1:\d+/authorize\?\S+").group(0)
    # The browser: sign-in at the provider, then its redirect to the command's loopback port.
    answer = httpx.get(url, verify=False)
    assert answer.status_code == 302 and "code=" in answer.headers["location"]
    assert httpx.get(answer.headers["location"]).status_code == 200
    command.join(timeout=30)
    assert (command.error, command.code) == (None, 0)

    stored = EmailConfigManager(settings).get_imap_config(user).oauth2["refresh_token"]
    assert stored in provider.refresh_tokens
    assert introspected(provider, live_token(settings, user))
