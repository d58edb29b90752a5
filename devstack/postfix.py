"""A throwaway Postfix on loopback: the durable-accept yardstick of bench/smtp_ingest.py.

Its own config, queue and data folders (``postfix -c DIR``), smtpd on a free 127.0.0.1 port,
mail for example.org accepted and then discarded (``transport_maps = inline:{ example.org=
discard: }``). Postfix's cleanup writes and fsyncs each queue file before smtpd answers 250,
so what it accepts per second is what a well-built durable MTA accepts on this machine.
No DNS, no peer-name lookups, no chroot; runs as root (its daemons drop to ``postfix``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

from .ports import LOOPBACK, free_port, listening, wait_until
from .postgres import remove_service_dir, service_dir

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"


def postfix_available() -> bool:
    return Path(POSTFIX).exists() and Path("/etc/postfix/master.cf").exists()


class PostfixServer:
    def __init__(self, workdir: Path, domain: str = "example.org"):
        self.workdir = Path(workdir).resolve()
        self.root: Path | None = None  # start(): a folder the postfix user can reach
        self.domain = domain
        self.host, self.port = LOOPBACK, free_port()

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    def _write_config(self) -> None:
        self.root, _ = service_dir(self.workdir, "postfix")
        for sub in ("etc", "queue", "data"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        owner = pwd.getpwnam("postfix")
        os.chown(self.root / "data", owner.pw_uid, owner.pw_gid)  # master.lock, caches
        (self.config_dir / "main.cf").write_text(f"""# written by devstack/postfix.py
compatibility_level = 3.6
queue_directory = {self.root / 'queue'}
data_directory = {self.root / 'data'}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = {LOOPBACK}
inet_protocols = ipv4
myhostname = yardstick.localdomain
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains = {self.domain}
transport_maps = inline:{{ {self.domain}=discard: }}
smtpd_relay_restrictions = permit_auth_destination, reject
smtpd_recipient_restrictions = permit_auth_destination, reject
disable_dns_lookups = yes
smtpd_peername_lookup = no
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
maillog_file = {self.root / 'maillog'}
maillog_file_prefixes = {self.root}
""")
        (self.config_dir / "master.cf").write_text(self._master())

    def _master(self) -> str:
        """Debian's master.cf with smtpd on our port, and no service chrooted (a chroot
        would need /etc files copied into the queue folder)."""
        lines = []
        for line in Path("/etc/postfix/master.cf").read_text().splitlines():
            fields = line.split()
            if line[:1] in ("#", " ", "\t") or len(fields) < 8:
                lines.append(line)
                continue
            if fields[0] == "smtp" and fields[1] == "inet":
                fields[0] = f"{LOOPBACK}:{self.port}"
            fields[4] = "n"
            lines.append("  ".join(fields))
        if not any(line.startswith("postlog") for line in lines):
            lines.append("postlog   unix-dgram n  -  n  -  1  postlogd")
        return "\n".join(lines) + "\n"

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([POSTFIX, "-c", str(self.config_dir), *args], capture_output=True,
                              text=True, timeout=60, check=check)

    def start(self) -> "PostfixServer":
        self._write_config()
        self._postfix("check")  # makes the queue folders, with their owners
        self._postfix("start")
        if not wait_until(lambda: listening(self.port, self.host), timeout=30):
            raise RuntimeError(f"postfix did not listen on {self.port}: "
                               f"{(self.root / 'maillog').read_text()[-2000:] if (self.root / 'maillog').exists() else ''}")
        return self

    def stop(self) -> None:
        if self.root is None:
            return
        self._postfix("stop", check=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and listening(self.port, self.host):
            time.sleep(0.1)
        remove_service_dir(self.workdir, "postfix", self.root)
