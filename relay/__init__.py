"""The events relay: the outbox's rows, published to ``mailferry.events``."""
