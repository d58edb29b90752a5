"""The JSON messages that travel through RabbitMQ (``"v": 1``), built and checked here only."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field

from mailferry.errors import ContractError

VERSION = 1


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
    v: int = VERSION

    @classmethod
    def from_body(cls, body: bytes) -> "InboundJob":
        data = _load(body)
        rcpt_to = _require(data, "rcpt_to", list)
        if not rcpt_to or not all(isinstance(r, str) and r for r in rcpt_to):
            raise ContractError("field 'rcpt_to' must be a non-empty list of addresses")
        queue_id = _require(data, "queue_id", str)
        if not queue_id or len(queue_id) > 64:
            raise ContractError("field 'queue_id' must be 1 to 64 characters")
        return cls(
            spool_path=_require(data, "spool_path", str),
            queue_id=queue_id,
            mail_from=_require(data, "mail_from", str),
            rcpt_to=rcpt_to,
            size=int(data.get("size") or 0),
            received_at=str(data.get("received_at") or ""),
            remote_ip=str(data.get("remote_ip") or ""),
            helo=str(data.get("helo") or ""),
        )

    def envelope(self) -> dict:
        return {"queue_id": self.queue_id, "mail_from": self.mail_from,
                "rcpt_to": list(self.rcpt_to), "size": self.size, "received_at": self.received_at,
                "remote_ip": self.remote_ip, "helo": self.helo}

    def to_body(self) -> bytes:
        return dumps(asdict(self))


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


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
