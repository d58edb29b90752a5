"""The parser helper process (consumer/parse_pool.py) used by long IMAP runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from mailread.parse import Limits
from consumer.parse_pool import ParsePool, parse_many
from mailferry.errors import TransientError
from devstack import mailgen
from devstack.ports import pid_alive, terminate_pids, wait_until
from tests.imap_fixtures import nested_too_deep
from tests.pipeline import ROOT


def helper_pid(pool: ParsePool) -> int:
    return pool.pid


@pytest.fixture
def pool():
    pool = ParsePool()
    pool.start()
    assert wait_until(pool.ready, 60), "the helper did not start"
    yield pool
    pool.close()


def test_the_helper_parses_as_this_process_does(pool):
    raws = [path.read_bytes() for path in mailgen.corpus_files()[:12]] + [nested_too_deep(1)]
    here = parse_many(raws, Limits())
    there = pool.collect(pool.submit(raws, Limits()))
    assert [p.error for p in there] == [p.error for p in here]
    assert there[-1].email is None and "nesting deeper than" in there[-1].error
    for mine, theirs in zip(here[:-1], there[:-1]):
        assert theirs.email == mine.email  # every field, attachments' bytes included
        assert theirs.seconds > 0


def test_requests_in_flight_come_back_whole_and_to_their_own_caller(pool):
    big = [mailgen.plain(n) for n in range(69)]
    small = [mailgen.plain(1000 + n) for n in range(3)]
    first, second = pool.submit(big, Limits()), pool.submit(small, Limits())
    assert [p.email.message_id for p in pool.collect(second)] == [
        f"<test-{1000 + n}@example.net>" for n in range(3)]
    assert [p.email.message_id for p in pool.collect(first)] == [
        f"<test-{n}@example.net>" for n in range(len(big))]


def test_a_helper_that_died_is_a_transient_error_and_the_next_submit_starts_another(pool):
    first = helper_pid(pool)
    os.kill(first, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(first), 10)
    with pytest.raises(TransientError, match="parser process died"):
        pool.collect(pool.submit([mailgen.plain(1)], Limits()))
    result = pool.collect(pool.submit([mailgen.plain(2)], Limits()))
    assert result[0].email.message_id == "<test-2@example.net>"
    assert helper_pid(pool) != first


def test_a_helper_whose_owner_was_killed_leaves_with_its_fork_server(tmp_path):
    script = textwrap.dedent("""
        import multiprocessing.forkserver as fs, sys, time
        from consumer.parse_pool import ParsePool
        if __name__ == "__main__":
            pool = ParsePool()
            pool.start()
            pool.start(wait=True)
            print(pool.pid, fs._forkserver._forkserver_pid, flush=True)
            time.sleep(600)
    """)
    (tmp_path / "owner.py").write_text(script)
    owner = subprocess.Popen([sys.executable, str(tmp_path / "owner.py")], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdout=subprocess.PIPE, text=True)
    helper = server = None
    try:
        helper, server = (int(x) for x in owner.stdout.readline().split())
        assert pid_alive(helper) and pid_alive(server)
        owner.kill()  # SIGKILL: no atexit, no executor shutdown
        owner.wait(10)
        assert wait_until(lambda: not pid_alive(helper) and not pid_alive(server), 15), \
            "the helper or its fork server outlived their owner"
    finally:
        if owner.poll() is None:
            owner.kill()
        terminate_pids([p for p in (helper, server) if p], grace=2)


def test_large_requests_and_replies_never_wait_for_each_other(pool):
    # Two requests of megabytes each sent before any reply is read, by the thread that will
    # read the replies: the helper must take the second request while its first (larger than
    # the pipe's buffer) reply is still unread, or both sides would wait forever.
    big = [mailgen.with_attachment(n, f"big-{n}.bin", os.urandom(3_000_000)) for n in range(2)]
    collected: dict[str, list] = {}

    def exchange():
        first = pool.submit([big[0]], Limits())
        second = pool.submit([big[1]], Limits())
        collected["second"] = pool.collect(second)  # replies are matched to their tickets,
        collected["first"] = pool.collect(first)    # whatever order they are collected in

    worker = threading.Thread(target=exchange, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "owner and helper are waiting for each other"
    for name, n in (("first", 0), ("second", 1)):
        [parsed] = collected[name]
        assert parsed.email.attachments[0].filename == f"big-{n}.bin"
        assert len(parsed.email.attachments[0].data) == 3_000_000


@pytest.mark.parametrize("kind", ["InProcess", "ParsePool"])
def test_every_parser_gives_what_parsing_here_gives(kind, tmp_path):
    """The other implementations of the parser interface: the same outcomes, in order, for
    bytes and for files (a missing file is told from a refused message)."""
    import consumer.parse_pool as parse_pool
    from mailferry.spool import SpoolEntry
    parser = getattr(parse_pool, kind)()
    raws = [mailgen.plain(1), nested_too_deep(1), mailgen.with_attachment(2, "a.pdf", b"%PDF")]
    paths = []
    for n, raw in enumerate(raws):
        paths.append(tmp_path / f"{n}.eml")
        paths[-1].write_bytes(raw)
    paths.append(tmp_path / "gone.eml")
    try:
        parser.start(wait=True)
        from_bytes = parser.collect(parser.submit(raws, Limits()))
        from_files = parser.collect(parser.submit_files([SpoolEntry(p, p.stem) for p in paths], Limits()))
    finally:
        parser.close()
    here = parse_many(raws, Limits())
    for got in (from_bytes, from_files[:3]):
        assert [(p.email.subject if p.email else None, p.error) for p in got] == \
            [(p.email.subject if p.email else None, p.error) for p in here]
    assert from_files[3].missing and from_files[3].email is None
