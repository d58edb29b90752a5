"""Loopback ports and small process helpers shared by the native test servers.

Every server the harness starts listens on 127.0.0.1 only, on a port picked here, so tests
never collide with a system daemon (a system rabbitmq/postgres/dovecot/postfix may be running
on the standard ports) or with a second test session on the same machine.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from mailferry.pids import pid_alive  # noqa: F401  (the launchers import it from here)


LOOPBACK = "127.0.0.1"

# Ports handed out by this process. A port is returned by the kernel as free, closed again and
# then bound by the server a moment later; remembering them keeps two servers started by the
# same session from being handed the same port before either has bound it.
_handed_out: set[int] = set()


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that nothing listens on right now."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("could not find a free TCP port on %s" % host)


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def listening(port: int, host: str = LOOPBACK) -> bool:
    """True when a socket is in LISTEN state on host:port, checked in /proc/net/tcp without
    connecting (a connection would make some servers, dovecot, spawn a process for it).
    Falls back to connecting where /proc/net/tcp cannot be read."""
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return port_open(port, host)
    want_ip = "".join(f"{int(o):02X}" for o in reversed(host.split(".")))
    want = f"{want_ip}:{port:04X}"
    any_ip = f"00000000:{port:04X}"
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A" and fields[1] in (want, any_ip):
            return True
    return False


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    interval: float = 0.05,
    failed: Callable[[], str | None] | None = None,
) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass.

    ``failed`` is polled too; when it returns a message the wait ends early with a
    RuntimeError carrying it (used for "the server process died").
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if failed is not None:
            reason = failed()
            if reason:
                raise RuntimeError(reason)
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def pids_with_env(marker: str, value: str) -> list[int]:
    """Pids of processes (readable by us) whose environment holds ``marker=value``.

    The harness puts a unique marker into the environment of every server it starts; all
    of that server's children (Erlang's epmd, helper ports, dovecot's workers…) inherit it,
    so this finds exactly the processes of one server and nothing else.
    """
    needle = f"{marker}={value}".encode()
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == me:
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and pid_alive(pid):
            found.append(pid)
    return found


def terminate_pids(pids: Iterable[int], grace: float = 5.0) -> None:
    """SIGTERM the given pids, then SIGKILL whatever is still alive after ``grace`` s."""
    pids = [p for p in pids if pid_alive(p)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    wait_until(lambda: not any(pid_alive(p) for p in pids), grace)
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    wait_until(lambda: not any(pid_alive(p) for p in pids), 2.0)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


# Run as `python -c` with a bare environment, outlives the tests and imports nothing of the
# project: hence its own copy of pid_alive and of pids_with_env's scan.
_REAPER = r"""
import os, signal, sys, time
parent = int(sys.argv[1])
needles = [(n[:4], n[4:].encode()) for n in os.environ["MAILFERRY_REAPER_NEEDLES"].split("\n")]
def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True
def marked():
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        for kind, needle in needles:
            try:
                with open(f"/proc/{name}/" + ("environ" if kind == "env:" else "cmdline"), "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if (needle in data.split(b"\0")) if kind == "env:" else (needle in data):
                out.append(int(name))
                break
    return [p for p in out if alive(p)]
signal.signal(signal.SIGINT, signal.SIG_IGN)
while alive(parent) and os.getppid() == parent:
    time.sleep(0.5)
for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
    pids = marked()
    if not pids:
        break
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
"""


def pids_with_cmdline(substring: str) -> list[int]:
    """Pids of processes whose command line (or process title) contains ``substring``."""
    needle = substring.encode()
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if needle in (entry / "cmdline").read_bytes() and pid_alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def start_reaper(marker: str, value: str, cmdline: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start a watchdog that ends a server's processes if this (test) process dies without
    stopping them (SIGKILL, a `timeout` that SIGTERMs pytest…): every process with
    ``marker=value`` in its environment, or one of ``cmdline`` in its command line (for
    servers that overwrite their environment with a process title, like dovecot).
    Stop it with ``stop_reaper`` once the server has been stopped properly."""
    env = {k: v for k, v in os.environ.items() if k != marker}
    # Passed in the environment, not argv: the reaper must not match its own command line.
    env["MAILFERRY_REAPER_NEEDLES"] = "\n".join(
        [f"env:{marker}={value}", *(f"cmd:{c}" for c in cmdline)]
    )
    return subprocess.Popen(
        [sys.executable, "-c", _REAPER, str(os.getpid())],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C for pytest is not for the reaper
        close_fds=True,
    )


def stop_reaper(reaper: subprocess.Popen | None) -> None:
    if reaper is None or reaper.poll() is not None:
        return
    reaper.kill()
    try:
        reaper.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
