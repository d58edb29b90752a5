"""Haraka with the mailferry queue plugin, rendered into a temp folder and run as a subprocess.

``haraka_plugin/haraka/`` is the checked-in configuration folder; ``render_config`` copies it
into a work folder with the settings that differ per run (listen port, AMQP URL, spool root,
queue plugin) and links the plugin in as ``node_modules/haraka-plugin-mailferry``, where
Haraka looks for npm-style plugins. ``HarakaServer`` starts ``node_modules/.bin/haraka -c
<folder>`` on a free loopback port and waits for the 220 banner.

Also a command line for ``make run`` and manual checks::

    python -m tests.harness.haraka render DEST --amqp-url URL --spool-dir DIR [--port N]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .ports import LOOPBACK, free_port, tail, wait_until

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "haraka_plugin"
TEMPLATE_DIR = PLUGIN_DIR / "haraka"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# The name Haraka resolves `mailferry` in config/plugins to (<config>/node_modules/haraka-plugin-*).
PLUGIN_LINK = Path("node_modules") / "haraka-plugin-mailferry"


class HarakaError(RuntimeError):
    pass


def haraka_bin() -> Path:
    """The Haraka launcher installed by ``npm ci`` in haraka_plugin/."""
    return PLUGIN_DIR / "node_modules" / ".bin" / "haraka"


def haraka_available() -> bool:
    """True when Haraka is installed (haraka_plugin/node_modules) and node is on PATH."""
    return haraka_bin().exists() and shutil.which("node") is not None


def _set_ini_key(text: str, key: str, value: str) -> str:
    """Set ``key=value`` in an ini file without sections (Haraka's smtp.ini is all [main])."""
    line = f"{key}={value}"
    pattern = re.compile(rf"^{re.escape(key)}\s*=.*$", re.MULTILINE)
    if pattern.search(text):
        return pattern.sub(line, text, count=1)
    return f"{line}\n{text}"


def _ini(sections: dict[str, dict[str, object]]) -> str:
    out = ["; Rendered by devstack/haraka.py: overrides over haraka_plugin/config/mailferry.ini"]
    for name, values in sections.items():
        out.append(f"\n[{name}]")
        out.extend(f"{k}={v}" for k, v in values.items())
    return "\n".join(out) + "\n"


def render_config(
    dest: Path,
    *,
    amqp_url: str,
    spool_dir: Path,
    port: int,
    queue_plugin: str = "mailferry",
    nodes: int = 0,
    mailferry_ini: dict[str, dict[str, object]] | None = None,
) -> Path:
    """Render the Haraka config folder into ``dest`` (created or replaced) and return it.

    ``mailferry_ini`` adds or overrides plugin settings, e.g. ``{"amqp": {"publish_timeout": 2}}``.
    ``queue_plugin`` replaces ``mailferry`` in config/plugins (``queue/discard`` gives the same
    Haraka without Mailferry: the benchmark ceiling).
    """
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(TEMPLATE_DIR / "config", dest / "config")
    cfg = dest / "config"

    smtp = (cfg / "smtp.ini").read_text()
    smtp = _set_ini_key(smtp, "listen", f"{LOOPBACK}:{port}")
    smtp = _set_ini_key(smtp, "nodes", str(nodes))
    (cfg / "smtp.ini").write_text(smtp)

    plugins = (cfg / "plugins").read_text().splitlines()
    plugins = [queue_plugin if line.strip() == "mailferry" else line for line in plugins]
    (cfg / "plugins").write_text("\n".join(plugins) + "\n")

    sections: dict[str, dict[str, object]] = {
        "main": {"spool_dir": Path(spool_dir).resolve()},
        "amqp": {"url": amqp_url},
    }
    for name, values in (mailferry_ini or {}).items():
        sections.setdefault(name, {}).update(values)
    (cfg / "mailferry.ini").write_text(_ini(sections))

    link = dest / PLUGIN_LINK
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(PLUGIN_DIR, target_is_directory=True)
    return dest


def _banner(host: str, port: int, timeout: float = 2.0) -> bytes | None:
    """The first reply line of the SMTP server, or None if nothing answers yet."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(512)
                if not chunk:
                    break
                data += chunk
            try:
                sock.sendall(b"QUIT\r\n")
            except OSError:
                pass
            return data.split(b"\n", 1)[0] or None
    except OSError:
        return None


class HarakaServer:
    """One Haraka process (plus its cluster workers, if ``nodes`` > 0) on a loopback port.

    ``workdir`` holds the rendered config (``workdir/haraka``), Haraka's own outbound queue
    folder and the log (``log_path``). Use as a context manager or call start()/stop().
    """

    def __init__(
        self,
        workdir: Path,
        amqp_url: str,
        spool_dir: Path,
        queue_plugin: str = "mailferry",
        port: int | None = None,
        *,
        nodes: int = 0,
        mailferry_ini: dict[str, dict[str, object]] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.amqp_url = amqp_url
        self.spool_dir = Path(spool_dir)
        self.queue_plugin = queue_plugin
        self.host = LOOPBACK
        self.port = port or free_port()
        self.nodes = nodes
        self.mailferry_ini = mailferry_ini
        self.config_dir = self.workdir / "haraka"
        self.log_path = self.workdir / "haraka.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "HarakaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def command(self) -> list[str]:
        return [str(haraka_bin()), "-c", str(self.config_dir)]

    def render(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return render_config(
            self.config_dir,
            amqp_url=self.amqp_url,
            spool_dir=self.spool_dir,
            port=self.port,
            queue_plugin=self.queue_plugin,
            nodes=self.nodes,
            mailferry_ini=self.mailferry_ini,
        )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> "HarakaServer":
        if self.running():
            return self
        if not haraka_available():
            raise HarakaError(f"Haraka is not installed: run `npm ci` in {PLUGIN_DIR}")
        self.render()
        env = dict(os.environ)
        if self.queue_plugin == "queue/discard":
            # queue/discard only discards when told to; otherwise it passes and mail gets 451.
            env["YES_REALLY_DO_DISCARD"] = "1"
        with open(self.log_path, "ab") as log:
            # Own session: stop() can end the master and any cluster workers as one group.
            self.process = subprocess.Popen(
                self.command,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise HarakaError(
                    f"Haraka exited with {code} during start; {self.log_path}:\n{tail(self.log_path)}")
            banner = _banner(self.host, self.port)
            if banner and banner.startswith(b"220"):
                return self
            time.sleep(0.1)
        self.stop()
        raise HarakaError(
            f"Haraka gave no 220 banner on {self.host}:{self.port} within {START_TIMEOUT:.0f} s; "
            f"{self.log_path}:\n{tail(self.log_path)}")

    def wait_connected(self, timeout: float = 15.0) -> None:
        """Wait until every Haraka process logged its RabbitMQ connection (mailferry plugin only)."""
        processes = max(self.nodes, 1)

        def connected() -> bool:
            try:
                text = self.log_path.read_text(errors="replace")
            except OSError:
                return False
            return text.count("[mailferry] connected to RabbitMQ") >= processes

        if not wait_until(connected, timeout, interval=0.1):
            raise HarakaError(
                f"the mailferry plugin did not connect to {self.amqp_url} within {timeout:.0f} s; "
                f"{self.log_path}:\n{tail(self.log_path)}")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the group id is the master's pid
        if proc.poll() is None:
            # Haraka shuts down on SIGINT (SIGTERM only when it runs as pid 1).
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        # Cluster workers, or a master that would not stop: end what is left of the group.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        # Killed workers linger until reaped; wait so the port and spool are free on return.
        wait_until(lambda: not _group_alive(pgid), STOP_TIMEOUT)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.haraka", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="render the Haraka config folder with overrides")
    r.add_argument("dest", type=Path)
    r.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    r.add_argument("--spool-dir", type=Path, default=Path("var/spool"))
    r.add_argument("--port", type=int, default=2525)
    r.add_argument("--queue-plugin", default="mailferry")
    r.add_argument("--nodes", type=int, default=0)
    args = parser.parse_args(argv)
    dest = render_config(args.dest, amqp_url=args.amqp_url, spool_dir=args.spool_dir, port=args.port,
                         queue_plugin=args.queue_plugin, nodes=args.nodes)
    print(f"{haraka_bin()} -c {dest.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
