"""A self-signed certificate for a loopback server (the test Dovecot, the test token server)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def self_signed(cert: Path, key: Path, days: int = 7) -> tuple[Path, Path]:
    """Write an EC P-256 certificate for localhost and 127.0.0.1 and its key (mode 0600)."""
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert),
            "-days", str(days), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    Path(key).chmod(0o600)
    return Path(cert), Path(key)
