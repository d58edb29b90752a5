"""A throwaway native RabbitMQ node for tests.

Everything the node writes (data, logs, config, Erlang cookie) lives in ``workdir``; every port
it opens (AMQP, management HTTP, Erlang distribution, its own epmd) is a free port bound to
127.0.0.1, so it never meets a system RabbitMQ or another test session.

Speed (measured on a 2-core gVisor machine with the Debian 3.10.8 package):

* Start: ~4.5 s instead of ~9 s. At boot RabbitMQ loads every module of every application in
  its plugins folder to scan module attributes (feature flags, boot steps, upgrades); the Debian
  package ships 70 applications. The node runs from a small "home" in ``workdir`` whose
  ``plugins`` folder links only the applications that ``rabbit`` and the enabled plugins depend
  on (computed from their ``.app`` files), and ``sbin``/``escript`` link to the real ones
  (``RABBITMQ_SCRIPTS_DIR`` points the scripts at that home). If that cannot be built the stock
  installation is used.
* Readiness is checked by polling the AMQP port and the management API, not by
  ``rabbitmqctl status`` in a loop: each CLI call boots an Erlang VM (~0.6 s of CPU) that would
  compete with the booting node for the two cores.
* Stop/stop_app: RabbitMQ 3.10's management agent waits 5 s during ``stop_app`` (the event
  handler's terminate forces an event refresh while the broker is going down; fixed upstream in
  3.13, rabbitmq-server PR #11070). The harness removes that handler first, then stops, in one
  ``rabbitmqctl eval``: stop_app takes ~1 s instead of ~5.8 s, stop ~2 s instead of ~9 s. The
  handler is added back by ``start_app``.

Every process of the node (beam, its private epmd, helpers) carries ``MAILFERRY_HARNESS_RABBITMQ=
<node>`` in its environment: ``stop()`` ends exactly those, and a watchdog (ports.start_reaper)
ends them if the test process dies without stopping the node.
"""
from __future__ import annotations

import atexit
import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from .ports import (
    LOOPBACK,
    free_port,
    listening,
    pid_alive,
    pids_with_env,
    start_reaper,
    stop_reaper,
    tail,
    terminate_pids,
    wait_until,
)

MARKER = "MAILFERRY_HARNESS_RABBITMQ"
START_TIMEOUT = 60.0
DEFAULT_PLUGINS = ("rabbitmq_management",)

_DEBIAN_SCRIPT = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")

# Removes the management agent's rabbit_event handler before the broker stops (see module doc).
_DROP_MGMT_HANDLER = "gen_event:delete_handler(rabbit_event, rabbit_mgmt_db_handler, [])"


class RabbitMQError(RuntimeError):
    pass


def find_rabbitmq_sbin() -> Path | None:
    """The real ``sbin`` folder of the RabbitMQ installation (holding rabbitmq-env), or None.

    On Debian /usr/sbin/rabbitmq-server is a wrapper that switches to the ``rabbitmq`` user
    (and its HOME and /var/lib/rabbitmq) when run as root; the harness runs the real scripts
    directly instead, as whoever runs the tests.
    """
    candidates = [_DEBIAN_SCRIPT]
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(Path(found))
    for cand in candidates:
        try:
            real = cand.resolve(strict=True)
        except OSError:
            continue
        if (real.parent / "rabbitmq-env").is_file() and (real.parent / "rabbitmqctl").exists():
            return real.parent
    return None


def rabbitmq_available() -> bool:
    return find_rabbitmq_sbin() is not None and shutil.which("erl") is not None


def _app_dirs(plugins_dir: Path) -> dict[str, Path]:
    apps = {}
    for entry in plugins_dir.iterdir():
        m = re.fullmatch(r"(.+?)-(\d[\w.\-+]*)", entry.name)
        if m and entry.is_dir():
            apps[m.group(1)] = entry
    return apps


def _app_deps(app_dir: Path, name: str) -> set[str]:
    text = (app_dir / "ebin" / f"{name}.app").read_text()
    deps: set[str] = set()
    for key in ("applications", "included_applications", "optional_applications"):
        m = re.search(r"\{\s*" + key + r"\s*,\s*\[(.*?)\]", text, re.S)
        if m:
            deps |= set(re.findall(r"[a-z][a-zA-Z0-9_]*", m.group(1)))
    return deps


