"""The JSON messages that travel through RabbitMQ (``"v": 1``), built and checked here only."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from dataclasses import asdict, dataclass

from mailferry.errors import ContractError

VERSION = 1
# A queue id names the spool file (``incoming/<queue_id>.eml``): Haraka's transaction uuids
# (``UUID`` or ``UUID.n``) and the injector's fit; nothing that could name a path does.
QUEUE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_SIZE = 2 ** 53  # the largest integer JSON carries exactly
# A spool segment: a file Haraka's plugin appends many messages to (``incoming/<name>.seg``).
SEGMENT_PATH_RE = re.compile(r"incoming/[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.seg")
SHA256_RE = re.compile(r"[0-9a-f]{64}")


def _load(body: bytes) -> dict:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ContractError(f"body is not UTF-8 JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ContractError("body is not a JSON object")
    if data.get("v") != VERSION:
        raise ContractError(f"unsupported contract version {data.get('v')!r}, expected {VERSION}")
    return data


def _require(data: dict, name: str, kind: type | tuple[type, ...]):
    value = data.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ContractError(f"field {name!r} missing or not {expected}")
    return value


def _optional_str(data: dict, name: str) -> str:
    value = data.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ContractError(f"field {name!r} is not a string")
    return value


def _size(data: dict) -> int:
    value = data.get("size", 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ContractError(f"field 'size' is not a number: {value!r}"[:200])
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        raise ContractError(f"field 'size' is not a whole number: {value!r}")
    if not 0 <= value <= MAX_SIZE:
        raise ContractError(f"field 'size' is out of range: {value!r}")
    return int(value)


def dumps(payload: dict) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class InboundJob:
    spool_path: str
    queue_id: str
    mail_from: str
    rcpt_to: list[str]
    size: int = 0
    received_at: str = ""
    remote_ip: str = ""
    helo: str = ""
    # Set when the message is a record in a segment: where the record starts, and the
    # message's sha256 (a record torn by a crash before its 250 never passes for mail).
    spool_offset: int | None = None
    sha256: str = ""
    v: int = VERSION

    @property
    def in_segment(self) -> bool:
        return self.spool_offset is not None

    @classmethod
    def from_body(cls, body: bytes) -> "InboundJob":
        data = _load(body)
        rcpt_to = _require(data, "rcpt_to", list)
        if not rcpt_to or not all(isinstance(r, str) and r for r in rcpt_to):
            raise ContractError("field 'rcpt_to' must be a non-empty list of addresses")
        queue_id = _require(data, "queue_id", str)
        if not QUEUE_ID_RE.fullmatch(queue_id):
            raise ContractError("field 'queue_id' must be 1 to 64 letters, digits, '.', '_' or '-'")
        spool_path = _require(data, "spool_path", str)
        offset, sha256 = _segment_place(data, spool_path)
        if offset is None and spool_path != spool_path_for(queue_id):
            # Exactly its own file: not a folder, not failed/, not another message's file.
            raise ContractError(f"field 'spool_path' must be {spool_path_for(queue_id)!r}, "
                                f"not {spool_path[:200]!r}")
        return cls(
            spool_path=spool_path,
            queue_id=queue_id,
            mail_from=_require(data, "mail_from", str),
            rcpt_to=rcpt_to,
            size=_size(data),
            received_at=_optional_str(data, "received_at"),
            remote_ip=_optional_str(data, "remote_ip"),
            helo=_optional_str(data, "helo"),
            spool_offset=offset,
            sha256=sha256,
        )

    def envelope(self) -> dict:
        return {"queue_id": self.queue_id, "mail_from": self.mail_from,
                "rcpt_to": list(self.rcpt_to), "size": self.size, "received_at": self.received_at,
                "remote_ip": self.remote_ip, "helo": self.helo}

    def to_body(self) -> bytes:
        body = asdict(self)
        if not self.in_segment:  # a file of its own: the contract as it was
            del body["spool_offset"], body["sha256"]
        return dumps(body)


def _segment_place(data: dict, spool_path: str) -> tuple[int | None, str]:
    """(offset, sha256) of a job whose message is a segment record, (None, "") otherwise.
    The job itself says where its record is, so the record can be checked against it: the
    segment's name, a whole-number offset, and the message's sha256."""
    offset = data.get("spool_offset")
    if offset is None:
        return None, ""
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= MAX_SIZE:
        raise ContractError(f"field 'spool_offset' is not a whole number in range: {offset!r}"[:200])
    if not SEGMENT_PATH_RE.fullmatch(spool_path):
        raise ContractError(f"field 'spool_path' must name a segment in incoming/ (…/NAME.seg), "
                            f"not {spool_path[:200]!r}")
    sha256 = data.get("sha256")
    if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
        raise ContractError("field 'sha256' must be the message's sha256, 64 lowercase hex digits")
    return offset, sha256


def spool_path_for(queue_id: str) -> str:
    """The one spool path an inbound job may name: its own file in ``incoming/``."""
    return f"incoming/{queue_id}.eml"


@dataclass(frozen=True)
class FetchJob:
    task_id: str
    user_id: int
    folder: str = "INBOX"
    v: int = VERSION

    @classmethod
    def from_body(cls, body: bytes) -> "FetchJob":
        data = _load(body)
        return cls(task_id=_require(data, "task_id", str), user_id=_require(data, "user_id", int),
                   folder=str(data.get("folder") or "INBOX"))

    def to_body(self) -> bytes:
        return dumps(asdict(self))


@dataclass(frozen=True)
class TaskRef:
    """Watchdog and expiry messages: just the task."""

    task_id: str
    v: int = VERSION

    @classmethod
    def from_body(cls, body: bytes) -> "TaskRef":
        return cls(task_id=_require(_load(body), "task_id", str))

    def to_body(self) -> bytes:
        return dumps(asdict(self))


def iso_utc(value: dt.datetime | None, timespec: str = "seconds") -> str | None:
    """A stored time (naive UTC, ``models.utcnow``) as ISO 8601 with its ``Z``; None stays None."""
    return None if value is None else value.isoformat(timespec=timespec) + "Z"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
