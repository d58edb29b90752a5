"""`mailferry replay`: dead-lettered messages back to the queue they came from, once the cause
is fixed (a limit raised, a user added, a bug deployed away).

For each message taken from ``mailferry.dead`` — at most as many as it held when the replay
began, so a message that dies again at once is not replayed twice in one run:

1. its origin: our ``x-mailferry-queue`` header, else RabbitMQ's own ``x-last-death-queue`` /
   ``x-death`` (the work queues' dead-letter backstop carries no header of ours);
2. an inbound job whose spool file was quarantined gets the file back: ``spool/failed/X.eml``
   moves to ``spool/incoming/X.eml`` (modified time set to now, so the spool sweep leaves it
   alone), or the consumer could only dead-letter it again as "file missing";
3. a publish to the origin queue (default exchange, routing key = the queue's name,
   mandatory) without the dead-letter headers, confirmed by the broker;
4. only then the ack that removes it from ``mailferry.dead``. A crash between 3 and 4 leaves
   the message in both queues; the consumer's receipts and unique keys make the second copy a
   counted duplicate, never a second stored message.

A message whose origin is unknown, or whose publish failed, stays: it is held unacked until
the run ends and then returned with ``basic.nack``, which (RabbitMQ 4.3+) does not count
against a quorum queue's delivery limit. pika errors are translated here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pika
import pika.exceptions as px

from mailferry import broker
from mailferry.config import Settings
from mailferry.contracts import InboundJob
from mailferry.errors import PermanentError, TransientError
from mailferry.spool import Spool, as_file_job
from mailferry.storage import fsync_dir

log = logging.getLogger(__name__)

H_REPLAYS = "x-mailferry-replays"  # how often this message was replayed
# Headers that describe the death, not the message: dropped when it goes back.
DEATH_HEADERS = (broker.H_REASON, broker.H_QUEUE, broker.H_ROUTING_KEY, broker.H_FAILED_AT,
                 broker.H_ATTEMPTS, "x-delivery-count", "x-death", "x-first-death-queue", "x-first-death-reason",
                 "x-first-death-exchange", "x-last-death-queue", "x-last-death-reason",
                 "x-last-death-exchange")


@dataclass
class ReplayItem:
    message_id: str | None
    origin: str | None
    reason: str
    action: str  # replayed | would replay | kept
    detail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def origin_queue(headers: dict | None) -> str | None:
    """The queue a dead letter came from, by our header or by RabbitMQ's own."""
    headers = headers or {}
    ours = _text(headers.get(broker.H_QUEUE))
    if ours:
        return ours
    last = _text(headers.get("x-last-death-queue"))
    if last:
        return last
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return _text(deaths[0].get("queue")) or None  # the newest death comes first
    return None


def death_reason(headers: dict | None) -> str:
    headers = headers or {}
    ours = _text(headers.get(broker.H_REASON))
    if ours:
        return ours
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return f"RabbitMQ: {_text(deaths[0].get('reason'))} in {_text(deaths[0].get('queue'))}"
    return "(no reason recorded)"


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


