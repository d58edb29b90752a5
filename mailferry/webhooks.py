"""Webhook endpoints and one signed POST, following the Standard Webhooks specification
(https://www.standardwebhooks.com): headers ``webhook-id`` (the event's id, the same on every
attempt), ``webhook-timestamp`` (Unix seconds) and ``webhook-signature`` (``v1,`` + base64 of
HMAC-SHA256 over ``id.timestamp.body``, keyed with the base64 bytes after ``whsec_``).

The signer is ours (a dozen lines of the standard library); the tests check it with the
``standardwebhooks`` package, an independent implementation. Secrets are kept encrypted
with the key the IMAP passwords use. The retries and their schedule are the webhook
worker's (``consumer/webhooks.py``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from mailferry.config import Settings
from mailferry.errors import PermanentError
from mailferry.mailbox_config import load_fernet
from mailferry.models import User, WebhookAttempt, WebhookEndpoint, utcnow

SECRET_PREFIX = "whsec_"
USER_AGENT = "Mailferry-Webhooks/1"
DELIVERED, RETRY, DEAD, GONE = "delivered", "retry", "dead", "gone"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value of ``body``."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


def signed_headers(secret: str, msg_id: str, body: bytes, now: float | None = None) -> dict:
    timestamp = int(time.time() if now is None else now)
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, msg_id, timestamp, body),
            "content-type": "application/json", "user-agent": USER_AGENT}


# -- endpoints -------------------------------------------------------------------------------

def add_endpoint(settings: Settings, url: str, events: list[str] | None = None,
                 user: User | None = None) -> tuple[WebhookEndpoint, str]:
    """A new endpoint and its secret (shown once; kept encrypted)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PermanentError(f"{url!r} is not an http(s) URL")
    secret = new_secret()
    token = load_fernet(settings).encrypt(secret.encode("ascii")).decode("ascii")
    row = WebhookEndpoint.create(url=url, secret=token, events=sorted(set(events or [])),
                                 user=user.id if user else None)
    return row, secret


def secret_of(settings: Settings, endpoint: WebhookEndpoint) -> str:
    return load_fernet(settings).decrypt(endpoint.secret.encode("ascii")).decode("ascii")


def wanted_by(endpoints: list[WebhookEndpoint], event_type: str,
              user_id: int | None) -> list[WebhookEndpoint]:
    """Those of ``endpoints`` that want ``event_type`` of ``user_id``: an endpoint with a
    user gets only that user's events."""
    return [e for e in endpoints
            if (not e.events or event_type in e.events)
            and (e.user_id is None or e.user_id == user_id)]


# -- one POST --------------------------------------------------------------------------------

@dataclass
class Result:
    outcome: str  # delivered | retry | gone
    status: int | None
    latency_ms: int
    error: str | None = None


def post(client: httpx.Client, url: str, secret: str, msg_id: str, body: bytes,
         timeout: float) -> Result:
    """POST ``body`` signed; any 2xx is delivered, 410 Gone disables the endpoint, anything
    else (another status, no answer in ``timeout``) is tried again later."""
    started = time.perf_counter()
    try:
        response = client.post(url, content=body, headers=signed_headers(secret, msg_id, body),
                               timeout=timeout)
    except httpx.HTTPError as exc:
        return Result(RETRY, None, _ms(started), f"{type(exc).__name__}: {exc}"[:500])
    latency = _ms(started)
    if 200 <= response.status_code < 300:
        return Result(DELIVERED, response.status_code, latency)
    if response.status_code == 410:
        return Result(GONE, 410, latency, "410 Gone: endpoint disabled")
    return Result(RETRY, response.status_code, latency, f"HTTP {response.status_code}")


def _ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


def record(attempts: list[tuple[WebhookEndpoint, dict, int, Result]]) -> None:
    """The attempts' rows (one INSERT), and what they mean for their endpoints: a success
    ends an endpoint's failing run; 410 disables it; a failure starts a run."""
    if not attempts:
        return
    now = utcnow()
    WebhookAttempt.insert_many([
        {"endpoint": endpoint.id, "event_id": event["id"], "event_type": event["type"],
         "attempt": attempt, "outcome": result.outcome, "status": result.status,
         "latency_ms": result.latency_ms, "error": result.error, "created_at": now}
        for endpoint, event, attempt, result in attempts]).execute()
    for endpoint, _, _, result in attempts:
        row = WebhookEndpoint.id == endpoint.id
        if result.outcome == DELIVERED:
            if endpoint.failing_since is not None:
                WebhookEndpoint.update(failing_since=None).where(row).execute()
                endpoint.failing_since = None
        elif result.outcome == GONE:
            WebhookEndpoint.update(enabled=False, disabled_reason=f"410 Gone at {now:%Y-%m-%d %H:%M:%S} UTC") \
                .where(row).execute()
        elif endpoint.failing_since is None:
            WebhookEndpoint.update(failing_since=now).where(row & WebhookEndpoint.failing_since.is_null()).execute()
            endpoint.failing_since = now


def delivered_to(event_ids: list[str]) -> set[tuple[str, int]]:
    """(event id, endpoint id) of each of ``event_ids`` that an endpoint took already (a
    redelivered event skips it)."""
    if not event_ids:
        return set()
    return {(row.event_id, row.endpoint_id) for row in
            WebhookAttempt.select(WebhookAttempt.event_id, WebhookAttempt.endpoint)
            .where(WebhookAttempt.event_id.in_(event_ids) & (WebhookAttempt.outcome == DELIVERED))}
