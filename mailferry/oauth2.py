"""OAuth2 for IMAP mailboxes: an access token for SASL XOAUTH2 / OAUTHBEARER, got from the
provider's token endpoint with the mailbox's refresh token, and kept until shortly before it
expires.

- The access token is cached, encrypted, with its expiry, in the user's ``oauth2_token``
  settings row. It is refreshed ``REFRESH_MARGIN`` seconds before it expires, so a clock a
  minute off from the provider's still never presents an expired token.
- A provider that rotates refresh tokens sends a new one with the access token; it replaces
  the stored one at once (the old one no longer works).
- ``invalid_grant`` (the user withdrew the grant, or the token was revoked) is an
  ``EmailAuthError``: the task fails with "re-authorise this mailbox" and is not retried.
  A network error or a 5xx is an ``EmailFetchError``: retried.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from collections import defaultdict
from typing import Callable

import httpx

from mailferry.errors import EmailAuthError, EmailConfigError, EmailFetchError
from mailferry.models import Settings as SettingsRow, User, db, utcnow

REFRESH_MARGIN = 120  # seconds before expiry a token is refreshed: covers a minute of skew
TOKEN_KEY = "oauth2_token"
TIMEOUT = 20.0
# One refresh per mailbox at a time in a process (the IDLE lane and a sync may both log in):
# a provider that rotates refresh tokens refuses the old one once the new one is issued.
_refreshing: defaultdict[int, threading.Lock] = defaultdict(threading.Lock)

PROVIDERS = {
    "google": {"token_url": "https://oauth2.googleapis.com/token",
               "scopes": "https://mail.google.com/"},
    "microsoft": {"token_url": "https://login.microsoftonline.com/common/oauth2/v2.0/token",
                  "scopes": "https://outlook.office.com/IMAP.AccessAsUser.All offline_access"},
}


def resolved(oauth2: dict) -> dict:
    """``oauth2`` with the provider's token URL and scopes filled in; EmailConfigError when
    something it needs is missing. The refresh token may be missing until `mailferry imap
    authorize` got one (a login then fails with that advice)."""
    provider = oauth2.get("provider", "custom")
    if provider not in (*PROVIDERS, "custom"):
        raise EmailConfigError(f"imap_config.oauth2.provider: {provider!r} is not google, "
                               "microsoft or custom")
    out = {**PROVIDERS.get(provider, {}), **{k: v for k, v in oauth2.items() if v}}
    for name in ("client_id", "token_url"):
        if not out.get(name):
            raise EmailConfigError(f"imap_config.oauth2.{name}: required")
    return out


def login(connect, config, user_id: int, tokens: Callable[[], "TokenSource"], timeout: float):
    """``connect(config, timeout)``: with the password, or, for an OAuth2 mailbox, with a live
    access token from ``tokens()`` (called only then: a TokenSource holds an HTTP client).

    A refused OAuth2 login is tried once more with a freshly refreshed token: a provider may
    end a token before the expiry it announced (a revoked session, rotated signing keys), and
    the cache would present the dead one until then. Refused again, it is refused."""
    from mailferry.db import translated
    if not config.oauth2:
        return connect(config, timeout)

    def attempt():
        with translated("reading the OAuth2 token"):
            token = tokens().access_token(user_id, config.oauth2)
        return connect(dataclasses.replace(config, access_token=token), timeout)

    try:
        return attempt()
    except EmailAuthError:
        forget_token(user_id)
        return attempt()


def forget_token(user_id: int) -> None:
    """Drop the cached access token (it belongs to a grant that was just replaced)."""
    SettingsRow.delete().where((SettingsRow.user == user_id) & (SettingsRow.key == TOKEN_KEY)).execute()


class TokenSource:
    """Access tokens of users' mailboxes; ``configs`` (an EmailConfigManager) encrypts what
    is stored and saves a rotated refresh token."""

    def __init__(self, configs, client: httpx.Client | None = None, now=utcnow):
        self.configs = configs
        self.client = client or httpx.Client(timeout=TIMEOUT)
        self.now = now

    def access_token(self, user: User | int, oauth2: dict) -> str:
        user_id = user if isinstance(user, int) else user.id
        cached = self._cached(user_id)
        if cached is not None:
            return cached
        with _refreshing[user_id]:
            cached = self._cached(user_id)  # refreshed by another thread meanwhile
            if cached is not None:
                return cached
            return self._refresh(user_id, resolved(self._current(user_id, oauth2)))

    def _current(self, user_id: int, oauth2: dict) -> dict:
        """``oauth2`` with the refresh token stored now: another thread may have rotated it
        since ``oauth2`` was read."""
        try:
            stored = self.configs.get_imap_config(user_id).oauth2 or {}
        except EmailConfigError:
            return oauth2
        token = stored.get("refresh_token")
        return {**oauth2, "refresh_token": token} if token else oauth2

    def _cached(self, user_id: int) -> str | None:
        row = SettingsRow.get_or_none((SettingsRow.user == user_id) & (SettingsRow.key == TOKEN_KEY))
        if row is None or not isinstance(row.value, dict):
            return None
        try:
            expires = dt.datetime.fromisoformat(row.value["expires_at"])
        except (KeyError, TypeError, ValueError):
            return None
        if expires - dt.timedelta(seconds=REFRESH_MARGIN) <= self.now():
            return None
        return self.configs.decrypt_secret(row.value.get("access_token", ""))

    def _refresh(self, user_id: int, oauth2: dict) -> str:
        if not oauth2.get("refresh_token"):
            raise EmailAuthError("this mailbox is not authorised yet: run `mailferry imap "
                                 "authorize` for it")
        form = {"grant_type": "refresh_token", "refresh_token": oauth2["refresh_token"],
                "client_id": oauth2["client_id"], "scope": oauth2.get("scopes", "")}
        if oauth2.get("client_secret"):
            form["client_secret"] = oauth2["client_secret"]
        try:
            response = self.client.post(oauth2["token_url"], data=form)
        except httpx.HTTPError as exc:
            raise EmailFetchError(f"OAuth2 token endpoint unreachable: {exc!r}") from exc
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 500 or response.status_code == 429:
            raise EmailFetchError(f"OAuth2 token endpoint answered {response.status_code}")
        if response.status_code != 200 or "access_token" not in body:
            error = body.get("error", f"HTTP {response.status_code}")
            raise EmailAuthError(
                f"re-authorise this mailbox (`mailferry imap authorize`): the provider "
                f"refused its refresh token: {error}: {body.get('error_description', '')}".rstrip(": "))
        expires = self.now() + dt.timedelta(seconds=int(body.get("expires_in", 3600)))
        with db.atomic():
            value = {"access_token": self.configs.encrypt_secret(body["access_token"]),
                     "expires_at": expires.isoformat()}
            updated = (SettingsRow.update(value=value, updated_at=self.now())
                       .where((SettingsRow.user == user_id) & (SettingsRow.key == TOKEN_KEY)).execute())
            if not updated:
                SettingsRow.create(user=user_id, key=TOKEN_KEY, value=value)
            rotated = body.get("refresh_token")
            if rotated and rotated != oauth2["refresh_token"]:
                self.configs.save_refresh_token(user_id, rotated)
        return body["access_token"]
