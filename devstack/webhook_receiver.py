"""A webhook receiver on loopback, started by a test or a benchmark: it answers each POST with the next
status of its script (then the last one, for ever) and keeps what it got. ``hold(after=n)``
answers n requests and keeps every later one waiting until ``release()``: a test that must act
while a stream is still in flight (a broker restart) holds the stream there instead of racing it."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    at: float
    headers: dict
    body: bytes
    status: int

    @property
    def event(self) -> dict:
        return json.loads(self.body)


class Receiver:
    def __init__(self, statuses=(200,)):
        self.statuses = list(statuses)
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self._admitted = 0
        self._hold_after: int | None = None
        self._released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a production receiver does

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver._wait_if_held()
                with receiver.lock:
                    status = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                    receiver.received.append(Received(time.monotonic(), dict(self.headers.items()), body, status))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

    def hold(self, after: int) -> None:
        """Answer ``after`` more requests, then keep the rest waiting until release()."""
        with self.lock:
            self._hold_after = self._admitted + after
            self._released.clear()

    def release(self) -> None:
        with self.lock:
            self._hold_after = None
        self._released.set()

    def _wait_if_held(self) -> None:
        with self.lock:
            self._admitted += 1
            held = self._hold_after is not None and self._admitted > self._hold_after
        if held:
            self._released.wait(300)  # bounded: a test that forgets release() still ends

    def got(self) -> list[Received]:
        with self.lock:
            return list(self.received)


@contextlib.contextmanager
def relay_thread(settings):
    """The relay (relay.main.Relay) in a thread of the test process."""
    from relay.main import Relay
    relay = Relay(settings)  # imported here: devstack's other users need no relay
    thread = threading.Thread(target=relay.run, daemon=True, name="test-relay")
    thread.start()
    try:
        yield relay
    finally:
        relay.stop()
        thread.join(10)
        assert not thread.is_alive(), "relay did not stop"
