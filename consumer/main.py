"""The consumer process: every queue handler on one connection, until SIGTERM."""

from __future__ import annotations

from consumer.expiry import build_handlers as expiry_handlers
from consumer.imap_idle import IdleLane
from consumer.imap_worker import build_handlers as imap_handlers
from consumer.inbound import InboundHandler
from mailferry.app import bootstrap
from mailferry.config import Settings
from consumer.runner import serve


def build_handlers(settings: Settings) -> list:
    """Every queue this process consumes: inbound mail, IMAP fetch jobs, task timeouts (the
    webhooks have a process of their own: consumer/webhook_worker.py)."""
    return [InboundHandler(settings), *imap_handlers(settings), *expiry_handlers(settings)]


def main(settings: Settings | None = None) -> int:
    settings = bootstrap(settings)
    idle = (IdleLane(settings),) if settings.imap_idle != "off" else ()
    return serve(settings, build_handlers(settings), settings.consumer_metrics_port, "consumer",
                 companions=idle)
