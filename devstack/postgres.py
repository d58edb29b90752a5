"""A throwaway native PostgreSQL 15 cluster for tests.

initdb refuses to run as root, so as root the cluster belongs to the ``postgres`` user
(``runuser -u postgres``); when the tests run as another user, the binaries run directly.
The server listens on a free 127.0.0.1 port with its unix socket inside its own folder, so
a system PostgreSQL on 5432 is never touched. Durability is traded for speed (fsync off).
"""
from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .ports import (
    LOOPBACK,
    free_port,
    pid_alive,
    pids_with_env,
    port_open,
    start_reaper,
    stop_reaper,
    tail,
    terminate_pids,
    wait_until,
)

MARKER = "MAILFERRY_HARNESS_POSTGRES"
START_TIMEOUT = 60.0
# ASCII, a letter first, at most 63 bytes: safe to quote into CREATE/DROP DATABASE.
_DB_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")


class PostgresError(RuntimeError):
    pass


def find_pg_bindir() -> Path | None:
    """Folder holding initdb/pg_ctl: Debian's /usr/lib/postgresql/<newest>/bin, else PATH."""
    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if (Path(cand) / "initdb").exists() and (Path(cand) / "pg_ctl").exists():
            return Path(cand)
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    return None


def _version_key(path: str) -> tuple:
    m = re.search(r"/postgresql/(\d+)(?:\.(\d+))?/", path + "/")
    return (int(m.group(1)), int(m.group(2) or 0)) if m else (0, 0)


def postgres_available() -> bool:
    if find_pg_bindir() is None:
        return False
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return False
        return shutil.which("runuser") is not None
    return True


def reachable_by_others(path: Path) -> bool:
    """True when every folder from / down to ``path`` can be traversed by any user."""
    path = Path(path).resolve()
    for part in [path, *path.parents]:
        try:
            if not part.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def service_dir(workdir: Path, name: str, max_len: int = 60) -> tuple[Path, bool]:
    """A folder for a server that drops privileges: ``workdir/name`` when other users can reach
    it (and its path is short enough for unix sockets), otherwise a fresh ``/tmp/mf-name-*``
    (pytest's tmp folders are 0700 root: the postgres and dovecot users cannot enter them).
    A link ``workdir/name`` then points at it. Returns (folder, created_outside_workdir).
    """
    workdir = Path(workdir).resolve()
    inside = workdir / name
    if reachable_by_others(workdir) and len(str(inside)) <= max_len:
        inside.mkdir(parents=True, exist_ok=True)
        inside.chmod(0o755)
        return inside, False
    outside = Path(tempfile.mkdtemp(prefix=f"mf-{name}-", dir="/tmp"))
    outside.chmod(0o755)
    link = workdir / name
    if link.is_symlink() or link.exists():
        if link.is_symlink() or link.is_file():
            link.unlink()
        else:
            shutil.rmtree(link)
    link.symlink_to(outside)
    return outside, True


def remove_service_dir(workdir: Path, name: str, folder: Path) -> None:
    """Undo ``service_dir`` for a folder it made outside ``workdir``: the folder and its link."""
    shutil.rmtree(folder, ignore_errors=True)
    link = Path(workdir) / name
    if link.is_symlink():
        link.unlink()


