"""A throwaway native Dovecot IMAP server for tests.

Runs as root (its login processes run as ``dovenull``, mail processes and auth as
``dovecot``), with its own config, base_dir, state_dir, log and maildirs, IMAP on a free
127.0.0.1 port and IMAPS on another (self-signed certificate made with openssl), so a system
dovecot is never touched.

Users live in passwd-files with plain passwords, one file per user (``users.d/<name>``, the
passdb/userdb path is ``users.d/%u``). One shared file would not do: dovecot's auth process
looks at a passwd-file's mtime at most once per second, so a user added right after another
login would be refused for up to a second. A new user's file is read on that user's first
login. (Changing the password of an existing user can take up to a second to be seen;
``add_user`` waits that second out in that case. A removed user is refused within about a
second; nobody waits for that, the fixtures never reuse a user name.)

Failed logins are answered at once: ``auth_failure_delay = 0`` (default 2 s) and no anvil
auth penalty (by default every failed login from 127.0.0.1 delays every later login from it,
up to 15 s, so one test of bad credentials would slow down all the tests after it).
"""
from __future__ import annotations

import atexit
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .ports import (
    LOOPBACK,
    free_port,
    pid_alive,
    listening,
    pids_with_cmdline,
    start_reaper,
    stop_reaper,
    tail,
    terminate_pids,
    wait_until,
)
from .postgres import remove_service_dir, service_dir
from .tls import self_signed

MARKER = "MAILFERRY_HARNESS_DOVECOT"
START_TIMEOUT = 30.0


class DovecotError(RuntimeError):
    pass


