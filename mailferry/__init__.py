"""Mailferry: inbound mail from Haraka and IMAP, parsed, routed and stored through RabbitMQ."""

__version__ = "0.1.0"