class PostgresAdmin:
    """Throwaway databases on a server that offers ``url`` (an admin connection) and
    ``url_for(dbname)``: the native server, the container and an external server alike."""

    url: str

    def url_for(self, dbname: str) -> str:
        raise NotImplementedError

    def _admin(self, sql: str) -> None:
        import psycopg2

        conn = psycopg2.connect(self.url, connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def create_database(self, name: str | None = None) -> str:
        name = _safe_db_name(name or f"t_{secrets.token_hex(6)}")
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{_safe_db_name(name)}" WITH (FORCE)')


def _safe_db_name(name: str) -> str:
    if not _DB_NAME.match(name):
        raise ValueError(f"unsafe database name {name!r}")
    return name


class PostgresServer(PostgresAdmin):
    """``start()`` / ``stop()`` / ``url`` / ``create_database(name) -> url`` / ``drop_database``."""

    def __init__(self, workdir: Path, user: str = "postgres"):
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.user = user  # the database superuser (initdb -U)
        self.last_start_seconds: float | None = None
        self._root: Path | None = None
        self._root_outside = False
        self._bindir: Path | None = None
        self._atexit_registered = False
        self._reaper = None
        self.instance = f"mf-pg-{secrets.token_hex(4)}"

    # -- paths and urls ------------------------------------------------------------------

    @property
    def datadir(self) -> Path:
        assert self._root is not None
        return self._root / "data"

    @property
    def socket_dir(self) -> Path:
        assert self._root is not None
        return self._root / "sock"

    @property
    def log_path(self) -> Path:
        assert self._root is not None
        return self._root / "postgres.log"

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, dbname: str) -> str:
        return f"postgresql://{self.user}@{LOOPBACK}:{self.port}/{dbname}"

    # -- running binaries as the right user ----------------------------------------------

    @property
    def _as_root(self) -> bool:
        return os.geteuid() == 0

    def _cmd(self, *args: str) -> list[str]:
        if self._as_root:
            return ["runuser", "-u", "postgres", "--", *args]
        return list(args)

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C.UTF-8"
        env[MARKER] = self.instance  # inherited by the postmaster and its backends
        proc = subprocess.run(
            self._cmd(*args),
            env=env,
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise PostgresError(
                f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}\n"
                f"--- {self.log_path} ---\n{tail(self.log_path, 30) if self._root else ''}"
            )
        return proc

    def _prepare(self) -> None:
        if self._root is not None:
            return
        self._bindir = find_pg_bindir()
        if self._bindir is None:
            raise PostgresError("PostgreSQL is not installed (scripts/install-system.sh)")
        if self._as_root:
            self._root, self._root_outside = service_dir(self.workdir, "postgres")
            owner = pwd.getpwnam("postgres")
            os.chown(self._root, owner.pw_uid, owner.pw_gid)
        else:
            self._root = self.workdir / "postgres"
            self._root.mkdir(exist_ok=True)
        for sub in (self.datadir, self.socket_dir):
            sub.mkdir(mode=0o700, exist_ok=True)
            if self._as_root:
                os.chown(sub, owner.pw_uid, owner.pw_gid)

    def _initdb(self) -> None:
        if (self.datadir / "PG_VERSION").exists():
            return
        self._run(
            str(self._bindir / "initdb"),
            "-D", str(self.datadir),
            "-A", "trust",
            "-U", self.user,
            "-E", "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
            "--no-instructions",
        )
        settings = {
            "listen_addresses": f"'{LOOPBACK}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "64MB",
            "log_min_messages": "warning",
            "log_min_error_statement": "panic",
            "logging_collector": "off",
            "timezone": "'UTC'",
        }
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write("\n# devstack\n")
            for key, value in settings.items():
                conf.write(f"{key} = {value}\n")

    # -- lifecycle -----------------------------------------------------------------------

    def postmaster_pid(self) -> int | None:
        if self._root is None:
            return None
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    @property
    def running(self) -> bool:
        return self.postmaster_pid() is not None

    def start(self) -> "PostgresServer":
        if self.running:
            return self
        t0 = time.monotonic()
        self._prepare()
        self._initdb()
        stop_reaper(self._reaper)
        self._reaper = start_reaper(MARKER, self.instance)
        self._run(
            str(self._bindir / "pg_ctl"),
            "-D", str(self.datadir),
            "-l", str(self.log_path),
            "-w", "-t", str(int(START_TIMEOUT)),
            "start",
            timeout=START_TIMEOUT + 10,
        )
        if not self._atexit_registered:
            atexit.register(self._atexit_stop)
            self._atexit_registered = True
        if not wait_until(lambda: port_open(self.port), 10):
            raise PostgresError(f"postgres does not listen on {self.port}:\n{tail(self.log_path)}")
        self.last_start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        pid = self.postmaster_pid()
        if pid is not None:
            try:
                self._run(
                    str(self._bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop"
                )
            except (PostgresError, subprocess.TimeoutExpired):
                pass
            if pid_alive(pid):
                terminate_pids([pid], grace=10)
        terminate_pids(pids_with_env(MARKER, self.instance), grace=5)
        stop_reaper(self._reaper)
        self._reaper = None

    def close(self) -> None:
        """stop() and remove the cluster's files when they live outside ``workdir``."""
        self.stop()
        if self._root_outside and self._root is not None:
            remove_service_dir(self.workdir, "postgres", self._root)
            self._root = None

    def _atexit_stop(self) -> None:
        try:
            self.stop()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PostgresServer 127.0.0.1:{self.port} {self._root}>"
