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


