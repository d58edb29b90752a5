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


def endpoints_for(event_type: str, user_id: int | None) -> list[WebhookEndpoint]:
    """The enabled endpoints that want ``event_type`` of ``user_id``: an endpoint with a user
    gets only that user's events."""
    out = []
    for endpoint in WebhookEndpoint.select().where(WebhookEndpoint.enabled == True):  # noqa: E712
        if endpoint.events and event_type not in endpoint.events:
            continue
        if endpoint.user_id is not None and endpoint.user_id != user_id:
            continue
        out.append(endpoint)
    return out


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


def record(endpoint: WebhookEndpoint, event: dict, attempt: int, result: Result,
           outcome: str) -> None:
    """The attempt's row, and what it means for the endpoint: a success ends its failing
    run; 410 disables it."""
    WebhookAttempt.create(endpoint=endpoint.id, event_id=event["id"], event_type=event["type"],
                          attempt=attempt, outcome=outcome, status=result.status,
                          latency_ms=result.latency_ms, error=result.error)
    if outcome == DELIVERED:
        if endpoint.failing_since is not None:
            WebhookEndpoint.update(failing_since=None).where(WebhookEndpoint.id == endpoint.id).execute()
    elif outcome == GONE:
        WebhookEndpoint.update(enabled=False, disabled_reason=f"410 Gone at {utcnow():%Y-%m-%d %H:%M:%S} UTC") \
            .where(WebhookEndpoint.id == endpoint.id).execute()
    else:
        WebhookEndpoint.update(failing_since=utcnow()).where(
            (WebhookEndpoint.id == endpoint.id) & WebhookEndpoint.failing_since.is_null()).execute()


def delivered_to(event_id: str) -> set[int]:
    """The endpoints that took ``event_id`` already (a redelivered event skips them)."""
    return {row.endpoint_id for row in WebhookAttempt.select(WebhookAttempt.endpoint)
            .where((WebhookAttempt.event_id == event_id) & (WebhookAttempt.outcome == DELIVERED))}
