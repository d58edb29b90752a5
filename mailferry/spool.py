"""The spool shared with Haraka: ``incoming/`` holds mail not yet stored, ``failed/`` holds
quarantined mail beside a ``.reason`` file. Paths in queue messages are relative to the
spool root and are refused when they resolve outside it.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import uuid
from pathlib import Path

from mailferry.errors import ContractError
from mailferry.storage import fsync_dir, write_durably

INCOMING = "incoming"
FAILED = "failed"


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..")


def _plain_file(path: Path) -> bool:
    """A file, not a symbolic link (which could point anywhere)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


class Spool:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.incoming = self.root / INCOMING
        self.failed = self.root / FAILED

    def ensure(self) -> "Spool":
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.failed.mkdir(parents=True, exist_ok=True)
        return self

    def resolve(self, relative: str) -> Path:
        """The absolute path of ``relative``; ContractError if it escapes the spool root."""
        if not relative or "\x00" in relative:
            raise ContractError("spool_path is empty or contains a NUL byte")
        folder, _, name = relative.partition("/")
        if (folder == INCOMING and _plain_name(name) and not self.incoming.is_symlink()
                and _plain_file(self.incoming / name)):
            # What Haraka and the injector publish: a file right in incoming/. Two lstats
            # instead of one per path component: this runs for every message.
            return self.incoming / name
        candidate = (self.root / relative).resolve()
        if candidate != self.root and self.root not in candidate.parents:
            raise ContractError(f"spool_path {relative!r} resolves outside the spool root")
        return candidate

    def write_incoming(self, raw: bytes, queue_id: str | None = None) -> tuple[str, str]:
        """Spool ``raw`` as Haraka's plugin does; return (queue_id, relative path)."""
        queue_id = queue_id or str(uuid.uuid4()).upper()
        target = self.incoming / f"{queue_id}.eml"
        write_durably(target, raw)
        return queue_id, f"{INCOMING}/{target.name}"

    def quarantine(self, path: Path, reason: str, raw: bytes | None = None, name: str | None = None) -> Path:
        """Move (or write) a message into ``failed/`` with its reason beside it."""
        name = name or path.name
        target = self.failed / name
        reason_file = target.with_suffix(target.suffix + ".reason")
        stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        write_durably(reason_file, f"{stamp} {reason}\n".encode("utf-8"))
        if raw is not None:
            write_durably(target, raw)
        elif path.exists():
            os.replace(path, target)
            fsync_dir(self.failed)
        return target

    def remove(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
