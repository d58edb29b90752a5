"""Helpers of the operations tests: Debian's Prometheus as a throwaway server, a RabbitMQ node
with rabbitmq_prometheus, the `mailferry` CLI in a subprocess, HTTP GETs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from mailferry.config import Settings
from tests.harness.fixtures import require_service
from devstack.ports import LOOPBACK, free_port
from devstack.rabbitmq import RabbitMQServer
from tests.pipeline import ROOT, settings_env, wait_for

DEPLOY = ROOT / "deploy"
INSTALL_HINT = "install it with scripts/install-system.sh (as root)"


def need_binary(name: str) -> str:
    """The path of ``name``, or skip (fail in CI)."""
    path = shutil.which(name)
    if path is None:
        require_service(name, f"{name} is not installed; {INSTALL_HINT}")
    return path


def http_get(url: str, timeout: float = 3) -> tuple[int, str]:
    """(status, body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a mailferry process needs for ``settings``, plus ``extra``."""
    env = settings_env(settings)
    env["MAILFERRY_MANAGEMENT_URL"] = settings.management_url
    env["MAILFERRY_SCHEDULER_METRICS_PORT"] = str(settings.scheduler_metrics_port)
    env["MAILFERRY_MAX_MESSAGE_BYTES"] = str(settings.max_message_bytes)
    env.update(extra)
    return env


def run_cli(settings: Settings, *args: str, **extra: str) -> subprocess.CompletedProcess:
    """`mailferry ARGS…` in a subprocess, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "mailferry.cli", *args], cwd=ROOT,
                          env=process_env(settings, **extra), capture_output=True, text=True,
                          timeout=60)


def start_process(module: str, settings: Settings, log_path: Path, **extra: str) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", module], cwd=ROOT,
                                env=process_env(settings, **extra), stdout=log,
                                stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen, timeout: float = 40) -> int:
    """SIGTERM, wait, SIGKILL if it will not stop: never leave one behind."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class PrometheusRabbitMQ(RabbitMQServer):
    """A harness RabbitMQ node that also runs rabbitmq_prometheus, on a free loopback port."""

    def __init__(self, workdir: Path):
        super().__init__(workdir, plugins=("rabbitmq_management", "rabbitmq_prometheus"))
        self.prometheus_port = free_port()

    def _configure(self) -> None:
        fresh = not self._configured
        super()._configure()
        if fresh:
            conf = self.workdir / "rabbitmq.conf"
            conf.write_text(conf.read_text() + f"prometheus.tcp.port = {self.prometheus_port}\n"
                                               f"prometheus.tcp.ip = {LOOPBACK}\n")


class PrometheusServer:
    """Debian's `prometheus` on a free loopback port with its data in ``workdir``."""

    def __init__(self, workdir: Path, config: dict):
        self.binary = need_binary("prometheus")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = self.workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> "PrometheusServer":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config_path}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address={LOOPBACK}:{self.port}"],
                cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is not None or http_get(self.url + "/-/ready")[0] == 200,
                 timeout=30, message="prometheus ready")
        assert self.proc.poll() is None, self.log()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=15)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        status, body = http_get(f"{self.url}/api/v1/{path}" + (f"?{query}" if query else ""))
        assert status == 200, (status, body)
        return json.loads(body)["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def values(self, expr: str, by: str) -> dict[str, float]:
        """{label value: sample value} of an instant query."""
        return {r["metric"].get(by, ""): float(r["value"][1]) for r in self.query(expr)}


def deploy_prometheus_config(targets: dict[str, str], *, vhost: str, interval: str = "1s") -> dict:
    """deploy/prometheus.yml with the test's targets: jobs not in ``targets`` are dropped."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": interval, "scrape_timeout": interval,
                        "evaluation_interval": interval}
    config["rule_files"] = [str(DEPLOY / name) for name in config.get("rule_files", [])]
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] not in targets:
            continue
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        if "vhost" in job.get("params", {}):
            job["params"]["vhost"] = [vhost]
        jobs.append(job)
    config["scrape_configs"] = jobs
    return config

