"""Helpers for tests that run the pipeline: a consumer in a thread of the test process; the
helpers the benchmarks share (a consumer process, waiting, the dead letters) are
``devstack.consumers``, re-exported here."""

from __future__ import annotations

import contextlib
import threading

from consumer.main import build_handlers
from devstack.consumers import (  # noqa: F401 (the tests import them from here)
    ROOT, consumer_process, dead_letters, queue_depth, settings_env, wait_for,
)
from consumer.runner import Runner
from mailferry.config import Settings


@contextlib.contextmanager
def consumer_thread(settings: Settings, handlers=None):
    """A Runner in a thread of the test process (sharing its database connection setup)."""
    runner = Runner(settings, handlers if handlers is not None else build_handlers(settings))
    thread = threading.Thread(target=runner.run, daemon=True, name="test-consumer")
    thread.start()
    try:
        assert runner.ready.wait(30), "consumer did not start consuming"
        yield runner
    finally:
        runner.stop()
        thread.join(timeout=40)
        assert not thread.is_alive(), "consumer did not stop"


def waiting_in_spool(settings: Settings) -> list[str]:
    """What the spool still holds for storing: the names of files in incoming/, and the
    queue ids of segment records neither stored, withdrawn nor quarantined."""
    from mailferry.spool import Spool, read_segment
    from scheduler.sweep import not_done
    spool = Spool(settings.resolved_spool_dir)
    if not spool.incoming.is_dir():
        return []
    waiting = sorted(p.name for p in spool.incoming.glob("*.eml"))
    for segment in spool.segments():
        waiting += [job.queue_id for job in not_done(spool, read_segment(segment))]
    return waiting
