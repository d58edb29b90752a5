"""The error hierarchy every part of Mailferry raises at its edges.

Only the modules that talk to pika, imapclient, peewee and flanker catch those libraries'
exceptions; they re-raise one of the two kinds below, and the callers decide by kind alone:
a TransientError is retried (then requeued, or answered with SMTP 4xx), a PermanentError is
dead-lettered or fails its task with the reason.
"""


class MailferryError(Exception):
    """Base of every error Mailferry raises on purpose."""


class TransientError(MailferryError):
    """Worth retrying: the broker blinked, the database was locked, the network timed out."""


class PermanentError(MailferryError):
    """Will never succeed as it is: bad input, bad configuration, a file gone for good."""


class ConfigError(PermanentError):
    """An invalid setting; the message names the field and what it accepts."""


class ContractError(PermanentError):
    """A queue message that does not follow its JSON contract."""


class EmailConfigError(PermanentError):
    """A user's mailbox configuration is missing or invalid."""


class EmailParseError(PermanentError):
    """A message that cannot be parsed, or is over a configured limit."""


class EmailFetchError(TransientError):
    """Fetching from an IMAP server failed in a way that may pass (network, timeout).

    ``retry_after``: seconds the server asked us to wait (Microsoft's throttling answer), or
    None."""

    def __init__(self, *args, retry_after: float | None = None):
        super().__init__(*args)
        self.retry_after = retry_after


class EmailAuthError(PermanentError):
    """The IMAP server refused the credentials: retrying would not help."""


class InvalidTransition(PermanentError):
    """A task state change that the state machine does not allow."""
