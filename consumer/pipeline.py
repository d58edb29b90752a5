"""A consumer lane's worker: one queue's deliveries, in batches, through its handler's stages,
to one outcome each.

The stages of a batch, in the lane's one worker thread:

1. **receive** — up to a batch from the inbox the broker loop fills (``_next_batch``),
   closed by count or by the bytes of mail it stands for (``Handler.weigh``); deliveries the
   broker has delivered too often are dead-lettered unread (``_exhausted``);
2. **prepare** — the handler checks each job and starts its parse (in the parser process);
   a pipelined lane keeps ``PIPELINE_DEPTH`` batches prepared ahead of the one it commits
   (``run_ahead``, the stage loop an IMAP run uses too, with fetched batches);
3. **commit** — the handler stores the files and commits the rows (``consumer.save``);
4. **settle** — the outcomes go to the broker loop (``consumer.runner``), which acks only
   now, after the commit, requeues with the broker's count, or dead-letters with the reason.

A batch that raises is judged message by message, so one bad message is its own outcome,
never its batch's (``_handle``).
"""

from __future__ import annotations

import logging
import queue as queue_mod
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from consumer.handler import Delivery, Handler, Outcome
from mailferry import broker, metrics
from mailferry.errors import TransientError

log = logging.getLogger(__name__)

TRANSIENT_ATTEMPTS = 5  # deliveries of one message failing transiently before it is dead
POISON_ATTEMPTS = 2  # deliveries of one message raising what no handler expected
PIPELINE_DEPTH = 2  # batches a pipelined handler has prepared ahead of the one it commits
STOP = object()  # what a stage loop's ``take`` returns when there is nothing more


