"""Helpers and fixtures for the IMAP tests: seeding a real Dovecot mailbox, a user with a
mailbox configuration, a fake publisher at the watchdog seam.

Import the fixtures into a test module with ``from tests.imap_fixtures import *``.
"""

from __future__ import annotations

import io

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pytest
from imapclient import IMAPClient

from mailferry.config import Settings
from mailferry.mailbox_config import EmailConfigManager, ImapConfig
from mailferry.models import User
from devstack import mailgen
from devstack.ports import terminate_pids

__all__ = ["ImapUser", "FakePublisher", "client_for", "append", "flags_of", "generated",
           "corpus_messages", "imap_set", "imap_user", "nested_too_deep", "stop_dovecot"]


def client_for(account) -> IMAPClient:
    """A logged-in plain-IMAP client for the test's own look at the mailbox."""
    client = IMAPClient(account.host, account.port, ssl=False, timeout=30)
    client.login(account.username, account.password)
    return client


def append(account, messages: Iterable[bytes], folder: str = "INBOX", *,
           flags: tuple[bytes, ...] = (), msg_time: dt.datetime | None = None) -> int:
    """APPEND each message (MULTIAPPEND, 200 a command); return how many were appended."""
    items = [{"msg": m, "flags": flags, **({"date": msg_time} if msg_time else {})} for m in messages]
    client = client_for(account)
    try:
        if folder != "INBOX" and not client.folder_exists(folder):
            client.create_folder(folder)
        for start in range(0, len(items), 200):
            client.multiappend(folder, items[start:start + 200])
    finally:
        client.logout()
    return len(items)


def flags_of(account, folder: str = "INBOX") -> dict[int, tuple]:
    client = client_for(account)
    try:
        client.select_folder(folder, readonly=True)
        uids = client.search()
        return {uid: tuple(sorted(data[b"FLAGS"])) for uid, data in
                client.fetch(uids, [b"FLAGS"]).items()} if uids else {}
    finally:
        client.logout()


def generated(start: int, count: int) -> list[bytes]:
    """``count`` distinct messages (plain, text+HTML, attachments, national charsets)."""
    out = []
    for n in range(start, start + count):
        kind = n % 4
        if kind == 0:
            out.append(mailgen.plain(n))
        elif kind == 1:
            out.append(mailgen.text_and_html(n))
        elif kind == 2:
            out.append(mailgen.with_attachment(n, f"report-{n}.pdf", b"%PDF-1.4 " + bytes([n % 256]) * 300,
                                               content_type="application/pdf"))
        else:
            out.append(mailgen.national(n, "iso-8859-1", f"Grüße aus Köln, Nachricht {n}"))
    return out


def corpus_messages() -> list[bytes]:
    return [path.read_bytes() for path in mailgen.corpus_files()]


def nested_too_deep(n: int, depth: int = 40) -> bytes:
    """A message nested deeper than the default limit: the parser refuses it with a reason."""
    head = (f"From: deep@example.net\r\nTo: bob@example.org\r\nSubject: nested {n}\r\n"
            f"Message-ID: <deep-{n}@example.net>\r\nMIME-Version: 1.0\r\n")
    body = "text\r\n"
    for level in range(depth):
        body = (f"Content-Type: multipart/mixed; boundary=\"b{level}\"\r\n\r\n--b{level}\r\n"
                f"{body}\r\n--b{level}--\r\n")
    return (head + body).encode()


def imap_set(monkeypatch, settings, account, email: str, *options: str, stdin: str) -> int:
    """`mailferry imap set EMAIL` for ``account``, in this process, on ``settings``' database,
    with ``stdin`` as what the command reads (a password, or OAuth2's two secrets)."""
    from mailferry.cli import main
    monkeypatch.setenv("MAILFERRY_VAR_DIR", str(settings.var_dir))
    monkeypatch.setenv("MAILFERRY_DATABASE_URL", settings.resolved_database_url)
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return main(["imap", "set", email, "--host", account.host, "--port", str(account.port),
                 "--username", account.username, "--security", "none", *options])


def stop_dovecot(dovecot) -> None:
    """Stop the test Dovecot *and* the imap processes of connected clients.

    The master's SIGTERM leaves a logged-in client's imap process serving, and those
    processes do not carry the harness' environment marker; they do carry the instance
    name in their title (``dovecot-<instance>/imap``): that finds exactly this server's.
    """
    dovecot.stop()
    prefix = f"dovecot-{dovecot.instance}/".encode()
    leftovers = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(prefix):
                    leftovers.append(int(entry.name))
            except OSError:
                continue
    terminate_pids(leftovers, grace=5)


@dataclass
class ImapUser:
    user: User
    configs: EmailConfigManager
    account: object  # tests.harness.fixtures.ImapAccount
    settings: Settings

    @property
    def config(self) -> ImapConfig:
        return self.configs.get_imap_config(self.user)

    def configure(self, **changes) -> ImapConfig:
        cfg = {"host": self.account.host, "port": self.account.port,
               "username": self.account.username, "password": self.account.password,
               "security": "none", "folder": "INBOX"}
        cfg.update(changes)
        return self.configs.set_imap_config(self.user, cfg)


@pytest.fixture
def imap_user(settings, imap_account) -> ImapUser:
    """A user whose mailbox configuration points at a fresh Dovecot account (plain IMAP)."""
    user = User.create(email=f"{imap_account.username}@example.org")
    result = ImapUser(user, EmailConfigManager(settings), imap_account, settings)
    result.configure()
    return result


class FakePublisher:
    """Stands in for broker.Publisher at the watchdog seam; records what was published."""

    def __init__(self, fail: Exception | None = None):
        self.published: list[tuple[str, bytes]] = []
        self.declared: list[int] = []
        self.fail = fail

    def declare_watchdog(self, seconds: int) -> str:
        if self.fail:
            raise self.fail
        self.declared.append(seconds)
        return f"watchdog.{seconds}s"

    def publish(self, routing_key: str, body: bytes, **_kwargs) -> None:
        if self.fail:
            raise self.fail
        self.published.append((routing_key, body))

    def close(self) -> None:
        pass
