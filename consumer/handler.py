"""What a queue's worker is: the ``Handler`` every consumer lane runs, and the values the
broker loop and a handler exchange (``Delivery`` in, ``Outcome`` out).

Every hook the runner calls is declared here with a default that does nothing, so a reader
sees the whole interface in one place and the runner never asks a handler what it has.
"""

from __future__ import annotations

from dataclasses import dataclass

import pika


@dataclass
class Delivery:
    tag: int
    body: bytes
    properties: pika.BasicProperties
    redelivered: bool
    routing_key: str
    generation: int
    decoded: object = None  # the handler's reading of ``body``, kept by ``weigh``

    @property
    def headers(self) -> dict:
        return self.properties.headers or {}


@dataclass(frozen=True)
class Outcome:
    action: str  # "ack" | "dead" | "requeue"
    reason: str = ""

    @staticmethod
    def ack() -> "Outcome":
        return Outcome("ack")

    @staticmethod
    def dead(reason: str) -> "Outcome":
        return Outcome("dead", reason)

    @staticmethod
    def requeue(reason: str) -> "Outcome":
        return Outcome("requeue", reason)


class Handler:
    """A queue's worker: ``handle`` turns a batch of deliveries into one outcome each.

    A handler that sets ``pipelined`` splits ``handle`` into ``prepare(batch) -> state`` and
    ``commit(state) -> outcomes``: the runner then prepares the next batches (starting their
    parse in another process) before it commits the oldest, so that parsing and the disk
    waits of committing overlap. With ``batch_bytes`` and ``weigh(delivery) -> bytes``, a
    batch also closes once the mail it stands for reaches ``batch_bytes``: what a consumer
    holds is bounded by size, not only by count.
    """

    queue: str
    prefetch: int = 1
    pipelined = False
    batch_bytes = 0  # 0: batches are bounded by count only

    def handle(self, deliveries: list[Delivery]) -> list[Outcome]:
        return self.commit(self.prepare(deliveries))

    def prepare(self, deliveries: list[Delivery]) -> object:
        return deliveries

    def commit(self, state) -> list[Outcome]:
        raise NotImplementedError(f"{type(self).__name__} implements neither handle nor commit")

    def weigh(self, delivery: Delivery) -> int:
        return 0

    def warm_up(self) -> None:
        """Called before the first consume: start what the first batch needs."""

    def close(self) -> None:
        """Called once at shutdown, after the last batch."""
