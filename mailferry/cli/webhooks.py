"""`mailferry webhooks add|list|remove|test|deliveries`: where events are POSTed."""

from __future__ import annotations

import json
import uuid

import httpx

from mailferry import outbox, webhooks
from mailferry.cli.common import open_app, print_json, print_table
from mailferry.contracts import now_iso
from mailferry.errors import PermanentError
from mailferry.models import WebhookAttempt, WebhookEndpoint
from mailferry.cli.imap import find_user


def register(sub) -> None:
    group = sub.add_parser("webhooks", help="endpoints that events are POSTed to").add_subparsers(
        dest="webhooks_command", metavar="COMMAND", required=True)
    add = group.add_parser("add", help="add an endpoint; its signing secret is shown once")
    add.add_argument("url")
    add.add_argument("--events", default="", help=f"comma-separated, of {', '.join(outbox.TYPES)} "
                                                  "(default: all)")
    add.add_argument("--user", metavar="EMAIL", help="only this user's events")
    add.set_defaults(func=add_command)
    ls = group.add_parser("list", help="the endpoints")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=list_command)
    rm = group.add_parser("remove", help="remove an endpoint and its attempt records")
    rm.add_argument("id", type=int)
    rm.set_defaults(func=remove_command)
    test = group.add_parser("test", help="POST a signed webhook.test event to an endpoint now")
    test.add_argument("id", type=int)
    test.set_defaults(func=test_command)
    attempts = group.add_parser("deliveries", help="the latest attempts, newest first")
    attempts.add_argument("--endpoint", type=int)
    attempts.add_argument("--limit", type=int, default=50)
    attempts.add_argument("--json", action="store_true")
    attempts.set_defaults(func=deliveries_command)


def add_command(args) -> int:
    settings = open_app()
    events = [e.strip() for e in args.events.split(",") if e.strip()]
    unknown = sorted(set(events) - set(outbox.TYPES))
    if unknown:
        raise PermanentError(f"unknown event type(s): {', '.join(unknown)}")
    user = find_user(args.user) if args.user else None
    row, secret = webhooks.add_endpoint(settings, args.url, events, user)
    print(f"endpoint {row.id}: {row.url}")
    print(f"signing secret (shown once, keep it with the application): {secret}")
    return 0


def _endpoint(endpoint_id: int) -> WebhookEndpoint:
    row = WebhookEndpoint.get_or_none(WebhookEndpoint.id == endpoint_id)
    if row is None:
        raise PermanentError(f"no endpoint {endpoint_id}")
    return row


def list_command(args) -> int:
    open_app()
    rows = list(WebhookEndpoint.select().order_by(WebhookEndpoint.id))
    items = [{"id": r.id, "url": r.url, "events": r.events or ["*"], "user_id": r.user_id,
              "enabled": r.enabled, "disabled_reason": r.disabled_reason,
              "failing_since": r.failing_since.isoformat() if r.failing_since else None}
             for r in rows]
    if args.json:
        print_json(items)
        return 0
    print_table(["ID", "URL", "EVENTS", "USER", "STATE"], [
        [i["id"], i["url"], ",".join(i["events"]), i["user_id"] or "all",
         "enabled" if i["enabled"] else f"disabled: {i['disabled_reason']}"] for i in items])
    return 0


def remove_command(args) -> int:
    open_app()
    _endpoint(args.id).delete_instance(recursive=True)
    print(f"endpoint {args.id} removed")
    return 0


def test_command(args) -> int:
    settings = open_app()
    endpoint = _endpoint(args.id)
    event_id = str(uuid.uuid4())
    body = json.dumps({"id": event_id, "type": "webhook.test",
                       "timestamp": now_iso(),
                       "data": {"endpoint_id": endpoint.id}}).encode()
    with httpx.Client() as client:
        result = webhooks.post(client, endpoint.url, webhooks.secret_of(settings, endpoint),
                               event_id, body, settings.webhook_timeout)
    print(f"{result.outcome}: status {result.status}, {result.latency_ms} ms"
          + (f" ({result.error})" if result.error else ""))
    return 0 if result.outcome == webhooks.DELIVERED else 1


def deliveries_command(args) -> int:
    open_app()
    query = WebhookAttempt.select().order_by(WebhookAttempt.id.desc()).limit(args.limit)
    if args.endpoint:
        query = query.where(WebhookAttempt.endpoint == args.endpoint)
    items = [{"at": a.created_at.isoformat(timespec="seconds"), "endpoint": a.endpoint_id,
              "event_id": a.event_id, "type": a.event_type, "attempt": a.attempt,
              "outcome": a.outcome, "status": a.status, "latency_ms": a.latency_ms,
              "error": a.error} for a in query]
    if args.json:
        print_json(items)
        return 0
    print_table(["AT", "ENDPOINT", "EVENT", "TYPE", "#", "OUTCOME", "STATUS", "MS", "ERROR"], [
        [i["at"], i["endpoint"], i["event_id"][:8], i["type"], i["attempt"], i["outcome"],
         i["status"] or "-", i["latency_ms"], i["error"] or ""] for i in items])
    return 0