def _build_trimmed_home(sbin: Path, home: Path, plugins: tuple[str, ...]) -> Path | None:
    """Make ``home`` a RABBITMQ_HOME holding only the applications needed; return its sbin."""
    real_home = sbin.parent
    plugins_dir = real_home / "plugins"
    try:
        apps = _app_dirs(plugins_dir)
        needed: set[str] = set()
        todo = ["rabbit", *plugins]
        while todo:
            name = todo.pop()
            if name in needed:
                continue
            if name not in apps:
                if name == "rabbit" or name in plugins:
                    return None  # not a plain folder (an .ez archive?): use the stock home
                continue  # an OTP application, found in the Erlang root
            needed.add(name)
            todo.extend(_app_deps(apps[name], name))
        if home.exists():
            shutil.rmtree(home)
        (home / "sbin").mkdir(parents=True)
        (home / "plugins").mkdir()
        for script in sbin.iterdir():
            (home / "sbin" / script.name).symlink_to(script)
        for extra in ("escript",):
            if (real_home / extra).exists():
                (home / extra).symlink_to(real_home / extra)
        for name in sorted(needed):
            (home / "plugins" / apps[name].name).symlink_to(apps[name])
        return home / "sbin"
    except OSError:
        return None


class RabbitMQServer:
    """A throwaway RabbitMQ node with the management plugin, on free loopback ports.

    ``start()`` / ``stop()`` / ``restart()`` (same data folder and ports: durable queues and
    persistent messages survive) / ``stop_app()`` / ``start_app()`` (fast "broker went away":
    the Erlang node stays up, the broker and its listeners go down).
    """

    can_restart = True

    def __init__(self, workdir: Path, plugins: tuple[str, ...] = DEFAULT_PLUGINS):
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.plugins = tuple(plugins)
        self.node = f"mf-{secrets.token_hex(4)}@localhost"
        self.amqp_port = free_port()
        self.management_port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.username = "guest"
        self.password = "guest"
        self.last_start_seconds: float | None = None
        self.last_stop_seconds: float | None = None
        self._sbin: Path | None = None
        self._configured = False
        self._atexit_registered = False
        self._reaper = None

    # -- public attributes -------------------------------------------------------------

    @property
    def amqp_url(self) -> str:
        return f"amqp://{self.username}:{self.password}@{LOOPBACK}:{self.amqp_port}/%2F"

    @property
    def management_url(self) -> str:
        return f"http://{LOOPBACK}:{self.management_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "log" / f"{self.node}.log"

    def amqp_url_for(self, vhost: str) -> str:
        from urllib.parse import quote

        return (
            f"amqp://{self.username}:{self.password}@{LOOPBACK}:{self.amqp_port}/"
            f"{quote(vhost, safe='')}"
        )

    # -- configuration -----------------------------------------------------------------

    def _configure(self) -> None:
        if self._configured:
            return
        sbin = find_rabbitmq_sbin()
        if sbin is None:
            raise RabbitMQError("rabbitmq-server is not installed (scripts/install-system.sh)")
        trimmed = _build_trimmed_home(sbin, self.workdir / "home", self.plugins)
        self._sbin = trimmed or sbin
        self._scripts_dir_override = trimmed is not None
        w = self.workdir
        (w / "mnesia").mkdir(exist_ok=True)
        (w / "log").mkdir(exist_ok=True)
        (w / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    f"listeners.tcp.default = {LOOPBACK}:{self.amqp_port}",
                    f"management.tcp.port = {self.management_port}",
                    f"management.tcp.ip = {LOOPBACK}",
                    # Fresh queue/message counts in the management API for tests (default 5 s).
                    "collect_statistics_interval = 500",
                    # A nearly full /tmp must not block publishers with a disk alarm.
                    "disk_free_limit.absolute = 1MB",
                    # Classic queues v2, as in RabbitMQ 4 (docker-compose.yml), where v1 is gone;
                    # Debian's 3.10-3.13 still create v1 unless told. v2 costs RabbitMQ about a
                    # third less CPU per persistent message (docs/BENCHMARKS.md, SMTP ingest).
                    "classic_queue.default_version = 2",
                    "log.console = false",
                    "log.file.level = info",
                    "",
                ]
            )
        )
        (w / "enabled_plugins").write_text("[%s].\n" % ",".join(self.plugins))
        (w / "rabbitmq-env.conf").write_text("# intentionally empty: see devstack/\n")
        (w / "advanced.config").write_text("[].\n")
        cookie = w / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16).upper())
            cookie.chmod(0o400)
        self._configured = True

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k != "NOTIFY_SOCKET"
        }
        w = self.workdir
        loopback_dist = "-kernel inet_dist_use_interface {127,0,0,1}"
        env.update(
            {
                "HOME": str(w),
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_MNESIA_BASE": str(w / "mnesia"),
                "RABBITMQ_LOG_BASE": str(w / "log"),
                "RABBITMQ_CONFIG_FILE": str(w / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(w / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"),
                "RABBITMQ_CONF_ENV_FILE": str(w / "rabbitmq-env.conf"),
                "RABBITMQ_PID_FILE": str(w / "rabbitmq.pid"),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": loopback_dist,
                "RABBITMQ_CTL_ERL_ARGS": loopback_dist,
                # A private epmd on loopback: it can be stopped with the node, and the
                # machine's epmd on 4369 (a system RabbitMQ's) is never touched.
                "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_EPMD_ADDRESS": LOOPBACK,
                MARKER: self.node,
            }
        )
        if self._scripts_dir_override:
            env["RABBITMQ_SCRIPTS_DIR"] = str(self._sbin)
        return env

    def _run(self, script: str, *args: str, timeout: float = 60.0, check: bool = True):
        assert self._sbin is not None
        proc = subprocess.run(
            [str(self._sbin / script), *args],
            env=self._env(),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise RabbitMQError(
                f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def rabbitmqctl(self, *args: str, timeout: float = 60.0, check: bool = True):
        """Run rabbitmqctl against this node; returns the CompletedProcess."""
        return self._run("rabbitmqctl", "-n", self.node, *args, timeout=timeout, check=check)

    # -- state -------------------------------------------------------------------------

    def _pids(self) -> list[int]:
        return pids_with_env(MARKER, self.node)

    def beam_pid(self) -> int | None:
        pidfile = self.workdir / "rabbitmq.pid"
        try:
            pid = int(pidfile.read_text().strip())
            if pid_alive(pid):
                return pid
        except (OSError, ValueError):
            pass
        for pid in self._pids():
            try:
                if b"beam" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]:
                    return pid
            except OSError:
                continue
        return None

    @property
    def running(self) -> bool:
        return self.beam_pid() is not None

    def management_ready(self) -> bool:
        try:
            self.management_api("GET", "/api/overview", timeout=2)
            return True
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def broker_ready(self) -> bool:
        # The AMQP listener is checked in /proc/net/tcp: a probe connection would put a
        # "client unexpectedly closed TCP connection" warning in the broker's log each time.
        return listening(self.amqp_port) and self.management_ready()

    def management_api(self, method: str, path: str, body=None, timeout: float = 10):
        """Call the management HTTP API as guest; returns the decoded JSON (or None)."""
        return management_request(
            self.management_url, method, path, body, self.username, self.password, timeout
        )

    def _failure(self, what: str) -> RabbitMQError:
        startup = self.workdir / "startup.log"
        return RabbitMQError(
            f"RabbitMQ node {self.node} {what}.\n"
            f"--- {startup} ---\n{tail(startup, 20)}\n"
            f"--- {self.log_path} ---\n{tail(self.log_path, 40)}"
        )

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> "RabbitMQServer":
        if self.running:
            return self
        self._configure()
        t0 = time.monotonic()
        stop_reaper(self._reaper)
        self._reaper = start_reaper(MARKER, self.node)
        with open(self.workdir / "startup.log", "ab") as out:
            proc = subprocess.run(
                [str(self._sbin / "rabbitmq-server"), "-detached"],
                env=self._env(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=60,
            )
        if proc.returncode != 0:
            raise self._failure(f"did not start (rabbitmq-server -detached exited {proc.returncode})")
        if not self._atexit_registered:
            atexit.register(self._atexit_stop)
            self._atexit_registered = True

        def died() -> str | None:
            if time.monotonic() - t0 > 3 and self.beam_pid() is None:
                return str(self._failure("died while starting"))
            return None

        try:
            ok = wait_until(self.broker_ready, START_TIMEOUT, interval=0.1, failed=died)
        except RuntimeError as exc:
            self._kill_leftovers()
            raise RabbitMQError(str(exc)) from None
        if not ok:
            err = self._failure(f"was not ready after {START_TIMEOUT:.0f} s")
            self._kill_leftovers()
            raise err
        self.last_start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Stop the node gracefully, then end any process of this node that is left."""
        t0 = time.monotonic()
        pid = self.beam_pid()
        if pid is not None:
            try:
                proc = self.rabbitmqctl(
                    "eval",
                    f"{_DROP_MGMT_HANDLER}, spawn(fun() -> rabbit:stop_and_halt() end), ok.",
                    timeout=30,
                    check=False,
                )
                if proc.returncode != 0:
                    self.rabbitmqctl("stop", timeout=60, check=False)
            except subprocess.TimeoutExpired:
                pass  # a node that does not answer its CLI gets SIGTERM/SIGKILL below
            if not wait_until(lambda: not pid_alive(pid), 60, interval=0.05):
                terminate_pids([pid], grace=10)
        self._kill_leftovers()
        stop_reaper(self._reaper)
        self._reaper = None
        self.last_stop_seconds = time.monotonic() - t0

    def kill(self) -> None:
        """End every process of this node now (no graceful stop): a forced shutdown."""
        terminate_pids(self._pids(), grace=0)

    def _kill_leftovers(self) -> None:
        # epmd (private to this node), erl_child_setup, inet_gethost, a hung rabbitmqctl...
        terminate_pids(self._pids(), grace=5)

    def restart(self) -> "RabbitMQServer":
        self.stop()
        return self.start()

    def stop_app(self) -> None:
        """Stop the broker inside the running Erlang node (AMQP and HTTP listeners close)."""
        self.rabbitmqctl("eval", f"{_DROP_MGMT_HANDLER}, rabbit:stop().", timeout=60)
        wait_until(lambda: not listening(self.amqp_port), 10)

    def start_app(self) -> None:
        self.rabbitmqctl("start_app", timeout=120)
        if not wait_until(self.broker_ready, START_TIMEOUT, interval=0.1):
            raise self._failure("did not answer after start_app")

    def _atexit_stop(self) -> None:
        try:
            if self._pids():
                self.stop()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            terminate_pids(self._pids(), grace=2)

    def __enter__(self) -> "RabbitMQServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RabbitMQServer {self.node} amqp={self.amqp_port} http={self.management_port}>"


def management_request(
    base_url: str,
    method: str,
    path: str,
    body=None,
    username: str = "guest",
    password: str = "guest",
    timeout: float = 10,
):
    """One request to a RabbitMQ management API (urllib, basic auth); JSON in and out."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base_url.rstrip("/") + path, data=data, method=method)
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


class RabbitMQCluster:
    """Three (``size``) native RabbitMQ nodes on loopback joined into one cluster, for the
    tests of quorum queues and failover: each node its own ports and data, one shared Erlang
    cookie, and one epmd of the cluster's own (a node's private epmd would go down with that
    node and leave the others unable to find each other again)."""

    def __init__(self, workdir: Path, size: int = 3):
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = f"cluster-{secrets.token_hex(4)}"
        self.epmd_port = free_port()
        cookie = secrets.token_hex(16).upper()
        self.nodes = [RabbitMQServer(self.workdir / f"node{i}") for i in range(size)]
        for node in self.nodes:
            node.epmd_port = self.epmd_port
            (node.workdir / ".erlang.cookie").write_text(cookie)
            (node.workdir / ".erlang.cookie").chmod(0o400)
        self._epmd: subprocess.Popen | None = None
        self._reaper = None

    @property
    def amqp_url(self) -> str:
        """Every node's URL, comma-separated: what MAILFERRY_AMQP_URL takes for a cluster."""
        return ",".join(node.amqp_url for node in self.nodes)

    def start(self) -> "RabbitMQCluster":
        epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        self._reaper = start_reaper(MARKER, self.name)
        self._epmd = subprocess.Popen(
            [epmd, "-port", str(self.epmd_port), "-address", LOOPBACK],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), MARKER: self.name},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        if not wait_until(lambda: listening(self.epmd_port), 10):
            raise RabbitMQError(f"epmd did not listen on {self.epmd_port}")
        first, *others = self.nodes
        first.start()
        for node in others:
            node.start()
            node.stop_app()
            node.rabbitmqctl("join_cluster", first.node, timeout=120)
            node.start_app()
        return self

    def running_nodes(self, via: "RabbitMQServer") -> list[str]:
        return [n["name"] for n in via.management_api("GET", "/api/nodes") if n.get("running")]

    def stop(self) -> None:
        for node in reversed(self.nodes):
            try:
                node.stop()
            except Exception:  # noqa: BLE001 - stop the rest whatever one did
                node.kill()
        if self._epmd is not None and self._epmd.poll() is None:
            terminate_pids([self._epmd.pid], grace=5)
        terminate_pids(pids_with_env(MARKER, self.name), grace=2)
        stop_reaper(self._reaper)
        self._epmd = self._reaper = None

    def __enter__(self) -> "RabbitMQCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
