"""The webhook worker: a handler of ``mailferry.webhooks``, which gets every event the relay
publishes, POSTs it to each endpoint that wants it, and schedules the retries.

A retry waits in a delay queue of RabbitMQ, never in a sleeping consumer:
``mailferry.webhooks.wait.<s>s`` holds it for its TTL and dead-letters it back here, with
the endpoint and the attempt's number in headers (``H_ENDPOINT``, ``H_ATTEMPT``). After the
last attempt the job goes to ``mailferry.dead`` with the reason, from where
``mailferry replay`` sends it here again for one more attempt.

Per batch: the POSTs run side by side (``CONCURRENCY``), each attempt is recorded
(``WebhookAttempt``), the retries are published (confirmed), and only then is the batch
acked. A redelivered event skips the endpoints that took it already, so a crash costs at
most a repeat to an endpoint whose answer was not yet recorded, under the same
``webhook-id``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from consumer.handler import Delivery, Handler, Outcome
from mailferry import broker, metrics, webhooks
from mailferry.config import Settings
from mailferry.contracts import now_iso
from mailferry.db import translated
from mailferry.models import EmailMessage, WebhookEndpoint, db
from mailferry.outbox import STORED
from mailferry.payload import message_payload
from mailferry.storage import BlobStore

log = logging.getLogger(__name__)

H_ENDPOINT = "x-mailferry-webhook-endpoint"
H_ATTEMPT = "x-mailferry-webhook-attempt"
CONCURRENCY = 8  # POSTs in flight at once


@dataclass
class _Job:
    published: bytes  # the event as the relay published it: what a retry carries on
    event: dict
    endpoint: WebhookEndpoint
    attempt: int
    body: bytes = b""  # what is POSTed
    result: webhooks.Result | None = None


class WebhookHandler(Handler):
    queue = broker.WEBHOOKS
    prefetch = 32

    def __init__(self, settings: Settings, *, publisher: broker.Publisher | None = None,
                 client: httpx.Client | None = None):
        self.settings = settings
        self.delays = settings.webhook_delays
        self.attempts = len(self.delays) + 1
        self.publisher = publisher or broker.Publisher(settings, declare=True)  # the wait queues
        self.client = client or httpx.Client(follow_redirects=False)
        self.pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="webhook-post")
        self.store = BlobStore.of(settings)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()
        self.publisher.close()

    def handle(self, deliveries: list[Delivery]) -> list[Outcome]:
        outcomes: list[Outcome] = [Outcome.ack()] * len(deliveries)
        jobs: list[_Job] = []
        with translated("reading webhook endpoints"):
            endpoints = list(WebhookEndpoint.select().where(WebhookEndpoint.enabled == True))  # noqa: E712
            for index, delivery in enumerate(deliveries):
                try:
                    event = _event_of(delivery.body)
                except ValueError as exc:
                    outcomes[index] = Outcome.dead(f"malformed event: {exc}")
                    continue
                jobs.extend(self._jobs_for(delivery, event, endpoints))
            done = webhooks.delivered_to(sorted({job.event["id"] for job in jobs}))
            jobs = [job for job in jobs if (job.event["id"], job.endpoint.id) not in done]
            bodies: dict[str, bytes] = {}
            for job in jobs:  # one body per event, whatever the number of its endpoints
                if job.event["id"] not in bodies:
                    bodies[job.event["id"]] = self._body(job.event)
                job.body = bodies[job.event["id"]]
        for job, result in zip(jobs, self.pool.map(self._post, jobs)):
            job.result = result
        self._settle(jobs)
        return outcomes

    def _jobs_for(self, delivery: Delivery, event: dict,
                  endpoints: list[WebhookEndpoint]) -> list[_Job]:
        headers = delivery.headers
        if H_ENDPOINT in headers:  # a retry, or a replay: that endpoint alone
            wanted = int(headers[H_ENDPOINT])
            targets = [e for e in endpoints if e.id == wanted]  # none if removed or disabled
            attempt = int(headers.get(H_ATTEMPT, 1))
        else:
            data = event.get("data")
            user_id = data.get("user_id") if isinstance(data, dict) else None
            targets = webhooks.wanted_by(endpoints, event["type"], user_id)
            if (event["type"] == STORED and self.settings.webhook_automatic == "skip"
                    and isinstance(data, dict) and data.get("automatic")):
                targets = []  # kept out by the routing setting; the API still has it
            attempt = 1
        return [_Job(delivery.body, event, e, attempt) for e in targets]

    def _body(self, event: dict) -> bytes:
        """What is POSTed: the event, and for a stored message its whole payload (as the
        API's ``GET /v1/messages/{id}`` gives it), read now, so a retry sends the same."""
        data = event.get("data") or {}
        if event["type"] == STORED:
            message = EmailMessage.get_or_none(EmailMessage.id == data.get("message_id"))
            if message is not None:
                data = message_payload(message, self.settings, self.store)
        return json.dumps({"id": event["id"], "type": event["type"],
                           "timestamp": event.get("timestamp"), "data": data},
                          ensure_ascii=False).encode("utf-8")

    def _post(self, job: _Job) -> webhooks.Result:
        secret = webhooks.secret_of(self.settings, job.endpoint)
        result = webhooks.post(self.client, job.endpoint.url, secret, job.event["id"], job.body,
                               self.settings.webhook_timeout)
        metrics.webhook_seconds.observe(result.latency_ms / 1000)
        return result

    def _settle(self, jobs: list[_Job]) -> None:
        """Record every attempt, then publish the retries and the dead: an attempt that is
        recorded delivered is never made again by a redelivery of its event."""
        for job in jobs:
            if job.result.outcome == webhooks.RETRY and job.attempt >= self.attempts:
                job.result.outcome = webhooks.DEAD
        with translated("recording webhook attempts"), db.atomic():
            webhooks.record([(job.endpoint, job.event, job.attempt, job.result) for job in jobs])
        for job in jobs:
            outcome = job.result.outcome
            metrics.webhook_deliveries.labels(outcome).inc()
            since = job.endpoint.failing_since
            metrics.webhook_failing_since.labels(str(job.endpoint.id)).set(
                since.replace(tzinfo=dt.timezone.utc).timestamp() if since else 0)
            if outcome == webhooks.RETRY:
                self._retry(job)
            elif outcome == webhooks.DEAD:
                self._dead(job)
            elif outcome == webhooks.GONE:
                log.warning("webhook endpoint %d (%s) answered 410 Gone: disabled",
                            job.endpoint.id, job.endpoint.url)

    def _retry(self, job: _Job) -> None:
        delay = self.delays[job.attempt - 1]
        self.publisher.publish(
            broker.webhook_wait_queue(delay), job.published, exchange="",
            message_id=job.event["id"],
            headers={H_ENDPOINT: job.endpoint.id, H_ATTEMPT: job.attempt + 1})

    def _dead(self, job: _Job) -> None:
        reason = (f"webhook to endpoint {job.endpoint.id} ({job.endpoint.url}) failed "
                  f"{job.attempt} time(s), last: {job.result.error}")
        log.error("%s: to mailferry.dead", reason)
        self.publisher.publish(
            broker.ROUTING_KEYS[broker.DEAD], job.published, message_id=job.event["id"],
            headers={H_ENDPOINT: job.endpoint.id, H_ATTEMPT: job.attempt + 1,
                     broker.H_REASON: reason, broker.H_QUEUE: broker.WEBHOOKS,
                     broker.H_ROUTING_KEY: broker.WEBHOOKS, broker.H_FAILED_AT: now_iso()})


def _event_of(body: bytes) -> dict:
    try:
        event = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(event, dict) or not isinstance(event.get("id"), str) \
            or not isinstance(event.get("type"), str):
        raise ValueError("an event has a string id and type")
    return event
