"""A small misbehaving IMAP server for tests, on loopback: it speaks enough IMAP4rev1 for a
sync (CAPABILITY, LOGIN, EXAMINE/SELECT, UID SEARCH, UID FETCH, LOGOUT) and then misbehaves
in the FETCH of BODY[] the way hostile or broken servers do:

- ``slow``: sends the literal one byte every ``trickle`` seconds (every read succeeds);
- ``huge``: announces a literal of ``announce`` bytes (and would send them);
- ``cut``: announces a literal, sends a few bytes, and closes the connection.
"""

from __future__ import annotations

import re
import socket
import socketserver
import threading
import time

MESSAGE = (b"From: a@example.net\r\nTo: bob@example.org\r\nSubject: from a hostile server\r\n"
           b"Message-ID: <hostile-imap@example.net>\r\n\r\nbody\r\n")
_TAGGED = re.compile(rb"^(\S+) (?:UID )?(\S+)(.*)$", re.I)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: HostileImapServer = self.server.owner  # type: ignore[attr-defined]
        self.wfile.write(b"* OK hostile test server ready\r\n")
        while True:
            line = self.rfile.readline()
            if not line:
                return
            found = _TAGGED.match(line.rstrip(b"\r\n"))
            if not found:
                continue
            tag, command, rest = found.group(1), found.group(2).upper(), found.group(3)
            try:
                if not self._answer(server, tag, command, rest):
                    return
            except OSError:
                return

    def _answer(self, server, tag: bytes, command: bytes, rest: bytes) -> bool:
        out = self.wfile
        if command == b"CAPABILITY":
            out.write(b"* CAPABILITY IMAP4rev1\r\n" + tag + b" OK done\r\n")
        elif command == b"LOGIN":
            out.write(tag + b" OK logged in\r\n")
        elif command in (b"EXAMINE", b"SELECT"):
            out.write(b"* 1 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 2] ok\r\n"
                      + tag + b" OK [READ-ONLY] done\r\n")
        elif command == b"SEARCH":
            out.write(b"* SEARCH 1\r\n" + tag + b" OK done\r\n")
        elif command == b"FETCH" and b"RFC822.SIZE" in rest.upper():
            out.write(b"* 1 FETCH (UID 1 RFC822.SIZE %d)\r\n" % len(MESSAGE) + tag + b" OK done\r\n")
        elif command == b"FETCH":
            return self._misbehave(server, tag)
        elif command == b"LOGOUT":
            out.write(b"* BYE\r\n" + tag + b" OK bye\r\n")
            return False
        else:
            out.write(tag + b" OK whatever\r\n")
        out.flush()
        return True

    def _misbehave(self, server, tag: bytes) -> bool:
        out = self.wfile
        if server.mode == "huge":
            out.write(b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % server.announce)
            out.flush()
            server.literal_started.set()
            # Would send them all; a careful client has hung up by now.
            chunk = b"x" * 65536
            for _ in range(server.announce // len(chunk)):
                out.write(chunk)
            return False
        out.write(b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % len(MESSAGE))
        out.flush()
        server.literal_started.set()
        if server.mode == "cut":
            out.write(MESSAGE[:10])
            out.flush()
            self.request.shutdown(socket.SHUT_RDWR)
            return False
        for byte in MESSAGE + b")\r\n" + tag + b" OK done\r\n":  # slow
            if server.stopping.is_set():
                return False
            out.write(bytes([byte]))
            out.flush()
            time.sleep(server.trickle)
        return True


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class HostileImapServer:
    def __init__(self, mode: str, *, trickle: float = 0.5, announce: int = 1_000_000_000):
        self.mode, self.trickle, self.announce = mode, trickle, announce
        self.literal_started = threading.Event()
        self.stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self  # type: ignore[attr-defined]
        self.host, self.port = self._server.server_address

    def __enter__(self) -> "HostileImapServer":
        threading.Thread(target=self._server.serve_forever, daemon=True,
                         name=f"hostile-imap-{self.mode}").start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
