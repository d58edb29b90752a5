"""The IMAP connection: the one place an IMAPClient is made and its exceptions translated.

A wrong password or an unusable configuration leaves as EmailAuthError / EmailConfigError
(permanent: the task fails at once); a refused connection, a timeout, a dropped socket or an
aborted command leaves as EmailFetchError (transient: retried). Every socket has a connect
and a read timeout. ``ImapSession`` offers only what a sync needs, in Mailferry's words.
"""

from __future__ import annotations

import functools
import logging
import imaplib
import re
import socket
import ssl
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

from imapclient import IMAPClient, SocketTimeout
from imapclient.exceptions import (
    CapabilityError, IMAPClientAbortError, IMAPClientError, LoginError,
)

from mailferry.errors import EmailAuthError, EmailConfigError, EmailFetchError
from mailferry.mailbox_config import ImapConfig

log = logging.getLogger(__name__)

BODY = b"BODY[]"  # the key of a BODY.PEEK[] item in a FETCH response
SIZE = b"RFC822.SIZE"
# UIDs named in one FETCH: servers cap a command line (Dovecot: 64 KB), and a UID takes up
# to 11 characters in the list.
FETCH_CHUNK = 1000
# Response codes (RFC 5530) that say a refused command may work later; [THROTTLED] is
# Exchange Online's, with "Suggested Backoff Time: N milliseconds" in its text.
TRANSIENT_CODES = (b"[UNAVAILABLE]", b"[INUSE]", b"[SERVERBUG]", b"[LIMIT]", b"[OVERQUOTA]",
                   b"[THROTTLED]")
BACKOFF_HINT = re.compile(rb"backoff time:\s*(\d+)\s*(milliseconds|ms|seconds|s)\b", re.I)
MAX_RETRY_AFTER = 300.0  # seconds: a server's hint beyond this is taken as this


@dataclass(frozen=True)
class FolderState:
    """What SELECT told us about a folder."""

    name: str
    uidvalidity: int
    uidnext: int | None
    exists: int
    highestmodseq: int | None  # None when the server has no CONDSTORE


def _text(exc: BaseException) -> str:
    value = exc.args[0] if exc.args else exc
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).strip() or exc.__class__.__name__


def _raw(exc: BaseException) -> bytes:
    value = exc.args[0] if exc.args else b""
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")


@contextmanager
def translated(action: str, where: str) -> Iterator[None]:
    """Turn imapclient, socket and TLS errors of ``action`` into Mailferry's errors."""
    try:
        yield
    except ssl.SSLCertVerificationError as exc:
        raise EmailConfigError(
            f"{where}: the server's TLS certificate was not accepted ({exc.verify_message}); "
            "fix the host name, or give the CA with ca_file") from exc
    except LoginError as exc:
        if any(code in _raw(exc) for code in TRANSIENT_CODES):
            raise EmailFetchError(f"{where}: {action}: server unavailable: {_text(exc)}",
                                  retry_after=retry_after(exc)) from exc
        raise EmailAuthError(f"{where}: login refused: {_text(exc)}") from exc
    except CapabilityError as exc:
        raise EmailConfigError(f"{where}: {action}: {_text(exc)}") from exc
    except (IMAPClientAbortError, socket.timeout, TimeoutError, OSError) as exc:
        # socket.gaierror, ConnectionRefusedError, ssl.SSLError are OSErrors too
        raise EmailFetchError(f"{where}: {action} failed: {exc!r}") from exc
    except IMAPClientError as exc:
        raise EmailFetchError(f"{where}: {action}: {_text(exc)}", retry_after=retry_after(exc)) from exc


def retry_after(exc: BaseException) -> float | None:
    """The wait a throttled server asked for (Exchange: ``NO [THROTTLED] … Suggested Backoff
    Time: 1500 milliseconds``), in seconds, capped; None when it named none."""
    found = BACKOFF_HINT.search(_raw(exc))
    if found is None:
        return None
    number = float(found.group(1))
    seconds = number / 1000 if found.group(2).lower() in (b"milliseconds", b"ms") else number
    return min(seconds, MAX_RETRY_AFTER)


