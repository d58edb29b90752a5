"""A process stopped while it is still starting (importing, migrating) stops cleanly: SIGTERM
gives status 0, not death by the signal (mailferry/starting.py), whatever moment it lands."""

from __future__ import annotations

import signal

import pytest

from devstack.ports import free_port
from tests.pipeline import consumer_process, wait_for

SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def _catches_sigterm(pid: int) -> bool:
    """The kernel's view: the process has a handler for SIGTERM (its first line installed it)."""
    with open(f"/proc/{pid}/status") as status:
        caught = next(line for line in status if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & SIGTERM_BIT)


@pytest.mark.parametrize("module", ["consumer", "relay", "scheduler", "consumer.webhook_worker", "api"])
def test_sigterm_while_starting_is_a_clean_stop(broker_settings, tmp_path, module):
    settings = broker_settings.replace(api_port=free_port(), scheduler_metrics_port=0)
    process = consumer_process(settings, tmp_path / "out.log", module=module)
    try:
        wait_for(lambda: process.poll() is not None or _catches_sigterm(process.pid), timeout=10,
                 interval=0.001, message="a SIGTERM handler")
        early = (tmp_path / "out.log").read_text()
        process.send_signal(signal.SIGTERM)
        status = process.wait(40)
    finally:
        if process.poll() is None:
            process.kill()
    assert status == 0, (tmp_path / "out.log").read_text()[-2000:]
    # The handler was in before the process did anything (its imports take far longer than
    # the poll): the signal landed while it was starting, not in its loop.
    assert early == "", early