def find_dovecot() -> str | None:
    for cand in ("/usr/sbin/dovecot", shutil.which("dovecot")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def dovecot_available() -> bool:
    if find_dovecot() is None or os.geteuid() != 0:
        return False
    try:
        pwd.getpwnam("dovecot")
        pwd.getpwnam("dovenull")
    except KeyError:
        return False
    return True


def _check_field(kind: str, value: str) -> None:
    bad = ":\n\r\0/" if kind == "user name" else ":\n\r\0"
    if not value or any(c in value for c in bad) or value != value.strip() or value in (".", ".."):
        raise ValueError(f"{kind} {value!r} cannot go into a passwd-file")


class DovecotServer:
    """``start()`` / ``stop()`` / ``restart()`` / ``add_user()`` / ``remove_user()``;
    ``host``, ``port`` (plain IMAP, STARTTLS offered when ssl), ``ssl_port`` (IMAPS, or None),
    ``cert_path`` (the self-signed certificate, for clients that verify)."""

    def __init__(self, workdir: Path, users: dict[str, str] | None = None, ssl: bool = True,
                 oauth2_introspection_url: str | None = None, max_clients: int | None = None):
        # Set: room for this many logged-in clients at once (bench/imap_idle.py holds 1,000
        # IDLE connections; Dovecot's default_process_limit is 100).
        self.max_clients = max_clients
        # Set: a passdb ``oauth2`` before the password one, asking this URL (RFC 7662
        # introspection) whether an XOAUTH2 / OAUTHBEARER token is live.
        self.oauth2_introspection_url = oauth2_introspection_url
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.users: dict[str, str] = {}
        for name, password in (users or {}).items():
            _check_field("user name", name)
            _check_field("password", password)
            self.users[name] = password
        self.ssl = ssl and shutil.which("openssl") is not None
        self.host = LOOPBACK
        self.port = free_port()
        self.ssl_port: int | None = free_port() if self.ssl else None
        self.instance = f"mf-{secrets.token_hex(4)}"
        self.last_start_seconds: float | None = None
        self._root: Path | None = None
        self._root_outside = False
        self._atexit_registered = False
        self._reaper = None

    # -- paths ---------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        assert self._root is not None, "start() first"
        return self._root

    @property
    def config_path(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def users_dir(self) -> Path:
        return self.root / "users.d"

    @property
    def log_path(self) -> Path:
        return self.root / "dovecot.log"

    @property
    def cert_path(self) -> Path | None:
        return self.root / "cert.pem" if self.ssl else None

    def home_of(self, user: str) -> Path:
        return self.root / "mail" / user

    # -- configuration -------------------------------------------------------------------

    def _prepare(self) -> None:
        if self._root is not None:
            return
        if find_dovecot() is None:
            raise DovecotError("dovecot is not installed (scripts/install-system.sh)")
        if os.geteuid() != 0:
            raise DovecotError("the test dovecot runs as root")
        # The login (dovenull) and mail (dovecot) processes must reach base_dir and the maildirs.
        self._root, self._root_outside = service_dir(self.workdir, "dovecot")
        dv = pwd.getpwnam("dovecot")
        uid, gid = dv.pw_uid, dv.pw_gid
        # chmod after mkdir: mkdir's mode passes through the umask, and a process that ran
        # Mailferry's bootstrap (umask 077) would leave the folders closed to dovecot's users.
        for sub in ("run", "state"):
            (self.root / sub).mkdir(exist_ok=True)
            (self.root / sub).chmod(0o755)
        mail = self.root / "mail"
        mail.mkdir(exist_ok=True)
        mail.chmod(0o700)
        os.chown(mail, uid, gid)
        if self.ssl and not (self.root / "cert.pem").exists():
            self_signed(self.root / "cert.pem", self.root / "key.pem")
        self._write_users()
        self.config_path.write_text(self._config(uid, gid))

    def _config(self, uid: int, gid: int) -> str:
        r = self.root
        ssl_lines = (
            f"ssl = yes\nssl_cert = <{r}/cert.pem\nssl_key = <{r}/key.pem\n"
            "ssl_min_protocol = TLSv1.2\n"
            if self.ssl
            else "ssl = no\n"
        )
        imaps = (
            f"  inet_listener imaps {{\n    address = {LOOPBACK}\n    port = {self.ssl_port}\n"
            "    ssl = yes\n  }\n"
            if self.ssl
            else "  inet_listener imaps {\n    port = 0\n  }\n"
        )
        oauth2_mechanisms = " xoauth2 oauthbearer" if self.oauth2_introspection_url else ""
        oauth2_passdb = ""
        if self.oauth2_introspection_url:
            (r / "oauth2.conf.ext").write_text(
                f"introspection_mode = post\nintrospection_url = {self.oauth2_introspection_url}\n"
                "force_introspection = yes\nusername_attribute = username\n"
                "active_attribute = active\nactive_value = true\n")
            oauth2_passdb = (f"passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
                             f"  args = {r}/oauth2.conf.ext\n}}\n")
        return f"""# Throwaway test server written by devstack/dovecot.py
instance_name = {self.instance}
base_dir = {r}/run
state_dir = {r}/state
log_path = {r}/dovecot.log
info_log_path = {r}/dovecot.log
protocols = imap
listen = {LOOPBACK}
import_environment = TZ {MARKER}={self.instance}
{ssl_lines}disable_plaintext_auth = no
auth_mechanisms = plain login{oauth2_mechanisms}
auth_failure_delay = 0
default_login_user = dovenull
default_internal_user = dovecot
default_internal_group = dovecot
first_valid_uid = {uid}
first_valid_gid = {gid}
mail_location = maildir:~/Maildir
mail_fsync = never
namespace inbox {{
  inbox = yes
  mailbox Trash {{
    special_use = \\Trash
  }}
  mailbox Junk {{
    special_use = \\Junk
  }}
  mailbox Sent {{
    special_use = \\Sent
  }}
  mailbox Drafts {{
    special_use = \\Drafts
  }}
}}
{oauth2_passdb}passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {r}/users.d/%u
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {r}/users.d/%u
  default_fields = uid={uid} gid={gid} home={r}/mail/%u
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
{self._capacity()}service imap-login {{
{self._login_capacity()}  inet_listener imap {{
    address = {LOOPBACK}
    port = {self.port}
  }}
{imaps}}}
"""

    def _capacity(self) -> str:
        if not self.max_clients:
            return ""
        room = self.max_clients + 100
        # An imap process per client; anvil and auth hear from every one of them.
        return (f"default_process_limit = {room}\ndefault_client_limit = {room}\n"
                f"mail_max_userip_connections = 50\n"
                f"service imap {{\n  process_limit = {room}\n}}\n"
                f"service anvil {{\n  client_limit = {2 * room}\n}}\n"
                f"service auth {{\n  client_limit = {2 * room}\n}}\n")

    def _login_capacity(self) -> str:
        # High-performance mode: a few login processes, each serving many connections.
        return ("  service_count = 0\n  process_min_avail = 2\n"
                f"  client_limit = {self.max_clients + 100}\n" if self.max_clients else "")

    def _write_users(self) -> None:
        if self._root is None:
            return
        gid = pwd.getpwnam("dovecot").pw_gid
        self.users_dir.mkdir(exist_ok=True)
        self.users_dir.chmod(0o750)  # whatever the umask (see _prepare)
        os.chown(self.users_dir, 0, gid)
        for name, password in self.users.items():
            self._write_user_file(name, password, gid)
        for path in self.users_dir.iterdir():
            if path.name not in self.users and not path.name.endswith(".tmp"):
                path.unlink()

    def _write_user_file(self, name: str, password: str, gid: int) -> bool:
        path = self.users_dir / name
        line = f"{name}:{{PLAIN}}{password}::::::\n"
        try:
            if path.read_text() == line:
                return False
        except OSError:
            pass
        tmp = self.users_dir / f".{name}.tmp"
        tmp.write_text(line)
        os.chown(tmp, 0, gid)
        tmp.chmod(0o640)
        os.replace(tmp, path)
        return True

    # -- users ---------------------------------------------------------------------------

    def add_user(self, name: str, password: str) -> None:
        """Add a user (or change a password); the user can log in right away."""
        _check_field("user name", name)
        _check_field("password", password)
        existed = name in self.users
        self.users[name] = password
        if self._root is None:
            return  # written by start()
        changed = self._write_user_file(name, password, pwd.getpwnam("dovecot").pw_gid)
        if existed and changed and self.running:
            # dovecot re-checks a passwd-file at most once a second (see module doc).
            time.sleep(1.1)

    def remove_user(self, name: str, delete_mail: bool = True) -> None:
        """Remove a user (refused within about a second) and, by default, its mail."""
        self.users.pop(name, None)
        if self._root is None:
            return
        try:
            (self.users_dir / name).unlink()
        except FileNotFoundError:
            pass
        if delete_mail:
            shutil.rmtree(self.home_of(name), ignore_errors=True)

    # -- lifecycle -----------------------------------------------------------------------

    def _pids(self) -> list[int]:
        # dovecot writes its process titles over its environment, so the environment marker
        # is not visible in /proc; its titles ("dovecot-<instance>/imap") and the master's
        # command line (our config path) are.
        pids = set(pids_with_cmdline(f"dovecot-{self.instance}/"))
        if self._root is not None:
            pids.update(pids_with_cmdline(str(self.config_path)))
        return sorted(pids)

    def _cmdline_needles(self) -> tuple[str, ...]:
        return (f"dovecot-{self.instance}/", str(self.config_path))

    def master_pid(self) -> int | None:
        if self._root is None:
            return None
        try:
            pid = int((self.root / "run" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    @property
    def running(self) -> bool:
        return self.master_pid() is not None

    def _ready(self) -> bool:
        # Not a test connection: each one makes dovecot spawn an imap-login process, and one
        # still starting when dovecot is stopped holds the stop up for 5 s (its stats-writer
        # handshake times out).
        return listening(self.port) and (self.ssl_port is None or listening(self.ssl_port))

    def start(self) -> "DovecotServer":
        if self.running:
            return self
        t0 = time.monotonic()
        self._prepare()
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        env[MARKER] = self.instance
        stop_reaper(self._reaper)
        self._reaper = start_reaper(MARKER, self.instance, self._cmdline_needles())
        # The daemonized master keeps its stdout/stderr: give it a file, not a pipe.
        startup = self.root / "startup.log"
        with open(startup, "ab") as out:
            proc = subprocess.run(
                [find_dovecot(), "-c", str(self.config_path)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=60,
            )
        if proc.returncode != 0:
            raise DovecotError(
                f"dovecot did not start (exit {proc.returncode}):\n{tail(startup)}\n"
                f"--- {self.log_path} ---\n{tail(self.log_path)}"
            )
        if not self._atexit_registered:
            atexit.register(self._atexit_stop)
            self._atexit_registered = True

        def died() -> str | None:
            if time.monotonic() - t0 > 2 and not self.running:
                return f"dovecot died while starting:\n{tail(self.log_path)}"
            return None

        try:
            ok = wait_until(self._ready, START_TIMEOUT, failed=died)
        except RuntimeError as exc:
            raise DovecotError(str(exc)) from None
        if not ok:
            self.stop()
            raise DovecotError(f"dovecot not listening after {START_TIMEOUT:.0f} s:\n{tail(self.log_path)}")
        self.last_start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        pid = self.master_pid()
        if pid is not None:
            # What `dovecot stop` does, minus its 2 s of polling: SIGTERM to the master,
            # which ends its children (and the clients' imap processes) and exits.
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            # The master waits for its children; a login process that was still starting
            # can keep it 5 s (see _ready). Nothing here needs a graceful end after 2 s.
            if not wait_until(lambda: not pid_alive(pid), 2):
                terminate_pids([pid, *self._pids()], grace=2)
        # imap processes of clients still connected, auth workers, ...
        terminate_pids(self._pids(), grace=2)
        stop_reaper(self._reaper)
        self._reaper = None
        wait_until(lambda: not listening(self.port), 5)

    def restart(self) -> "DovecotServer":
        self.stop()
        return self.start()

    def close(self) -> None:
        """stop() and remove its files when they live outside ``workdir``."""
        self.stop()
        if self._root_outside and self._root is not None:
            remove_service_dir(self.workdir, "dovecot", self._root)
            self._root = None

    def _atexit_stop(self) -> None:
        try:
            self.stop()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            terminate_pids(self._pids(), grace=2)

    def __enter__(self) -> "DovecotServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<DovecotServer {self.host}:{self.port} ssl={self.ssl_port} {self._root}>"


__all__ = ["DovecotServer", "DovecotError", "dovecot_available", "find_dovecot"]
