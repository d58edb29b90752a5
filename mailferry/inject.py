"""Putting a message into the pipeline exactly as the Haraka plugin does: spool it (with its
envelope record, fsynced) and publish its job (confirmed). Used by `mailferry inject`, the
tests and the benchmarks."""

from __future__ import annotations

import uuid
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

from mailferry import broker
from mailferry.config import Settings
from mailferry.contracts import InboundJob, now_iso, spool_path_for
from mailferry.errors import PermanentError
from mailferry.spool import Spool


def header_recipients(raw: bytes) -> list[str]:
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
    values = [str(v) for name in ("To", "Cc") for v in headers.get_all(name, [])]
    return [addr for _, addr in getaddresses(values) if "@" in addr]


class Injector:
    """Spools and publishes like the Haraka plugin; used by the CLI, tests and benchmarks."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.spool = Spool(settings.resolved_spool_dir).ensure()
        self.publisher = broker.Publisher(settings, declare=True)

    def inject(self, raw: bytes, rcpt_to: list[str] | None = None, mail_from: str = "") -> str:
        recipients = rcpt_to or header_recipients(raw)
        if not recipients:
            raise PermanentError("no recipients: give --rcpt or a message with To/Cc")
        queue_id = str(uuid.uuid4()).upper()
        job = InboundJob(spool_path=spool_path_for(queue_id), queue_id=queue_id,
                         mail_from=mail_from, rcpt_to=recipients, size=len(raw),
                         received_at=now_iso(), remote_ip="127.0.0.1", helo="mailferry-inject")
        _, relative = self.spool.write_incoming(raw, queue_id, envelope=job.to_body())
        try:
            self.publisher.publish(broker.inbound_key(self.settings), job.to_body(),
                                   message_id=queue_id)
        except Exception:
            self.spool.remove(self.spool.resolve(relative))  # as the plugin does
            raise
        return queue_id

    def close(self) -> None:
        self.publisher.close()