class ImapSession:
    """One logged-in connection. Not thread-safe: one thread uses it at a time."""

    def __init__(self, client: IMAPClient, config: ImapConfig, where: str):
        self.client = client
        self.config = config
        self.where = where
        self.capabilities: frozenset[bytes] = frozenset()
        self.folder: FolderState | None = None

    def select(self, folder: str, *, readonly: bool = True) -> FolderState:
        """SELECT (or EXAMINE, when ``readonly``: the server then changes no flag at all)."""
        with translated(f"select {folder!r}", self.where):
            try:
                response = self.client.select_folder(folder, readonly=readonly)
            except IMAPClientError as exc:
                if isinstance(exc, IMAPClientAbortError) or any(c in _raw(exc) for c in TRANSIENT_CODES):
                    raise
                raise EmailConfigError(f"{self.where}: folder {folder!r}: {_text(exc)}") from exc
        uidvalidity = response.get(b"UIDVALIDITY")
        if uidvalidity is None:
            # Without UIDVALIDITY no UID can be trusted from one session to the next.
            raise EmailConfigError(f"{self.where}: folder {folder!r}: server sent no UIDVALIDITY")
        modseq = response.get(b"HIGHESTMODSEQ")
        self.folder = FolderState(folder, int(uidvalidity), _int(response.get(b"UIDNEXT")),
                                  int(response.get(b"EXISTS") or 0), _int(modseq))
        return self.folder

    def syncable_folders(self, skip: Iterable[str] = ()) -> list[str]:
        """Every folder that can be selected, but the SPECIAL-USE ones no inbound mail is in
        (RFC 6154: \\Trash, \\Junk, \\Sent, \\Drafts, \\All) and ``skip``. imapclient
        decodes the names from modified UTF-7 (RFC 3501), or takes them as UTF-8 (RFC 6855)."""
        skipped = set(skip)
        with translated("list folders", self.where):
            listed = self.client.list_folders()
        out = []
        for flags, _, name in listed:
            if isinstance(name, bytes):
                name = name.decode("utf-8", "replace")
            if {f.lower() for f in flags} & _NOT_SYNCED or name in skipped:
                continue
            out.append(name)
        return out

    def uids_after(self, last_uid: int) -> list[int]:
        """UIDs above ``last_uid``, ascending.

        ``UID n:*`` always matches the message with the highest UID, even when that UID is
        below n (the range is read as "*:n"), so the answer is filtered here.
        """
        with translated("search", self.where):
            found = self.client.search(["UID", f"{last_uid + 1}:*"])
        return sorted(uid for uid in found if uid > last_uid)

    def sizes(self, uids: list[int]) -> dict[int, int]:
        """RFC822.SIZE of each of ``uids`` still there: what batches are cut by."""
        found: dict[int, int] = {}
        for response in self._fetch(uids, SIZE, "sizes"):
            found.update({uid: int(data[SIZE]) for uid, data in response.items() if SIZE in data})
        return found

    def fetch_raw(self, uids: list[int]) -> dict[int, bytes]:
        """The raw messages of ``uids`` (those still there), with BODY.PEEK[]: \\Seen stays."""
        found: dict[int, bytes] = {}
        for response in self._fetch(uids, b"BODY.PEEK[]", "messages"):
            found.update({uid: data[BODY] for uid, data in response.items() if data.get(BODY) is not None})
        return found

    def _fetch(self, uids: list[int], item: bytes, what: str):
        # A list, not ranges: imapclient keeps only the answers whose UID it was given
        # (it drops unsolicited FETCH responses that way).
        for start in range(0, len(uids), FETCH_CHUNK):
            chunk = list(uids[start:start + FETCH_CHUNK])
            with translated(f"fetch of {len(chunk)} {what}", self.where):
                yield self.client.fetch(chunk, [item])

    def mark_seen(self, uids: list[int]) -> None:
        if uids:
            with translated("store \\Seen", self.where):
                self.client.add_flags(uid_ranges(uids), [b"\\Seen"], silent=True)

    def move(self, uids: list[int], target: str) -> None:
        """MOVE, or COPY + \\Deleted + UID EXPUNGE: never a plain EXPUNGE, which would also
        remove what the user had flagged \\Deleted."""
        if not uids:
            return
        with translated(f"move to {target!r}", self.where):
            if b"MOVE" in self.capabilities:
                self.client.move(uid_ranges(uids), target)
            elif b"UIDPLUS" in self.capabilities:
                self.client.copy(uid_ranges(uids), target)
                self.client.add_flags(uid_ranges(uids), [b"\\Deleted"], silent=True)
                self.client.uid_expunge(uid_ranges(uids))
            else:
                raise EmailConfigError(
                    f"{self.where}: move_to needs a server with MOVE or UIDPLUS; this one has neither")

    def delete(self, uids: list[int]) -> None:
        """\\Deleted + UID EXPUNGE of exactly ``uids`` (UIDPLUS): never a plain EXPUNGE,
        which would also remove what the user had flagged \\Deleted."""
        if not uids:
            return
        if b"UIDPLUS" not in self.capabilities:
            raise EmailConfigError(f"{self.where}: delete needs a server with UIDPLUS (UID "
                                   "EXPUNGE); this one has none")
        with translated("delete", self.where):
            self.client.add_flags(uid_ranges(uids), [b"\\Deleted"], silent=True)
            self.client.uid_expunge(uid_ranges(uids))

    # -- IDLE (RFC 2177): consumer.imap_idle ------------------------------------------------

    @property
    def has_idle(self) -> bool:
        return b"IDLE" in self.capabilities

    def idle_start(self):
        """Enter IDLE; return the socket to watch for what the server pushes."""
        with translated("idle", self.where):
            self.client.idle()
            sock = self.client.socket()
        # A peer that vanished without a FIN is found by the kernel, not only at the renewal.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sock

    def idle_read(self) -> tuple[bool, bool]:
        """Read what the server pushed, without blocking: (new mail EXISTS, the server
        ended the connection). Nothing to read although the socket was readable means the
        peer closed it; the caller counts that (a TLS record without data looks the same once)."""
        with translated("idle read", self.where):
            responses = self.client.idle_check(timeout=0)
        bye = any(r and r[0] == b"BYE" for r in responses)
        return _new_mail(responses), bye or not responses

    def idle_renew(self) -> bool:
        """DONE, then IDLE again (servers may end an IDLE after 30 minutes); True when the
        server reported new mail meanwhile."""
        with translated("idle renew", self.where):
            _, responses = self.client.idle_done()
            self.client.idle()
        return _new_mail(responses)

    def limit_literals(self, max_bytes: int) -> None:
        """Refuse any literal the server announces larger than ``max_bytes`` before reading
        it: imaplib reads a ``{n}`` literal whole into memory, whatever n a server claims."""
        imap = self.client._imap  # imaplib.IMAP4: the one place literals are read
        read = imap.read

        def bounded_read(size: int) -> bytes:
            if size > max_bytes:
                raise imaplib.IMAP4.abort(
                    f"server announced a literal of {size} bytes, over the limit of {max_bytes}")
            return read(size)

        imap.read = bounded_read

    def abort(self) -> None:
        """Close the socket under whatever is reading it (from another thread): the
        fetch's deadline. The reader sees an error at once, instead of at its next timeout."""
        try:
            self.client.socket().shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed

    def close(self) -> None:
        """Log out; a connection that is already broken is just dropped."""
        try:
            self.client.logout()
        except Exception:  # noqa: BLE001 - the session is over either way
            try:
                self.client.shutdown()
            except Exception:  # noqa: BLE001
                pass


