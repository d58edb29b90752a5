"""The RabbitMQ management HTTP API, read-only: queue depths and consumers for `mailferry status`.

The address is MAILFERRY_MANAGEMENT_URL; its user and password, when it carries none, are
those of MAILFERRY_AMQP_URL, and the virtual host is always the AMQP URL's.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pika

from mailferry.config import Settings
from mailferry.errors import TransientError

TIMEOUT = 5.0  # seconds: `mailferry status` must answer even when the broker does not
QUEUE_PREFIX = "mailferry."


class ManagementError(TransientError):
    """The management API could not be asked (down, refused the credentials, no such vhost)."""


@dataclass(frozen=True)
class QueueInfo:
    name: str
    messages: int  # ready + unacknowledged
    ready: int
    unacked: int
    consumers: int
    type: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Endpoint:
    base: str  # scheme://host:port[/path], no credentials
    username: str
    password: str
    vhost: str


def endpoint(settings: Settings) -> Endpoint:
    parts = urlsplit(settings.management_url)
    amqp = pika.URLParameters(settings.amqp_urls[0])
    if parts.username is not None:
        username, password = unquote(parts.username), unquote(parts.password or "")
    else:
        username, password = amqp.credentials.username, amqp.credentials.password
    netloc = parts.hostname or "127.0.0.1"
    if ":" in netloc:
        netloc = f"[{netloc}]"  # an IPv6 literal
    if parts.port:
        netloc += f":{parts.port}"
    base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return Endpoint(base, username, password, amqp.virtual_host)


def list_queues(settings: Settings, prefix: str = QUEUE_PREFIX) -> list[QueueInfo]:
    """Mailferry's queues on the configured vhost, by name; ManagementError if it cannot."""
    where = endpoint(settings)
    columns = "name,type,messages,messages_ready,messages_unacknowledged,consumers"
    rows = _get(where, f"/api/queues/{quote(where.vhost, safe='')}?columns={columns}")
    queues = [QueueInfo(name=row["name"], messages=int(row.get("messages") or 0),
                        ready=int(row.get("messages_ready") or 0),
                        unacked=int(row.get("messages_unacknowledged") or 0),
                        consumers=int(row.get("consumers") or 0), type=str(row.get("type") or ""))
              for row in rows if str(row.get("name", "")).startswith(prefix)]
    return sorted(queues, key=lambda q: q.name)


def _get(where: Endpoint, path: str):
    request = urllib.request.Request(where.base + path, headers={"Accept": "application/json"})
    token = base64.b64encode(f"{where.username}:{where.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise ManagementError(f"RabbitMQ management API at {where.base} refused the "
                                  f"credentials of user {where.username!r}") from None
        if exc.code == 404:
            raise ManagementError(f"RabbitMQ management API at {where.base}: no virtual host "
                                  f"{where.vhost!r}") from None
        raise ManagementError(f"RabbitMQ management API at {where.base} answered "
                              f"{exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ManagementError(f"RabbitMQ management API at {where.base} unreachable: "
                              f"{reason}") from None
    except ValueError as exc:
        raise ManagementError(f"RabbitMQ management API at {where.base} answered "
                              f"something that is not JSON: {exc}") from None