@dataclass
class Lane:
    """One queue's worker: its handler, the inbox the broker loop fills, and the batches
    taken and not yet settled. ``settle(batch, outcomes)`` is the broker loop's (it acks,
    requeues and dead-letters on its own thread); the loop also keeps its channel here."""

    handler: Handler
    settle: Callable[[list[Delivery], list[Outcome]], None] = lambda batch, outcomes: None
    inbox: "queue_mod.Queue[Delivery]" = field(default_factory=queue_mod.Queue)
    channel: object = None  # the broker loop's, for this queue
    consumer_tag: str | None = None
    thread: threading.Thread | None = None
    in_flight: int = 0  # batches taken and not yet settled
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def pipelined(self) -> bool:
        return self.handler.pipelined

    @property
    def batch_size(self) -> int:
        # Pipelined, one batch commits while PIPELINE_DEPTH (2) are being parsed, and one more
        # waits in the inbox so the parser never idles for the ack → delivery round trip.
        return max(1, self.handler.prefetch // 4) if self.pipelined else self.handler.prefetch

    def track(self, delta: int) -> None:
        with self.lock:
            self.in_flight += delta

    def run(self) -> None:
        """The worker thread: batches until shutdown, each settled by the broker loop."""
        if self.pipelined:
            self._work_pipelined()
            return
        while (batch := self._next_batch(wait=True)) is not STOP:
            if batch := self._exhausted(batch):
                self.settle(batch, self._handle(batch))

    def _work_pipelined(self) -> None:
        """Batches through ``run_ahead``: while this thread commits one, the parser process
        has the next ones. At shutdown, what was prepared is still committed."""
        def take(wait: bool):
            batch = self._next_batch(wait)
            if batch is None or batch is STOP:
                return batch
            return self._exhausted(batch) or None

        def commit(prepared: tuple[list[Delivery], object]) -> None:
            batch, state = prepared
            if isinstance(state, _Settled):
                outcomes = state.outcomes
            else:
                outcomes = self._handle(batch, run=lambda _batch: self.handler.commit(state))
            self.settle(batch, outcomes)

        run_ahead(take, lambda batch: (batch, self._prepare(batch)), commit)

    def _prepare(self, batch: list[Delivery]) -> object:
        try:
            return self.handler.prepare(batch)
        except Exception:  # judged message by message, the slow and careful way
            return _Settled(self._handle(batch))

    def _next_batch(self, wait: bool) -> list[Delivery] | object | None:
        """Up to a batch of deliveries; None if ``wait`` is false and none is there, STOP at
        shutdown."""
        try:
            if wait:
                waited = time.perf_counter()
                first = self.inbox.get()
                metrics.worker_wait_seconds.labels(self.handler.queue, "broker").inc(
                    time.perf_counter() - waited)
            else:
                first = self.inbox.get_nowait()
        except queue_mod.Empty:
            return None
        if first is None:
            return STOP
        self.track(+1)
        batch = [first]
        budget = self.handler.batch_bytes
        weigh = _safe_weigh(self.handler.weigh)
        weight = weigh(first) if budget else 0
        while len(batch) < self.batch_size and (not budget or weight < budget):
            try:
                item = self.inbox.get_nowait()
            except queue_mod.Empty:
                break
            if item is None:
                self.inbox.put(None)  # type: ignore[arg-type]
                break
            batch.append(item)
            if budget:
                weight += weigh(item)
        return batch

    def _handle(self, batch: list[Delivery], run=None) -> list[Outcome]:
        """Outcomes of ``batch`` by ``run`` (default: the handler's ``handle``), never raising."""
        try:
            outcomes = (run or self.handler.handle)(batch)
            if len(outcomes) != len(batch):
                raise RuntimeError("handler returned the wrong number of outcomes")
            return outcomes
        except TransientError as exc:
            log.warning("%s: transient failure on a batch of %d: %s", self.handler.queue, len(batch), exc)
            time.sleep(1.0)  # don't spin on a database that is down
            return [self._transient(d, str(exc)) for d in batch]
        except Exception as exc:  # a bug or an input nobody foresaw
            if len(batch) > 1:
                # Isolate the message that breaks the batch: one bad message must not sink others.
                return [o for d in batch for o in self._handle([d])]
            log.exception("%s: unexpected error on one message", self.handler.queue)
            return [self._transient(batch[0], f"unexpected error: {exc!r}", poison=True)]

    def _transient(self, delivery: Delivery, reason: str, poison: bool = False) -> Outcome:
        """Requeue, unless this message has failed too often: then dead-letter it. The count
        is the broker's (``attempts_before``), so a restart or another consumer sees it too."""
        count = attempts_before(delivery) + 1
        limit = POISON_ATTEMPTS if poison else TRANSIENT_ATTEMPTS
        if count >= limit:
            return Outcome.dead(f"failed {count} times, last: {reason}")
        return Outcome.requeue(reason)

    def _exhausted(self, batch: list[Delivery]) -> list[Delivery]:
        """``batch`` without the deliveries the broker has delivered more often than any
        message may fail: on a quorum queue, ``x-delivery-count`` also counts the deliveries
        whose consumer died on them, which no outcome of ours ever counted. Those are
        dead-lettered unread, so a message that kills its consumer cannot do it forever."""
        kept, spent = [], []
        for delivery in batch:
            (spent if attempts_before(delivery) >= TRANSIENT_ATTEMPTS else kept).append(delivery)
        if spent:
            if kept:
                self.track(+1)  # settled on their own; the batch's count goes with the rest
            self.settle(spent, [Outcome.dead(
                f"delivered {attempts_before(d)} times without an outcome (did its consumer "
                "die on it?)") for d in spent])
        return kept


def run_ahead(take: Callable[[bool], object], prepare: Callable[[object], object],
              commit: Callable[[object], None], depth: int = PIPELINE_DEPTH) -> None:
    """The stage loop both workers share (the inbound lane and an IMAP run): keep ``depth``
    batches prepared, their parsing started in the parser process, ahead of the one this
    thread commits, and commit them in order. The parser always has the next batch while
    this thread stores and commits, and no batch changes threads on its way (each hand-off
    between threads costs both of them CPU).

    ``take(wait)`` gives the next batch, None when there is none yet (waiting only if
    ``wait``: when nothing is prepared), or ``STOP``. When ``take`` or ``prepare`` raises,
    what was prepared is committed before the error goes up. When ``commit`` raises, nothing
    after it is: a later batch must not be stored past an earlier one that was not (an IMAP
    checkpoint would skip it).
    """
    prepared: deque = deque()
    stopping = False
    while prepared or not stopping:
        try:
            while not stopping and len(prepared) <= depth:
                batch = take(not prepared)
                if batch is None:
                    break
                if batch is STOP:
                    stopping = True
                    break
                prepared.append(prepare(batch))
        except BaseException:
            _commit_quietly(prepared, commit)
            raise
        if prepared:
            commit(prepared.popleft())


def _commit_quietly(prepared: deque, commit: Callable[[object], None]) -> None:
    """Commit what is prepared while an error is on its way up; a failure ends it (see
    ``run_ahead``) and is logged, since the error being raised matters more."""
    try:
        while prepared:
            commit(prepared.popleft())
    except Exception as exc:  # noqa: BLE001
        log.warning("%d prepared batch(es) not committed: %s", len(prepared) + 1, exc)


@dataclass
class _Settled:
    """A batch whose outcomes are known before the commit stage (prepare failed)."""

    outcomes: list[Outcome]


def attempts_before(delivery: Delivery) -> int:
    """How many times this message was delivered and failed before, by the broker's count:
    a quorum queue's ``x-delivery-count``, or the header a requeue on a classic queue carries."""
    headers = delivery.headers
    value = headers.get("x-delivery-count", headers.get(broker.H_ATTEMPTS, 0))
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def _safe_weigh(weigh):
    """A handler's ``weigh`` that never raises: a job it cannot read weighs nothing, and the
    handler's own check dead-letters it with the reason."""
    def safe(delivery: Delivery) -> int:
        try:
            return max(0, int(weigh(delivery)))
        except Exception:  # noqa: BLE001
            return 0
    return safe