# LIST flags of folders never synced: not selectable, or SPECIAL-USE without inbound mail.
_NOT_SYNCED = {b"\\noselect", b"\\nonexistent", b"\\trash", b"\\junk", b"\\sent",
               b"\\drafts", b"\\all"}


def _new_mail(responses: list) -> bool:
    """True when the untagged IDLE responses hold an ``n EXISTS``."""
    return any(len(r) >= 2 and r[1] == b"EXISTS" for r in responses)


def uid_ranges(uids: Iterable[int]) -> str:
    """``1,2,3,7,9,10`` -> ``1:3,7,9:10``: short commands for long runs of UIDs."""
    ordered = sorted(set(uids))
    parts: list[str] = []
    start = prev = None
    for uid in ordered:
        if prev is not None and uid == prev + 1:
            prev = uid
            continue
        if start is not None:
            parts.append(f"{start}:{prev}" if prev != start else str(start))
        start = prev = uid
    if start is not None:
        parts.append(f"{start}:{prev}" if prev != start else str(start))
    return ",".join(parts)


def ssl_context(config: ImapConfig) -> ssl.SSLContext:
    return _ssl_context(config.ca_file)


@functools.lru_cache(maxsize=64)
def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """One context per CA bundle: each holds its parsed CA store (about a megabyte), and the
    IDLE lane keeps a connection per mailbox open."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise EmailConfigError(f"imap_config.ca_file: cannot load {ca_file!r}: {exc}") from exc


def connect(config: ImapConfig, timeout: float) -> ImapSession:
    """Connect (SSL, STARTTLS or plain), log in, and return the session."""
    where = f"imap {config.username}@{config.host}:{config.port}"
    use_tls = config.security in ("ssl", "starttls")
    context = ssl_context(config) if use_tls else None
    with translated("connect", where):
        client = IMAPClient(config.host, config.port, ssl=config.security == "ssl",
                            ssl_context=context, timeout=SocketTimeout(timeout, timeout))
    session = ImapSession(client, config, where)
    try:
        with translated("login", where):
            if config.security == "starttls":
                client.starttls(context)
            if config.oauth2:
                mechanism = str(config.oauth2.get("mechanism", "XOAUTH2")).upper()
                if mechanism == "OAUTHBEARER":
                    client.oauthbearer_login(config.username, config.access_token or "")
                else:
                    client.oauth2_login(config.username, config.access_token or "")
            else:
                client.login(config.username, config.password)
            session.capabilities = frozenset(client.capabilities())
            if b"CONDSTORE" in session.capabilities and b"ENABLE" in session.capabilities:
                # Makes SELECT report HIGHESTMODSEQ: the cheap "did anything change" check.
                client.enable("CONDSTORE")
    except BaseException:
        session.close()
        raise
    return session


def _int(value) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None