class Replayer:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.spool = Spool(settings.resolved_spool_dir)

    def run(self, *, limit: int | None = None, dry_run: bool = False) -> list[ReplayItem]:
        connection = broker.connect(self.settings.amqp_url)
        try:
            channel = connection.channel()
            broker.declare_topology(channel, self.settings)
            channel.confirm_delivery()
            depth = channel.queue_declare(broker.DEAD, passive=True).method.message_count
            todo = depth if limit is None else min(limit, depth)
            items, held = [], []
            for _ in range(todo):
                method, properties, body = channel.basic_get(broker.DEAD, auto_ack=False)
                if method is None:
                    break
                item = self._one(channel, properties, body, dry_run)
                items.append(item)
                if item.action == "replayed":
                    channel.basic_ack(method.delivery_tag)
                else:
                    held.append(method.delivery_tag)
            for tag in held:  # back into mailferry.dead, in their order
                channel.basic_nack(tag, requeue=True)
            return items
        except px.ChannelClosedByBroker as exc:
            raise PermanentError(f"RabbitMQ refused: {exc.reply_text}") from exc
        except broker.CONNECTION_ERRORS as exc:
            raise TransientError(f"RabbitMQ connection lost during the replay (messages not yet "
                                 f"acknowledged stay in {broker.DEAD}): {exc!r}") from exc
        finally:
            if connection.is_open:
                try:
                    connection.close()
                except broker.CONNECTION_ERRORS:
                    pass

    def _one(self, channel, properties: pika.BasicProperties, body: bytes, dry_run: bool) -> ReplayItem:
        headers = dict(properties.headers or {})
        origin = origin_queue(headers)
        item = ReplayItem(properties.message_id, origin, death_reason(headers), "kept")
        if not origin or origin == broker.DEAD:
            item.detail = "no origin queue in its headers"
            return item
        quarantined = self._quarantined_file(origin, body)
        if quarantined:
            body = quarantined[2]
            quarantined = quarantined[:2]
        if dry_run:
            item.action = "would replay"
            if quarantined:
                item.detail = f"would restore {quarantined[0].relative_to(self.spool.root)}"
            return item
        if quarantined:
            self._restore(*quarantined)
        try:
            channel.basic_publish("", origin, body, _replay_properties(properties, headers),
                                  mandatory=True)
        except (px.UnroutableError, px.NackError) as exc:
            if quarantined:
                os.replace(quarantined[1], quarantined[0])  # back into quarantine, as before
            item.detail = (f"queue {origin} does not exist" if isinstance(exc, px.UnroutableError)
                           else f"RabbitMQ refused the message for {origin}")
            log.warning("replay: message %s kept in %s: %s", item.message_id, broker.DEAD, item.detail)
            return item
        item.action = "replayed"
        if quarantined:
            failed, incoming = quarantined
            item.detail = (f"restored {failed.relative_to(self.spool.root)} to "
                           f"{incoming.relative_to(self.spool.root)}")
            _remove(quarantined[0].with_name(quarantined[0].name + ".reason"))
        log.info("replay: message %s back to %s", item.message_id, origin)
        return item

    def _quarantined_file(self, origin: str, body: bytes) -> tuple[Path, Path, bytes] | None:
        """(quarantined path, incoming path, the job to replay) of an inbound job whose file is
        in spool/failed. A segment record was quarantined as a file of its own: its job is
        replayed naming that file."""
        if origin != broker.INBOUND and not origin.startswith(broker.INBOUND + "."):
            return None  # not an inbound queue (one host's own is mailferry.inbound.<node>)
        try:
            job = InboundJob.from_body(body)
            entry = self.spool.entry(job)
        except PermanentError:
            return None  # a broken contract: replayed as it is, and dead again
        failed = self.spool.failed / entry.failed_name
        path = self.spool.incoming / entry.failed_name
        if path.exists() or not failed.is_file():
            return None
        if job.in_segment:
            body = as_file_job(job).to_body()
        return failed, path, body

    def _restore(self, failed: Path, incoming: Path) -> None:
        incoming.parent.mkdir(parents=True, exist_ok=True)
        os.replace(failed, incoming)
        os.utime(incoming)  # not an orphan for the spool sweep: it is ours to publish
        fsync_dir(incoming.parent)
        fsync_dir(failed.parent)


def _replay_properties(properties: pika.BasicProperties, headers: dict) -> pika.BasicProperties:
    kept = {k: v for k, v in headers.items() if k not in DEATH_HEADERS}
    kept[H_REPLAYS] = int(headers.get(H_REPLAYS) or 0) + 1
    return pika.BasicProperties(
        delivery_mode=pika.DeliveryMode.Persistent, content_type=properties.content_type,
        content_encoding=properties.content_encoding, message_id=properties.message_id,
        correlation_id=properties.correlation_id, timestamp=properties.timestamp,
        type=properties.type, headers=kept)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
